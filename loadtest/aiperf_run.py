"""AIPerf, NVIDIA's benchmark client, against the OpenAI-compatible server: an independent client's
view of `/v1/chat/completions` (streamed), at a few concurrencies.

    make aiperf-setup     # AIPerf in a venv of its own (build/aiperf-venv; it pins its own deps)
    python -m loadtest.aiperf_run [--concurrency 1,4,16] [--requests 40] [--input-tokens 128]
                                  [--output-tokens 64] [--out results/openai/aiperf]

Starts a tritonserver and the OpenAI server beside it (as `make serve` does, free ports), runs
`aiperf profile` once per concurrency (synthetic prompts of about --input-tokens tokens, exactly
--output-tokens out with ignore_eos), reads each run's JSON export and writes aiperf.md and
aiperf.json: requests/s, output tokens/s, TTFT and ITL percentiles as AIPerf measured them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from loadtest.openai_overhead import serve_with_openai

ROOT = Path(__file__).resolve().parents[1]
AIPERF = ROOT / "build" / "aiperf-venv" / "bin" / "aiperf"
# AIPerf's export names -> the columns written here
METRICS = {
    "request_throughput": "req/s",
    "output_token_throughput": "output tok/s",
    "time_to_first_token": "TTFT",
    "inter_token_latency": "ITL",
}


def profile(aiperf: Path, url: str, model_dir: Path, c: int, args, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(aiperf), "profile", "--model", "maverick", "--url", url, "--endpoint-type", "chat",
        "--streaming", "--tokenizer", str(model_dir), "--concurrency", str(c),
        "--request-count", str(args.requests), "--warmup-request-count", str(min(c, 4)),
        "--synthetic-input-tokens-mean", str(args.input_tokens), "--synthetic-input-tokens-stddev", "0",
        "--output-tokens-mean", str(args.output_tokens), "--extra-inputs", "ignore_eos:true",
        "--extra-inputs", f"min_tokens:{args.output_tokens}", "--artifact-dir", str(out), "--ui", "none",
    ]  # fmt: skip
    with open(out / "aiperf.log", "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1800)
    return json.loads((out / "profile_export_aiperf.json").read_text())  # the profiling phase's


def row(c: int, export: dict) -> dict:
    out = {"concurrency": c}
    for key, name in METRICS.items():
        m = export.get(key) or {}
        if key in ("time_to_first_token", "inter_token_latency"):
            out[f"{name} p50 ms"] = m.get("p50")
            out[f"{name} p99 ms"] = m.get("p99")
        else:
            out[name] = m.get("avg")
    # AIPerf counts output tokens by re-tokenizing the text, which differs from the ids the tiny
    # model generated; the server's own usage counts them exactly
    usage = (export.get("usage_completion_tokens") or {}).get("avg")
    out["usage tok/s"] = usage * out["req/s"] if usage and out["req/s"] else None
    out["requests"] = int((export.get("request_count") or {}).get("avg") or 0)
    out["errors"] = sum(int(e.get("count", 0)) for e in export.get("error_summary") or [])
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r[k] is None else f"{r[k]:.4g}" for k in cols) + " |")
    return (
        f"# AIPerf against the OpenAI server ({meta['input_tokens']} in, {meta['output_tokens']} out)\n\n"
        f"Machine: {meta['machine']}. Command: `{meta['command']}`\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    from loadtest.machine import cpu_name

    p = argparse.ArgumentParser(prog="python -m loadtest.aiperf_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=40, help="measured requests per concurrency")
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny-maverick")
    p.add_argument("--aiperf", type=Path, default=AIPERF, help="the aiperf executable (make aiperf-setup)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "openai" / "aiperf")
    args = p.parse_args()
    if not args.aiperf.is_file():
        sys.exit(f"{args.aiperf} not found: run `make aiperf-setup` first")
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with serve_with_openai(args.model_dir, args.out / "server") as (_, url):
        for c in levels:
            rows.append(row(c, profile(args.aiperf, url, args.model_dir, c, args, args.out / f"c{c}")))
            print(rows[-1], flush=True)
    meta = {
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "machine": f"{cpu_name()}, {platform.machine()}",
        "command": "python -m loadtest.aiperf_run " + " ".join(sys.argv[1:]),
    }
    (args.out / "aiperf.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = markdown(rows, meta)
    (args.out / "aiperf.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
