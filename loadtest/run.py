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
from dataclasses import dataclass
from pathlib import Path

from loadtest import report, workload
from loadtest.cli import seconds
from loadtest.machine import cpu_name

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCUST_USERS = {
    "grpc": ("GrpcStreamUser",),
    "http": ("HttpStreamUser",),
    "both": ("GrpcStreamUser", "HttpStreamUser"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    srv = ap.add_argument_group("server")
    srv.add_argument("--host", default="localhost", help="where the server runs (localhost by default)")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=8001)
    srv.add_argument("--protocol", choices=tuple(LOCUST_USERS), default="grpc")
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


def levels_from(args: argparse.Namespace) -> list[int]:
    """The numbers of users in turn: --levels as given, --max-users doubled up to it, else --users."""
    if args.levels:
        return [int(x) for x in args.levels.split(",")]
    if args.max_users:
        out = [1]
        while out[-1] * 2 <= args.max_users:
            out.append(out[-1] * 2)
        return out if out[-1] == args.max_users else [*out, args.max_users]
    return [args.users]


@dataclass(frozen=True)
class RunSettings:
    """One run as the command line asks for it: the server, the load shape, the workload, the gate."""

    host: str
    http_port: int
    grpc_port: int
    protocol: str  # a key of LOCUST_USERS
    levels: tuple[int, ...]  # users, in turn
    duration: float  # seconds per level
    warmup: float  # seconds not measured at the start of each level
    rate: float  # open loop: Poisson requests/s; 0: closed loop
    request_timeout: float
    preset: str  # the workload's name
    spec: workload.Spec  # the preset with the command line's overrides
    tokenizer: Path | None
    thresholds: report.Thresholds
    out: Path
    locust_args: tuple[str, ...]


def parse(argv: list[str] | None = None) -> RunSettings:
    args = parser().parse_args(argv)
    spec = workload.preset(
        args.workload,
        input_len=args.input_len,
        output_len=args.output_len,
        image_share=args.image_share,
        temperature=args.temperature,
        stream=args.stream,
        seed=args.seed,
    )
    return RunSettings(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        protocol=args.protocol,
        levels=tuple(levels_from(args)),
        duration=args.duration,
        warmup=args.warmup,
        rate=args.rate,
        request_timeout=args.request_timeout,
        preset=args.workload,
        spec=spec,
        tokenizer=args.tokenizer,
        thresholds=report.Thresholds(args.max_error_rate, args.max_p99_ttft, args.min_tokens_per_s),
        out=args.out,
        locust_args=tuple(args.locust_arg),
    )


def locust_command(run: RunSettings) -> list[str]:
    out = run.out
    return [
        sys.executable, "-m", "locust",
        "-f", str(HERE / "locustfile.py"),
        "--headless", "--only-summary",
        "--host", f"http://{run.host}:{run.http_port}",
        "--grpc-url", f"{run.host}:{run.grpc_port}",
        "--workload-file", str(out / "workload.json"),
        "--records", str(out / "records.jsonl"),
        "--levels", ",".join(map(str, run.levels)),
        "--level-time", str(run.duration),
        "--warmup", str(run.warmup),
        "--rate", str(run.rate),
        "--request-timeout", str(run.request_timeout),
        # let requests in flight at the end finish (they are measured), then stop
        "--stop-timeout", str(math.ceil(run.request_timeout)),
        "--exit-code-on-error", "0",  # errors are judged here, against --max-error-rate
        "--csv", str(out / "locust"), "--html", str(out / "locust.html"),
        "--loglevel", "WARNING", "--logfile", str(out / "locust.log"),
        *run.locust_args,
        *LOCUST_USERS[run.protocol],
    ]  # fmt: skip


def user_exceptions(out: Path) -> int:
    path = out / "locust_exceptions.csv"
    if not path.is_file():
        return 0
    with open(path) as f:
        return sum(int(row["Count"]) for row in csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    run = parse(argv)
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("records.jsonl", "summary.json", "summary.md", "chart.png", "locust_exceptions.csv"):
        (out / stale).unlink(missing_ok=True)
    workload.save(workload.build(run.spec, run.tokenizer), out / "workload.json")

    print(
        f"loadtest: {run.protocol} on {run.host}, users {list(run.levels)}, {run.duration:g} s each -> {out}",
        flush=True,
    )
    started = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rc = subprocess.run(locust_command(run), env=env).returncode

    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "target": {"host": run.host, "http_port": run.http_port, "grpc_port": run.grpc_port},
        "protocol": run.protocol,
        "arrival": f"poisson {run.rate:g}/s" if run.rate > 0 else "closed loop",
        "level_time_s": run.duration,
        "warmup_s": run.warmup,
        "workload": {"preset": run.preset, **run.spec.__dict__},
        "client": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
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
    problems = report.verdict(summary, run.thresholds)
    if rc != 0:
        problems.insert(0, f"locust exited with {rc} (see {out / 'locust.log'})")
    summary["thresholds"] = run.thresholds.__dict__
    summary["passed"], summary["problems"] = not problems, problems
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    title = f"Load test: {run.protocol}, {summary['arrival']}, workload {run.preset}, {summary['started']}"
    table = report.markdown(summary, f"# {title}")
    (out / "summary.md").write_text(table)
    if any(lv["requests"] for lv in summary["levels"]):
        report.chart({f"Triton {run.protocol}": summary}, out / "chart.png")
    print(table)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print("loadtest:", "passed" if not problems else "FAILED", f"({out / 'summary.json'})", flush=True)
    return 0 if not problems else 1
