"""Soak: a long load test at saturation that also watches the server's memory (what `make soak` runs).

    python -m loadtest.soak [--http-port 8000] [--metrics-port 8002] [--warmup-for 2m]
                            [--max-rss-growth 1.0] [loadtest arguments: --users 16 --duration 10m ...]

Runs `python -m loadtest` (every argument it does not know goes there) against a running server
while sampling the resident memory of each of the server's processes (tritonserver, the three
stubs, the engine process) every few seconds. After the run it waits for the engine to go idle and
writes soak.json and soak.md into the load test's --out folder: each process's RSS when the
warm-up ends and at the end, and the growth scaled to percent per 10 minutes. Exit status 0 when the
load test passed (no errors by default), the KV cache is back to 0 blocks and no process grew more
than --max-rss-growth percent per 10 minutes; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from loadtest import run as loadtest_run
from loadtest.cli import seconds
from loadtest.processes import role

SAMPLE_S = 5.0
IDLE_TIMEOUT_S = 30.0


def server_processes(http_port: int) -> dict[str, psutil.Process]:
    """The tritonserver serving on http_port and its descendants, by role."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "bin/tritonserver" in cmd and f"--http-port={http_port} " in f"{cmd} ":
            procs = {"tritonserver": proc}
            for child in proc.children(recursive=True):
                name = role(child)
                if name and name not in procs:
                    procs[name] = child
            return procs
    raise SystemExit(f"no tritonserver with --http-port={http_port} on this machine")


class RssSampler:
    """RSS of each process every SAMPLE_S seconds, on a thread: [(seconds since start, {role: bytes})]."""

    def __init__(self, procs: dict[str, psutil.Process]):
        self.procs, self.samples = procs, []
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        rss = {}
        for name, proc in self.procs.items():
            try:
                rss[name] = proc.memory_info().rss
            except psutil.Error:
                rss[name] = None  # it died: reported as such
        self.samples.append((time.monotonic() - self._start, rss))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(SAMPLE_S):
            self._sample()


def engine_metric(metrics_port: int, name: str) -> float:
    """A maverick_* gauge summed over the model's instances."""
    body = urllib.request.urlopen(f"http://localhost:{metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rpartition(" ")[2])
    return total


def growth(samples: list[tuple[float, dict]], warmup_s: float) -> dict[str, dict]:
    """Each process's RSS at the first sample after the warm-up and at the last, and the growth
    in percent per 10 minutes between them."""
    after = [s for s in samples if s[0] >= warmup_s] or samples[-1:]
    (t0, first), (t1, last) = after[0], samples[-1]
    out = {}
    for name in last:
        a, b = first.get(name), last[name]
        per_10min = None
        if a and b is not None and t1 > t0:
            per_10min = 100.0 * (b - a) / a * 600.0 / (t1 - t0)
        out[name] = {
            "rss_after_warmup_mb": a and a / 2**20,
            "rss_end_mb": b and b / 2**20,
            "pct_per_10min": per_10min,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--warmup-for", type=seconds, default=120.0, help="RSS growth is measured after this")
    ap.add_argument("--max-rss-growth", type=float, default=1.0, help="percent per 10 minutes, per process")
    ap.add_argument("--out", type=Path, default=Path("results/loadtest/soak"))
    args, rest = ap.parse_known_args(argv)
    procs = server_processes(args.http_port)
    with RssSampler(procs) as sampler:
        rc = loadtest_run.main(["--http-port", str(args.http_port), "--out", str(args.out), *rest])
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            running = engine_metric(args.metrics_port, "maverick_num_requests_running")
            kv_used = engine_metric(args.metrics_port, "maverick_kv_cache_blocks_used")
            if running == 0 and kv_used == 0:
                break
            time.sleep(1.0)
    rss = growth(sampler.samples, args.warmup_for)
    problems = [] if rc == 0 else ["the load test failed (see summary.json)"]
    if kv_used != 0 or running != 0:
        problems.append(
            f"not idle {IDLE_TIMEOUT_S:.0f} s after the load: {running} running, {kv_used} KV blocks"
        )
    for name, r in rss.items():
        if r["rss_end_mb"] is None:
            problems.append(f"{name} died during the soak")
        elif r["pct_per_10min"] is not None and r["pct_per_10min"] > args.max_rss_growth:
            problems.append(
                f"{name} grew {r['pct_per_10min']:.2f}% per 10 min (limit {args.max_rss_growth}%)"
            )
    series = [
        {"t_s": round(t, 1), **{k: v and round(v / 2**20, 2) for k, v in sample.items()}}
        for t, sample in sampler.samples
    ]
    report = {
        "rss": rss,
        "kv_blocks_used_after": kv_used,
        "running_after": running,
        "problems": problems,
        "rss_mb_series": series,  # every sample, to tell a warm-up from a leak
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    lines = [
        "| process | RSS after warm-up (MiB) | RSS at end (MiB) | growth (%/10 min) |",
        "|---|---|---|---|",
    ]
    for name, r in rss.items():
        cells = [r["rss_after_warmup_mb"], r["rss_end_mb"], r["pct_per_10min"]]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
    table = "\n".join(lines) + f"\n\nKV blocks used after the load: {kv_used:g}\n"
    (args.out / "soak.md").write_text(table)
    print(table)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print("soak:", "passed" if not problems else "FAILED", f"({args.out / 'soak.json'})", flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
