"""What the OpenAI-compatible server adds to a request's latency: the same chat requests through it
(HTTP + server-sent events) and to the ensemble directly (one gRPC stream each, the very code the
OpenAI server runs), taking turns, one user.

    python -m loadtest.openai_overhead [--requests 200] [--max-tokens 16] [--model-dir models/tiny-maverick]
                                       [--out results/openai]

Starts a tritonserver on the checkpoint and `python -m openai_api` beside it (free ports), warms
every path, then sends triples: one request each way, in rotating order, with the same body (the
direct side sends exactly the ensemble inputs the OpenAI server derives from it). The OpenAI
server is called by two clients: a minimal HTTP/1.1 one (the request's bytes out, the chunked
events in: what the server adds) and httpx, the transport of the `openai` SDK (what a Python SDK
user sees, the client library's own work included). Time to first token is from sending the
request to the first non-empty piece of text; each overhead is the median of the per-triple
differences (a shared machine drifts between minutes, a triple does not). Writes overhead.json
and overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "maverick"


def body(i: int, max_tokens: int) -> dict:
    """A short chat, different per request (no prefix-cache advantage for either side's turn)."""
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Request {i}: describe the weather on a spring morning."},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


async def direct(client, b: dict) -> tuple[float, float]:
    """(TTFT, total) in seconds, over the OpenAI server's own gRPC path, in this process."""
    from openai_api.protocol import parse_chat
    from openai_api.triton import triton_stream

    req = parse_chat(b, MODEL)
    t0 = time.perf_counter()
    ttft = None
    async for d in triton_stream(client, req.fields, True):
        if ttft is None and d.text:
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0


async def through(http, url: str, b: dict) -> tuple[float, float]:
    """(TTFT, total) in seconds through the OpenAI server with httpx, parsing its SSE."""
    t0 = time.perf_counter()
    ttft = None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=b) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None and has_content(json.loads(line[6:])):
                ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0


def has_content(chunk: dict) -> bool:
    return any(c["delta"].get("content") for c in chunk.get("choices", []))


class RawHTTP:
    """A minimal HTTP/1.1 client on one kept-alive connection: a POST's bytes out, a chunked
    server-sent-events answer in, and nothing else, so that what it measures is the server's."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def events(self, path: str, body: dict) -> AsyncIterator[dict]:
        """POST `body` as JSON to `path`; yields each `data:` event's JSON until [DONE]."""
        if self.conn is None:
            self.conn = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.conn
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        status, *headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        if status.split()[1] != "200" or "transfer-encoding: chunked" not in map(str.lower, headers):
            raise RuntimeError(f"expected a chunked 200, got {status!r}")
        pending = b""
        while size := int((await reader.readline()).strip(), 16):  # one chunk: "size\r\ndata\r\n"
            pending += (await reader.readexactly(size + 2))[:-2]
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                if event == b"data: [DONE]":
                    continue
                yield json.loads(event.removeprefix(b"data: "))
        await reader.readline()  # the empty trailer after the last chunk

    async def close(self) -> None:
        if self.conn is not None:
            self.conn[1].close()


async def through_raw(raw: RawHTTP, b: dict) -> tuple[float, float]:
    """(TTFT, total) in seconds through the OpenAI server with the minimal client."""
    t0 = time.perf_counter()
    ttft = None
    async for chunk in raw.events("/v1/chat/completions", b):
        if ttft is None and has_content(chunk):
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0


SIDES = ("direct", "openai", "openai_httpx")


async def measure(grpc_url: str, url: str, requests: int, warmup: int, max_tokens: int) -> list[dict]:
    import httpx
    from tritonclient.grpc.aio import InferenceServerClient

    client, raw = InferenceServerClient(grpc_url), RawHTTP(url)
    # kept-alive connections, as an SDK client holds them (no TCP handshake in the measurement)
    async with httpx.AsyncClient(timeout=120) as http:
        run = {
            "direct": lambda b: direct(client, b),
            "openai": lambda b: through_raw(raw, b),
            "openai_httpx": lambda b: through(http, url, b),
        }
        try:
            for i in range(warmup):
                for side in SIDES:
                    await run[side](body(i, max_tokens))
            triples = []
            for i in range(requests):
                b = body(warmup + i, max_tokens)
                order = SIDES[i % 3 :] + SIDES[: i % 3]  # each side first a third of the time
                triple = {}
                for side in order:
                    ttft, total = await run[side](b)
                    triple[side] = {"ttft_s": ttft, "total_s": total}
                triples.append(triple)
            return triples
        finally:
            await client.close()
            await raw.close()


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the OpenAI server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the OpenAI server not healthy after {timeout:.0f} s")


@contextlib.contextmanager
def serve_with_openai(model_dir: Path, build: Path) -> Iterator[tuple[str, str]]:
    """A tritonserver on the checkpoint and `python -m openai_api` beside it, on free ports, as
    `make serve` runs them; yields (Triton's gRPC address, the OpenAI server's base URL)."""
    from server.launch import RunningServer, ServeConfig, free_ports
    from server.processes import openai_command

    build.mkdir(parents=True, exist_ok=True)
    http, grpc, metrics, openai_port = free_ports(4)
    cfg = ServeConfig(model_dir, http, grpc, metrics, {}, build, openai_port=openai_port)
    server = RunningServer(cfg, build / "server.log")
    log = open(build / "openai.log", "w")  # noqa: SIM115 - closed below
    api = subprocess.Popen(openai_command(cfg), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{openai_port}"
    try:
        wait_health(url, api)
        yield f"localhost:{grpc}", url
    finally:
        api.terminate()
        api.wait(10)
        log.close()
        server.stop()


CLIENTS = {"openai": "minimal HTTP client", "openai_httpx": "httpx"}


def summarize(triples: list[dict]) -> dict:
    """Per measure: each side's percentiles and, per client of the OpenAI server, those of the
    differences to the direct side within each triple (`added`), in ms."""
    from loadtest.report import percentiles

    def ms(values: list[float]) -> dict:
        return {k: 1e3 * v for k, v in percentiles(values).items()}

    sides = [side for side in SIDES if side in triples[0]]
    out = {}
    for key in ("ttft_s", "total_s"):
        out[key] = {f"{side}_ms": ms([t[side][key] for t in triples]) for side in sides}
        for side in sides[1:]:
            out[key][f"{side}_added_ms"] = ms([t[side][key] - t["direct"][key] for t in triples])
    return out


def markdown(summary: dict, meta: dict) -> str:
    rows = [
        "| | client | direct p50 | OpenAI p50 | direct p90 | OpenAI p90 | added: median of triples "
        "| added p90 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("ttft_s", "TTFT"), ("total_s", "whole request")):
        s = summary[key]
        for side, client in CLIENTS.items():
            d, o, a = s["direct_ms"], s[f"{side}_ms"], s[f"{side}_added_ms"]
            cells = (d["p50"], o["p50"], d["p90"], o["p90"], a["p50"], a["p90"])
            rows.append(f"| {name} | {client} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    head = (
        f"# OpenAI server overhead, 1 user, {meta['requests']} triples, "
        f"{meta['max_tokens']} output tokens\n\n"
        f"Times in ms. Machine: {meta['machine']}. Command: `{meta['command']}`\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    from loadtest.machine import cpu_name

    p = argparse.ArgumentParser(
        prog="python -m loadtest.openai_overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--requests", type=int, default=200, help="triples measured")
    p.add_argument("--warmup", type=int, default=10, help="triples not measured")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny-maverick")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "openai")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with serve_with_openai(args.model_dir, args.out / "server") as (grpc_url, url):
        triples = asyncio.run(measure(grpc_url, url, args.requests, args.warmup, args.max_tokens))
    meta = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "machine": f"{cpu_name()}, {platform.machine()}",
        "command": "python -m loadtest.openai_overhead " + " ".join(sys.argv[1:]),
    }
    summary = summarize(triples)
    (args.out / "overhead.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "triples": triples}, indent=1)
    )
    md = markdown(summary, meta)
    (args.out / "overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
