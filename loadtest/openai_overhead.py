"""What the OpenAI-compatible server adds to a request's latency: the same chat requests through it
(HTTP + server-sent events) and to the ensemble directly (one gRPC stream each, the very code the
OpenAI server runs), taking turns, one user.

    python -m loadtest.openai_overhead [--requests 200] [--max-tokens 16] [--model-dir models/tiny-maverick]
                                       [--out results/openai]

Starts a tritonserver on the checkpoint and `python -m openai_api` beside it (free ports), warms
both paths, then sends pairs: each pair is one request each way, in alternating order, with the
same body (the direct side sends exactly the ensemble inputs the OpenAI server derives from it).
Time to first token is from sending the request to the first non-empty piece of text; the
overhead is the median of the per-pair differences (a shared machine drifts between minutes, a
pair does not). Writes overhead.json and overhead.md.
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
from collections.abc import Iterator
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
    """(TTFT, total) in seconds through the OpenAI server, parsing its SSE."""
    t0 = time.perf_counter()
    ttft = None
    async with http.stream("POST", f"{url}/v1/chat/completions", json=b) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
    return ttft if ttft is not None else float("nan"), time.perf_counter() - t0


async def measure(grpc_url: str, url: str, requests: int, warmup: int, max_tokens: int) -> list[dict]:
    import httpx
    from tritonclient.grpc.aio import InferenceServerClient

    client = InferenceServerClient(grpc_url)
    # one kept-alive connection, as an SDK client holds it (no TCP handshake in the measurement)
    async with httpx.AsyncClient(timeout=120) as http:
        try:
            for i in range(warmup):
                await direct(client, body(i, max_tokens))
                await through(http, url, body(i, max_tokens))
            pairs = []
            for i in range(requests):
                b = body(warmup + i, max_tokens)
                order = ("direct", "openai") if i % 2 == 0 else ("openai", "direct")
                pair = {}
                for side in order:
                    ttft, total = await (direct(client, b) if side == "direct" else through(http, url, b))
                    pair[side] = {"ttft_s": ttft, "total_s": total}
                pairs.append(pair)
            return pairs
        finally:
            await client.close()


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


def summarize(pairs: list[dict]) -> dict:
    """Per measure: each side's percentiles and those of the per-pair differences, in ms."""
    from loadtest.report import percentiles

    def ms(values: list[float]) -> dict:
        return {k: 1e3 * v for k, v in percentiles(values).items()}

    return {
        key: {
            "direct_ms": ms([p["direct"][key] for p in pairs]),
            "openai_ms": ms([p["openai"][key] for p in pairs]),
            "added_ms": ms([p["openai"][key] - p["direct"][key] for p in pairs]),
        }
        for key in ("ttft_s", "total_s")
    }


def markdown(summary: dict, meta: dict) -> str:
    rows = [
        "| | direct p50 | OpenAI p50 | direct p90 | OpenAI p90 | added, median of pairs | added p90 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, name in (("ttft_s", "TTFT"), ("total_s", "whole request")):
        s = summary[key]
        d, o, a = s["direct_ms"], s["openai_ms"], s["added_ms"]
        cells = (d["p50"], o["p50"], d["p90"], o["p90"], a["p50"], a["p90"])
        rows.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    head = (
        f"# OpenAI server overhead, 1 user, {meta['requests']} pairs, {meta['max_tokens']} output tokens\n\n"
        f"Times in ms. Machine: {meta['machine']}. Command: `{meta['command']}`\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main() -> None:
    from loadtest.machine import cpu_name

    p = argparse.ArgumentParser(
        prog="python -m loadtest.openai_overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--requests", type=int, default=200, help="pairs measured")
    p.add_argument("--warmup", type=int, default=10, help="pairs not measured")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny-maverick")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "openai")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with serve_with_openai(args.model_dir, args.out / "server") as (grpc_url, url):
        pairs = asyncio.run(measure(grpc_url, url, args.requests, args.warmup, args.max_tokens))
    meta = {
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "machine": f"{cpu_name()}, {platform.machine()}",
        "command": "python -m loadtest.openai_overhead " + " ".join(sys.argv[1:]),
    }
    summary = summarize(pairs)
    (args.out / "overhead.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "pairs": pairs}, indent=1)
    )
    md = markdown(summary, meta)
    (args.out / "overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
