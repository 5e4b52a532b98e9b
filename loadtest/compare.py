"""Which engine settings serve faster on this machine: fresh servers, one per setting, taking turns
at one load level.

    python -m loadtest.compare --engine cpu_threads=1 --engine cpu_threads=2 [--rounds 2] \\
        [--users 32] [--duration 25] [--warmup 5] [--workload chat] [--model-dir models/tiny-maverick] \\
        [--out results/loadtest/compare]

Each --engine is one setting (space-separated key=value overrides of the `maverick` model's
parameters, as `make serve ENGINE_ARGS=...` takes them). Every round starts a fresh server per
setting in turn and runs `python -m loadtest` against it over gRPC streaming at --users, so a
machine that drifts between minutes does not favour one side; the CPU of every process involved is
sampled as in `loadtest.record`. Writes compare.json and compare.md (each run, then the median per
setting) and exits non-zero if any run failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from loadtest.cli import seconds
from loadtest.processes import CpuSampler
from loadtest.record import Load, level_windows, serve_and_load

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("engine core", "stub:maverick", "tritonserver", "stub:postprocessing", "locust")


def parse_setting(text: str) -> dict[str, str]:
    pairs = [kv.split("=", 1) for kv in text.split()]
    if not pairs or any(len(p) != 2 or not p[0] for p in pairs):
        raise argparse.ArgumentTypeError(f"expected key=value [key=value ...], got {text!r}")
    return dict(pairs)


@dataclass(frozen=True)
class CompareSettings:
    """The comparison as the command line asks for it."""

    settings: tuple[dict[str, str], ...]  # engine overrides, one per side
    rounds: int
    users: int
    load: Load
    out: Path

    @property
    def labels(self) -> list[str]:
        """Each setting as it is named in the reports."""
        return [" ".join(f"{k}={v}" for k, v in s.items()) for s in self.settings]


def parse(argv: list[str] | None = None) -> CompareSettings:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=parse_setting, action="append", required=True, help="key=value ...")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--duration", type=seconds, default=25.0)
    ap.add_argument("--warmup", type=seconds, default=5.0)
    ap.add_argument("--workload", default="chat")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny-maverick")
    ap.add_argument("--client-nice", type=int, default=19, help="niceness of the Locust process")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "loadtest" / "compare")
    args = ap.parse_args(argv)
    if len(args.engine) < 2 or args.rounds < 1:
        ap.error("give at least two --engine settings and one round")
    load = Load(args.model_dir, args.workload, args.duration, args.warmup, args.client_nice)
    return CompareSettings(tuple(args.engine), args.rounds, args.users, load, args.out)


def measure(comparison: CompareSettings, sampler: CpuSampler, setting: dict[str, str], path: Path) -> dict:
    """One run: a fresh server with this setting at the comparison's users; its numbers and cores."""
    load = comparison.load
    rc, rc_server = serve_and_load(
        load, sampler, setting, str(comparison.users), path / "load", path / "server"
    )
    level = json.loads((path / "load" / "summary.json").read_text())["levels"][0]
    # the CPU over the measured part of the level: after its warm-up, up to the end of its hold
    [(_, start, end)] = level_windows(path / "load" / "records.jsonl", load.duration)
    cores = sampler.cores(start + load.warmup, end)
    return {
        "exit_code": rc or rc_server,
        "output_tokens_per_s": level["output_tokens_per_s"],
        "ttft_p50_s": level["ttft_s"]["p50"],
        "itl_p50_s": level["itl_s"]["p50"],
        "errors": level["errors"],
        "cores": {role: round(cores.get(role, 0.0), 3) for role in ROLES},
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['users']} users, gRPC streaming, workload `{result['workload']}`, each run "
        f"{result['duration_s']:g} s (the first {result['warmup_s']:g} s not measured), fresh server "
        "per run, settings taking turns. Cores: CPU seconds / wall seconds per process.",
        "",
        "| setting | round | tok/s | TTFT p50 ms | ITL p50 ms | errors | "
        + " | ".join(r.replace("stub:", "") for r in ROLES)
        + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(ROLES),
    ]
    for r in result["runs"]:
        cells = " | ".join(f"{r['cores'][role]:.2f}" for role in ROLES)
        lines.append(
            f"| {r['setting']} | {r['round']} | {r['output_tokens_per_s']:.1f} | {r['ttft_p50_s'] * 1e3:.1f} "
            f"| {r['itl_p50_s'] * 1e3:.1f} | {r['errors']} | {cells} |"
        )
    lines.append("")
    for label, median in result["median_tokens_per_s"].items():
        lines.append(f"- `{label}`: median {median:.1f} tok/s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    comparison = parse(argv)
    labels = comparison.labels
    sampler = CpuSampler()
    sampler.start()
    runs = []
    try:
        for rnd in range(1, comparison.rounds + 1):
            for i, (label, setting) in enumerate(zip(labels, comparison.settings, strict=True)):
                print(f"round {rnd}: {label}", flush=True)
                m = measure(comparison, sampler, setting, comparison.out / f"round{rnd}-setting{i + 1}")
                runs.append({"setting": label, "round": rnd, **m})
    finally:
        sampler.stop()
    result = {
        "users": comparison.users,
        "workload": comparison.load.workload,
        "duration_s": comparison.load.duration,
        "warmup_s": comparison.load.warmup,
        "runs": runs,
        "median_tokens_per_s": {
            label: statistics.median(r["output_tokens_per_s"] for r in runs if r["setting"] == label)
            for label in labels
        },
    }
    comparison.out.mkdir(parents=True, exist_ok=True)
    (comparison.out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (comparison.out / "compare.md").write_text(text)
    print(text)
    failed = [r for r in runs if r["exit_code"] != 0]
    if failed:
        print(f"FAIL: {len(failed)} run(s) exited non-zero", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
