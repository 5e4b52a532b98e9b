"""Where a request's time goes inside Triton: per-model queue and compute times from a trace file.

    make serve TRACE_FILE=/tmp/trace.json     # Triton records every request (written at `make stop`)
    make loadtest ...                         # any load
    make stop
    python -m loadtest.trace /tmp/trace.json [--json out.json]

Triton's "triton" trace mode with level TIMESTAMPS writes a JSON list of two kinds of entries: one
naming a traced request ({"id", "model_name", "request_id", "parent_id"}: the ensemble and each of
its steps are separate requests) and, per timestamp, {"id", "timestamps": [{"name", "ns"}]}. Per
model this reports:
- queue: QUEUE_START -> COMPUTE_START, waiting for the batcher or a free instance;
- compute: COMPUTE_START -> COMPUTE_END, the backend's execute (a Python model: the round trip to
  its stub and its `execute()`);
- busy: compute time over the span from the first COMPUTE_START to the last COMPUTE_END, summed
  over requests (near 1 per instance = the model's instances are the bottleneck);
- for the ensemble: first response (REQUEST_START -> first INFER_RESPONSE_COMPLETE, the server's
  part of TTFT) and request (REQUEST_START -> REQUEST_END).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from loadtest.report import ms, percentiles


def read_trace(path: Path) -> list[dict]:
    """One record per traced request: {"id", "model", "request_id", "parent_id", "t": {name: [s, ...]}}
    (times in seconds, in the order written; a timestamp can repeat, e.g. one per response)."""
    requests: dict[int, dict] = {}
    times: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for entry in json.loads(Path(path).read_text()):
        if "model_name" in entry:
            requests[entry["id"]] = {
                "id": entry["id"],
                "model": entry["model_name"],
                "request_id": entry.get("request_id", ""),
                "parent_id": entry.get("parent_id", 0),
            }
        for stamp in entry.get("timestamps", ()):
            times[entry["id"]][stamp["name"]].append(stamp["ns"] / 1e9)
    return [{**req, "t": dict(times[i])} for i, req in requests.items()]


def _span(t: dict[str, list[float]], start: str, end: str) -> float | None:
    """First `start` -> first `end`, if both were recorded."""
    if start in t and end in t:
        return min(t[end]) - min(t[start])
    return None


def summarize(records: list[dict]) -> dict[str, dict]:
    by_model: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_model[rec["model"]].append(rec["t"])
    out = {}
    for model, stamps in sorted(by_model.items()):
        queue = [v for t in stamps if (v := _span(t, "QUEUE_START", "COMPUTE_START")) is not None]
        compute = [v for t in stamps if (v := _span(t, "COMPUTE_START", "COMPUTE_END")) is not None]
        first = [v for t in stamps if (v := _span(t, "REQUEST_START", "INFER_RESPONSE_COMPLETE")) is not None]
        total = [v for t in stamps if (v := _span(t, "REQUEST_START", "REQUEST_END")) is not None]
        starts = [min(t["COMPUTE_START"]) for t in stamps if "COMPUTE_START" in t]
        ends = [max(t["COMPUTE_END"]) for t in stamps if "COMPUTE_END" in t]
        span = max(ends) - min(starts) if starts and ends else 0.0
        out[model] = {
            "requests": len(stamps),
            "queue_s": percentiles(queue),
            "compute_s": percentiles(compute),
            "busy": sum(compute) / span if span > 0 else None,
            "first_response_s": percentiles(first),
            "request_s": percentiles(total),
        }
    return out


def markdown(summary: dict[str, dict]) -> str:
    lines = [
        "Times in ms. queue: QUEUE_START → COMPUTE_START; compute: COMPUTE_START → COMPUTE_END; "
        "busy: compute time / compute span; first response and request: REQUEST_START → first "
        "INFER_RESPONSE_COMPLETE and → REQUEST_END.",
        "",
        "| model | requests | queue p50 | queue p90 | queue p99 | compute p50 | compute p99 | busy "
        "| first response p50 | first response p99 | request p50 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, s in summary.items():
        q, c, f, r = s["queue_s"], s["compute_s"], s["first_response_s"], s["request_s"]
        busy = "–" if s["busy"] is None else f"{s['busy']:.2f}"
        lines.append(
            f"| {model} | {s['requests']} | {ms(q['p50'])} | {ms(q['p90'])} | {ms(q['p99'])} "
            f"| {ms(c['p50'])} | {ms(c['p99'])} | {busy} | {ms(f['p50'])} | {ms(f['p99'])} | {ms(r['p50'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_file", type=Path, help="written by `make serve TRACE_FILE=...` when it stops")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = ap.parse_args(argv)
    summary = summarize(read_trace(args.trace_file))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(markdown(summary), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
