"""The performance record (docs/performance.md): the concurrency sweep through Triton, the same
workload sent to the engine directly, side by side, and where the CPU goes.

    python -m loadtest.record [--levels 1,2,4,8,16,32] [--duration 25] [--warmup 5] [--workload chat]
                              [--top-repeats 2] [--model-dir models/tiny-maverick]
                              [--engine key=value ...] [--engine-cpus 0]
                              [--out results/loadtest/record]

1. Starts a tritonserver on the checkpoint (free ports, its own build folder), as `make serve` would.
2. `python -m loadtest` sweeps the levels over gRPC streaming (the primary protocol). Locust runs
   at the lowest CPU priority (--client-nice 19): on a small machine its CPU is taken from the
   server otherwise, which the engine-direct side (in-process users) does not pay.
3. Diagnostics at the top level, to split the overhead: the same over HTTP /generate_stream, and
   over gRPC with stream=false (one response per request instead of one per token); then a second
   server whose engine has stream_interval=4 (a response per 4 tokens), over gRPC streaming.
4. Stops the server, then `python -m loadtest.engine_direct` runs the same workload file and levels.
5. Repeats 1. to 4. --top-repeats more times at the top level only (a shared machine drifts
   between minutes: one pair is not enough to state the overhead).
6. Writes record.md / record.json (both sides per level, the overhead in %, CPU use per process)
   and chart.png (both sides).

Meanwhile it samples the CPU time of every process involved (tritonserver, each Python backend
stub, the Locust process, the direct engine) twice a second; per level, a process's cores are its
CPU seconds over the level's wall time. The load generator shares the machine with the server: its
share is reported, not hidden. With --engine-cpus the engine processes (of both sides) have those
CPUs to themselves and everything else runs on the rest: Triton's relay and the load generator then
cost the engine no CPU time, as on a GPU node with cores to spare, and what is left of the overhead
is the relay's own latency and capacity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest import report
from loadtest.cli import seconds
from loadtest.machine import cpu_name, gpu_name
from loadtest.processes import CpuSampler, parse_cpus
from server.launch import engine_arg

ROOT = Path(__file__).resolve().parents[1]
STREAM_INTERVAL = 4  # the diagnostic server's engine stream_interval


@dataclass(frozen=True)
class Load:
    """What each load-test run of a record or a comparison sends: every server gets the same."""

    model_dir: Path  # the checkpoint served, and the tokenizer that counts prompt tokens
    workload: str  # the preset's name
    duration: float  # seconds per level
    warmup: float  # seconds not measured at the start of each level
    client_nice: int  # the Locust process's niceness

    def loadtest_args(self) -> list[str]:
        """`python -m loadtest`'s options for this load."""
        return ["--duration", str(self.duration), "--warmup", str(self.warmup), "--workload", self.workload,
                "--tokenizer", str(self.model_dir)]  # fmt: skip


def level_windows(records: Path, hold: float) -> list[tuple[int, float, float]]:
    """(level, start wall, end wall) from a run's level records: while it was held, not the drain."""
    levels = report.read_records(records)[1]
    starts = [lv["wall"] for lv in levels] + [math.inf]
    return [(lv["level"], starts[i], min(starts[i + 1], starts[i] + hold)) for i, lv in enumerate(levels)]


def run(cmd: list[str], log: Path, niceness: int = 0) -> int:
    print("$", f"(nice {niceness})" if niceness else "", " ".join(cmd[1:]), flush=True)
    with open(log, "w") as f:
        return subprocess.run(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(niceness)
        ).returncode


def serve_and_load(
    load: Load, sampler: CpuSampler, setting: dict[str, str], levels: str, out: Path, build: Path
) -> tuple[int, int]:
    """A fresh tritonserver whose engine has these settings (rendered into `build`), `python -m
    loadtest` over gRPC streaming at `levels` into `out`, then the server stopped; the sampler
    follows the server's processes. Returns the exit codes of the load test and of the server."""
    from server.launch import RunningServer, ServeConfig, free_ports

    http, grpc, metrics = free_ports(3)
    out.mkdir(parents=True, exist_ok=True)
    build.mkdir(parents=True, exist_ok=True)
    server = RunningServer(
        ServeConfig(load.model_dir, http, grpc, metrics, setting, build), build / "server.log"
    )
    sampler.roots.append(server.proc.pid)
    cmd = [sys.executable, "-m", "loadtest", "--http-port", str(http), "--grpc-port", str(grpc),
           "--levels", levels, *load.loadtest_args(), "--protocol", "grpc", "--out", str(out)]  # fmt: skip
    try:
        rc = run(cmd, out / "run.log", load.client_nice)
    finally:
        rc_server = server.stop()
    return rc, rc_server


def paired_run(
    rec: RecordSettings, sampler: CpuSampler, out: Path, levels: str, diagnostics: bool
) -> tuple[dict[str, Path], dict[str, int]]:
    """One paired measurement: a fresh tritonserver swept over `levels` (plus the diagnostics at
    the top level), stopped, then the same workload file on the engine directly. Returns each
    run's folder and the exit codes."""
    from server.launch import RunningServer, ServeConfig, free_ports

    load = rec.load
    top = levels.split(",")[-1]
    common = load.loadtest_args()
    http, grpc, metrics = free_ports(3)
    build = out / "server"  # not build/: a `make serve` may be running from there
    build.mkdir(parents=True, exist_ok=True)
    cfg = ServeConfig(load.model_dir, http, grpc, metrics, dict(rec.engine), build_dir=build)
    print(f"starting tritonserver on {load.model_dir} (HTTP {http}, gRPC {grpc})", flush=True)
    server = RunningServer(cfg, cfg.build_dir / "server.log")
    sampler.roots = [server.proc.pid]
    target = ["--http-port", str(http), "--grpc-port", str(grpc)]
    runs = {"triton grpc": (out / "triton-grpc", ["--levels", levels, "--protocol", "grpc"])}
    if diagnostics:
        runs["triton http"] = (out / f"triton-http-{top}", ["--levels", top, "--protocol", "http"])
        runs["triton grpc stream=false"] = (
            out / f"triton-grpc-nostream-{top}",
            ["--levels", top, "--no-stream"],
        )
    rcs = {}
    try:
        for name, (path, extra) in runs.items():
            path.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "loadtest", *target, *common, *extra, "--out", str(path)]
            rcs[name] = run(cmd, path / "run.log", load.client_nice)
    finally:
        rcs["tritonserver"] = server.stop()
    if diagnostics:
        # A second server whose engine streams every STREAM_INTERVAL tokens: what the per-response
        # cost is, read off the same workload with a quarter of the responses.
        name = f"triton grpc stream_interval={STREAM_INTERVAL}"
        path = out / f"triton-grpc-interval{STREAM_INTERVAL}-{top}"
        setting = {**dict(rec.engine), "stream_interval": str(STREAM_INTERVAL)}
        rcs[name], rcs["tritonserver (interval)"] = serve_and_load(
            load, sampler, setting, top, path, out / "server-interval"
        )
        runs[name] = (path, [])
    direct = out / "direct"
    direct.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "loadtest.engine_direct",
           "--workload-file", str(out / "triton-grpc" / "workload.json"), "--levels", levels,
           "--duration", str(load.duration), "--warmup", str(load.warmup),
           "--model-dir", str(load.model_dir), "--out", str(direct)]  # fmt: skip
    if rec.engine:
        cmd += ["--engine", *(f"{k}={v}" for k, v in rec.engine)]
    rcs["engine direct"] = run(cmd, direct / "run.log")
    return {**{n: p for n, (p, _) in runs.items()}, "engine direct": direct}, rcs


@dataclass(frozen=True)
class Pinning:
    """The engines' CPUs and everyone else's, apart (as on a GPU node with cores for the relay)."""

    engine: frozenset[int]
    others: frozenset[int]


@dataclass(frozen=True)
class RecordSettings:
    """The record as the command line asks for it."""

    load: Load
    levels: tuple[int, ...]  # users, in turn; the last is the top level
    engine: tuple[tuple[str, str], ...]  # (key, value) engine settings of both sides
    diagnostics: bool  # the top level over HTTP, stream=false and stream_interval too
    top_repeats: int  # extra paired runs at the top level
    pinning: Pinning | None  # None: every process on every CPU
    out: Path


def parse(argv: list[str] | None = None) -> RecordSettings:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="1,2,4,8,16,32")
    ap.add_argument("--duration", type=seconds, default=25.0, help="per level")
    ap.add_argument("--warmup", type=seconds, default=5.0)
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny-maverick")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest" / "record")
    ap.add_argument("--no-diagnostics", dest="diagnostics", action="store_false")
    ap.add_argument(
        "--engine",
        type=engine_arg,
        nargs="*",
        default=[],
        help="engine settings (key=value) for both sides: the served model's and the direct engine's",
    )
    ap.add_argument(
        "--client-nice",
        type=int,
        default=19,
        help="niceness of the Locust process: it shares the cores with the server, and the direct "
        "side has no separate client to pay for (0: compete on equal terms)",
    )
    ap.add_argument(
        "--top-repeats",
        type=int,
        default=2,
        help="extra paired runs (fresh server, then direct) at the top level: on a shared machine one "
        "pair is not enough to state the overhead",
    )
    ap.add_argument(
        "--engine-cpus",
        type=parse_cpus,
        help="pin the engine processes (both sides) to these CPUs and run everything else "
        "(tritonserver, its stubs, Locust, the direct side's client) on the others, as on a GPU node "
        "where the relay has cores of its own; e.g. 0",
    )
    args = ap.parse_args(argv)
    pinning = None
    if args.engine_cpus is not None:
        available = os.sched_getaffinity(0)
        others = available - args.engine_cpus
        if not args.engine_cpus <= available or not others:
            ap.error(f"--engine-cpus must leave CPUs for the rest (this process may use {sorted(available)})")
        pinning = Pinning(frozenset(args.engine_cpus), frozenset(others))
    return RecordSettings(
        load=Load(args.model_dir, args.workload, args.duration, args.warmup, args.client_nice),
        levels=tuple(int(x) for x in args.levels.split(",")),
        engine=tuple(args.engine),
        diagnostics=args.diagnostics,
        top_repeats=args.top_repeats,
        pinning=pinning,
        out=args.out,
    )


def measure(rec: RecordSettings) -> dict:
    """Every paired run, the CPU sampled meanwhile; returns the record (what record.json holds)."""
    pinning = rec.pinning
    if pinning is not None:
        os.sched_setaffinity(0, pinning.others)  # inherited by every process started from here on
    out, load = rec.out, rec.load
    out.mkdir(parents=True, exist_ok=True)
    levels = ",".join(map(str, rec.levels))
    top = rec.levels[-1]
    sampler = CpuSampler(engine_cpus=None if pinning is None else set(pinning.engine))
    sampler.start()
    paths, rcs = paired_run(rec, sampler, out, levels, rec.diagnostics)
    pairs = [(paths["triton grpc"], paths["engine direct"])]
    for i in range(rec.top_repeats):
        extra, extra_rcs = paired_run(rec, sampler, out / f"repeat-{i + 1}", str(top), False)
        pairs.append((extra["triton grpc"], extra["engine direct"]))
        rcs.update({f"{name} (repeat {i + 1})": rc for name, rc in extra_rcs.items()})
    sampler.stop()

    summaries, cpu = {}, {}
    for name, path in paths.items():
        summaries[name] = json.loads((path / "summary.json").read_text())
        cpu[name] = {
            level: sampler.cores(start + load.warmup, end)
            for level, start, end in level_windows(path / "records.jsonl", load.duration)
        }
    top_pairs = []
    for tri, dire in pairs:
        t, d = (_by_level(json.loads((p / "summary.json").read_text())).get(top) for p in (tri, dire))
        if t and d:
            top_pairs.append({"triton": t["output_tokens_per_s"], "direct": d["output_tokens_per_s"]})
    cpus = None if pinning is None else {"engine": sorted(pinning.engine), "others": sorted(pinning.others)}
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "gpu": gpu_name(),
            "python": platform.python_version(),
        },
        "engine": dict(rec.engine),
        "git": _git(),
        "levels": list(rec.levels),
        "level_time_s": load.duration,
        "warmup_s": load.warmup,
        "workload": summaries["triton grpc"]["workload"],
        "exit_codes": rcs,
        "summaries": summaries,
        "cpu_cores": {k: {str(lv): c for lv, c in v.items()} for k, v in cpu.items()},
        "top_level_pairs": top_pairs,
        "client_nice": load.client_nice,
        "cpus": cpus,
        "cpus_seen": {role: sorted(c) for role, c in sampler.affinity.items()} if cpus else None,
    }


def write(record: dict, out: Path) -> None:
    """record.json, record.md (also printed) and chart.png into `out`."""
    (out / "record.json").write_text(json.dumps(record, indent=2))
    text = record_markdown(record)
    (out / "record.md").write_text(text)
    summaries = record["summaries"]
    report.chart(
        {"Triton (gRPC stream)": summaries["triton grpc"], "engine direct": summaries["engine direct"]},
        out / "chart.png",
    )
    print(text)


def main(argv: list[str] | None = None) -> int:
    rec = parse(argv)
    record = measure(rec)
    write(record, rec.out)
    failed = {k: v for k, v in record["exit_codes"].items() if v != 0}
    if failed:
        print(f"FAIL: non-zero exit codes {failed}", file=sys.stderr)
    return 1 if failed else 0


def _git() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _by_level(summary: dict) -> dict[int, dict]:
    return {lv["level"]: lv for lv in summary["levels"]}


def _settings(rec: dict) -> str:
    engine = rec.get("engine") or {}
    return (" with " + " ".join(f"{k}={v}" for k, v in engine.items())) if engine else ""


def _pinning(rec: dict) -> str:
    cpus = rec.get("cpus")
    if not cpus:
        return ""
    names = {k: ",".join(map(str, v)) for k, v in cpus.items()}
    return (
        f"Engine processes pinned to CPU {names['engine']}; tritonserver, its stubs, Locust and the "
        f"direct side's client on CPU {names['others']}. "
    )


def record_markdown(rec: dict) -> str:
    tri, dire = _by_level(rec["summaries"]["triton grpc"]), _by_level(rec["summaries"]["engine direct"])
    w, m = rec["workload"], rec["machine"]
    lines = [
        f"{m['cpu']}, {m['cores']} cores, {m.get('gpu') or 'CPU only'}; "
        f"{rec['date']}, git {rec['git']}. Embedded tiny checkpoint, served config{_settings(rec)}. "
        f"Workload `{w['preset']}`: "
        f"input {w['input_len']} tokens, output {w['output_len']} tokens (ignore_eos), temperature "
        f"{w['temperature']}; closed loop, each level held {rec['level_time_s']:g} s, the first "
        f"{rec['warmup_s']:g} s not measured. "
        f"Triton: gRPC streaming from Locust on the same machine (nice {rec.get('client_nice', 0)}). "
        f"{_pinning(rec)}Times in ms.",
        "",
        "| users | Triton tok/s | direct tok/s | overhead | Triton req/s | direct req/s "
        "| TTFT p50 T / D | TTFT p99 T / D | ITL p50 T / D | ITL p99 T / D | errors T / D |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in rec["levels"]:
        t, d = tri.get(level), dire.get(level)
        if t is None or d is None:
            continue
        dt, tt = d["output_tokens_per_s"], t["output_tokens_per_s"]
        overhead = f"{(1 - tt / dt) * 100:.0f}%" if dt else "–"
        lines.append(
            f"| {level} | {tt:.1f} | {dt:.1f} | {overhead} "
            f"| {t['requests_per_s']:.2f} | {d['requests_per_s']:.2f} "
            f"| {report.ms(t['ttft_s']['p50'])} / {report.ms(d['ttft_s']['p50'])} "
            f"| {report.ms(t['ttft_s']['p99'])} / {report.ms(d['ttft_s']['p99'])} "
            f"| {report.ms(t['itl_s']['p50'])} / {report.ms(d['itl_s']['p50'])} "
            f"| {report.ms(t['itl_s']['p99'])} / {report.ms(d['itl_s']['p99'])} "
            f"| {t['errors']} / {d['errors']} |"
        )
    pairs = rec.get("top_level_pairs") or []
    if len(pairs) > 1:
        overheads = sorted(1 - p["triton"] / p["direct"] for p in pairs)
        runs = ", ".join(f"{p['triton']:.0f} / {p['direct']:.0f}" for p in pairs)
        lines += [
            "",
            f"At {rec['levels'][-1]} users, {len(pairs)} paired runs (each: a fresh server, then the "
            f"engine directly), Triton / direct tok/s: {runs}; overhead median "
            f"{statistics.median(overheads) * 100:.0f}% (range {overheads[0] * 100:.0f}% to "
            f"{overheads[-1] * 100:.0f}%).",
        ]
    roles = [
        "engine core",
        "stub:maverick",
        "tritonserver",
        "stub:preprocessing",
        "stub:postprocessing",
        "locust",
    ]
    lines += [
        "",
        "CPU cores in use per process (CPU seconds / wall seconds over each level after its warm-up):",
        "",
        "| run | users | out tok/s | "
        + " | ".join(r.replace("stub:", "") for r in roles)
        + " | engine direct |",
        "|---|---:|---:|" + "---:|" * (len(roles) + 1),
    ]
    for name, per_level in rec["cpu_cores"].items():
        summary = _by_level(rec["summaries"][name])
        for level, cores in per_level.items():
            tps = summary.get(int(level), {}).get("output_tokens_per_s", 0.0)
            cells = " | ".join(f"{cores.get(r, 0.0):.2f}" for r in [*roles, "engine direct"])
            lines.append(f"| {name} | {level} | {tps:.1f} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
