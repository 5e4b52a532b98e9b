"""Run a load test against a running server and gate on it (what `make loadtest` runs).

    python -m loadtest [--host localhost] [--protocol grpc|http|both] [--users 4 | --max-users 32 |
                       --levels 1,2,4] [--duration 30s] [--workload chat] [--out results/loadtest/run]
                       [--max-error-rate 0] [--max-p99-ttft 2s] [--min-tokens-per-s 100] ...

Builds the workload (loadtest/workload.py), runs Locust headless in a subprocess (gevent patches the
whole interpreter: it never runs in this process), then writes into --out: Locust's CSV and HTML,
records.jsonl (one line per request), summary.json and summary.md (one row per level), chart.png.
Exit status 0 when every threshold holds at every level, 1 otherwise (errors above
--max-error-rate, which is 0 by default; p99 TTFT or tokens/s out of bounds; a level without
TTFT/ITL/throughput; a failing Locust run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from loadtest import report, workload

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def seconds(text: str) -> float:
    """'30', '30s', '2m', '1h', '250ms' -> seconds."""
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def levels_from(args) -> list[int]:
    if args.levels:
        return [int(x) for x in args.levels.split(",")]
    if args.max_users:
        out = [1]
        while out[-1] * 2 <= args.max_users:
            out.append(out[-1] * 2)
        return out if out[-1] == args.max_users else [*out, args.max_users]
    return [args.users]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    srv = ap.add_argument_group("server")
    srv.add_argument("--host", default="localhost", help="where the server runs (localhost by default)")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=8001)
    srv.add_argument("--protocol", choices=("grpc", "http", "both"), default="grpc")
    load = ap.add_argument_group("load")
    load.add_argument("--users", type=int, default=4, help="closed loop: concurrent users")
    load.add_argument("--levels", default="", help="sweep: numbers of users in turn, e.g. 1,2,4,8")
    load.add_argument("--max-users", type=int, default=0, help="sweep 1, 2, 4, ... up to this")
    load.add_argument("--duration", type=seconds, default=30.0, help="per level (30, 30s, 2m)")
    load.add_argument("--warmup", type=seconds, default=0.0, help="not measured at the start of each level")
    load.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson requests/s (users = pool)")
    load.add_argument("--request-timeout", type=seconds, default=600.0)
    work = ap.add_argument_group("workload")
    work.add_argument("--workload", default="chat", help=f"preset: {', '.join(workload.PRESETS)}")
    work.add_argument("--input-len", help="fixed:N, uniform:LO:HI or sharegpt[:MAX] (overrides the preset)")
    work.add_argument("--output-len", help="same forms")
    work.add_argument("--images", type=float, dest="image_share", help="share of requests with an image")
    work.add_argument("--temperature", type=float)
    work.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        default=None,
        help="stream=false: one response per request (TTFT = E2E latency)",
    )
    work.add_argument("--seed", type=int)
    default_tok = ROOT / "models" / "tiny-maverick"
    work.add_argument(
        "--tokenizer",
        type=Path,
        default=default_tok if (default_tok / "tokenizer.json").is_file() else None,
        help="a folder with tokenizer.json to count prompt tokens (default: the embedded checkpoint)",
    )
    gate = ap.add_argument_group("pass/fail (every level)")
    gate.add_argument("--max-error-rate", type=float, default=0.0)
    gate.add_argument("--max-p99-ttft", type=seconds, default=None)
    gate.add_argument("--min-tokens-per-s", type=float, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest" / "run")
    ap.add_argument("--locust-arg", action="append", default=[], help="passed on to Locust (repeatable)")
    return ap


def locust_command(args, levels: list[int], out: Path) -> list[str]:
    users = {
        "grpc": ["GrpcStreamUser"],
        "http": ["HttpStreamUser"],
        "both": ["GrpcStreamUser", "HttpStreamUser"],
    }
    return [
        sys.executable, "-m", "locust",
        "-f", str(HERE / "locustfile.py"),
        "--headless", "--only-summary",
        "--host", f"http://{args.host}:{args.http_port}",
        "--grpc-url", f"{args.host}:{args.grpc_port}",
        "--workload-file", str(out / "workload.json"),
        "--records", str(out / "records.jsonl"),
        "--levels", ",".join(map(str, levels)),
        "--level-time", str(args.duration),
        "--warmup", str(args.warmup),
        "--rate", str(args.rate),
        "--request-timeout", str(args.request_timeout),
        # let requests in flight at the end finish (they are measured), then stop
        "--stop-timeout", str(math.ceil(args.request_timeout)),
        "--exit-code-on-error", "0",  # errors are judged here, against --max-error-rate
        "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
        "--loglevel", "WARNING", "--logfile", str(out / "locust.log"),
        *args.locust_arg,
        *users[args.protocol],
    ]  # fmt: skip


def user_exceptions(out: Path) -> int:
    path = out / "locust_exceptions.csv"
    if not path.is_file():
        return 0
    with open(path) as f:
        return sum(int(row["Count"]) for row in csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    levels = levels_from(args)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("records.jsonl", "summary.json", "summary.md", "chart.png", "locust_exceptions.csv"):
        (out / stale).unlink(missing_ok=True)
    spec = workload.preset(
        args.workload,
        input_len=args.input_len,
        output_len=args.output_len,
        image_share=args.image_share,
        temperature=args.temperature,
        stream=args.stream,
        seed=args.seed,
    )
    workload.save(workload.build(spec, args.tokenizer), out / "workload.json")

    cmd = locust_command(args, levels, out)
    print(
        f"loadtest: {args.protocol} on {args.host}, users {levels}, {args.duration:g} s each -> {out}",
        flush=True,
    )
    started = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rc = subprocess.run(cmd, env=env).returncode

    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "target": {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port},
        "protocol": args.protocol,
        "arrival": f"poisson {args.rate:g}/s" if args.rate > 0 else "closed loop",
        "level_time_s": args.duration,
        "warmup_s": args.warmup,
        "workload": {"preset": args.workload, **spec.__dict__},
        "client": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
        "locust_exit_code": rc,
    }
    records = out / "records.jsonl"
    summary = (
        report.summarize(records, meta, user_exceptions(out))
        if records.is_file()
        else {
            **meta,
            "levels": [],
            "total_requests": 0,
            "total_errors": 0,
            "user_exceptions": user_exceptions(out),
        }
    )
    thresholds = report.Thresholds(args.max_error_rate, args.max_p99_ttft, args.min_tokens_per_s)
    problems = report.verdict(summary, thresholds)
    if rc != 0:
        problems.insert(0, f"locust exited with {rc} (see {out / 'locust.log'})")
    summary["thresholds"] = thresholds.__dict__
    summary["passed"], summary["problems"] = not problems, problems
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    title = (
        f"Load test: {args.protocol}, {summary['arrival']}, workload {args.workload}, {summary['started']}"
    )
    table = report.markdown(summary, f"# {title}")
    (out / "summary.md").write_text(table)
    if any(lv["requests"] for lv in summary["levels"]):
        report.chart({f"Triton {args.protocol}": summary}, out / "chart.png")
    print(table)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print("loadtest:", "passed" if not problems else "FAILED", f"({out / 'summary.json'})", flush=True)
    return 0 if not problems else 1


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
