"""Server-sent events as Triton's /generate_stream sends them: `data: {json}` blocks separated by a
blank line. A stream can fail after its 200 status: the error then comes as an event of its own,
`data: {"error": "..."}`, and must fail the request like an error status does. Kept free of gevent
so that it can be tested in-process."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator


class ServerError(Exception):
    """The server failed the request; str() is its message."""


def events(chunks: Iterable[bytes]) -> Iterator[dict]:
    """Each event's JSON payload, as soon as the chunk that completes it arrives; an error event
    raises ServerError. Events may be split across chunks or share one."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk.replace(b"\r\n", b"\n")
        *complete, buffer = buffer.split(b"\n\n")
        for event in complete:
            data = b"".join(line[5:] for line in event.split(b"\n") if line.startswith(b"data:"))
            if not data.strip():
                continue  # a comment or keep-alive
            payload = json.loads(data)
            if "error" in payload:
                raise ServerError(str(payload["error"]))
            yield payload


def error_text(body: bytes) -> str:
    """The message of an error answered before the stream (one SSE event, or plain JSON)."""
    text = body.strip()
    if text.startswith(b"data:"):
        text = text[5:]
    try:
        return str(json.loads(text).get("error", text.decode(errors="replace")))
    except (ValueError, AttributeError):
        return text.decode(errors="replace")
