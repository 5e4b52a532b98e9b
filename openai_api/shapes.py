"""What differs between OpenAI's chat completions and (legacy) completions answers; app.py builds
both from the same Triton stream, usage and SSE code with one of these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    id_prefix: str
    object: str  # the whole answer
    chunk_object: str  # one server-sent chunk
    chat: bool

    def message(self, text: str) -> dict:
        """A whole answer's choice, without index, logprobs and finish_reason."""
        return {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}

    def content(self, text: str) -> dict:
        """A chunk's choice carrying text."""
        return {"delta": {"content": text}} if self.chat else {"text": text}

    def opening(self) -> dict | None:
        """The chunk choice before any text (chat names the role first), or None."""
        return {"delta": {"role": "assistant", "content": ""}} if self.chat else None

    def closing(self) -> dict:
        """The chunk choice that carries finish_reason."""
        return {"delta": {}} if self.chat else {"text": ""}


CHAT = Shape("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = Shape("cmpl-", "text_completion", "text_completion", chat=False)
