"""The machine a benchmark runs on: what it is, and how busy other processes keep it.

On a shared machine a side that runs while something else computes is slowed; these helpers let
scripts/bench_engine.py wait for quiet, measure what other processes used during each run, and say so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BUSY_WARN = 0.25  # cores' worth of CPU used by other processes during a run: its numbers are suspect


# -- CPU sharing ---------------------------------------------------------------------------------
def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (steal included), from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time of a run and how many cores other processes kept busy meanwhile: on a shared
    machine a side that runs while something else computes is slowed, far more than its share
    when torch's threads wait for each other."""

    def __enter__(self) -> Meter:
        self.busy0, self.cpu0, self.t0 = machine_busy_s(), time.process_time(), time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.monotonic() - self.t0
        busy1, cpu1 = machine_busy_s(), time.process_time()
        self.other_cores = (
            None
            if busy1 is None or self.busy0 is None
            else max(0.0, (busy1 - self.busy0) - (cpu1 - self.cpu0)) / self.wall
        )


def wait_for_quiet(max_wait: float) -> float | None:
    """Wait (up to max_wait seconds) until other processes leave the cores alone for a second;
    returns the cores they used in the last second."""
    if max_wait <= 0:
        return None
    deadline = time.monotonic() + max_wait
    while True:
        with Meter() as m:
            time.sleep(1.0)
        if m.other_cores is None or m.other_cores < BUSY_WARN or time.monotonic() >= deadline:
            return m.other_cores


# -- environment ---------------------------------------------------------------------------------
def machine_info(args, threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    import transformers

    device = torch.device(args.device)
    return {
        "cpu": cpu,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": args.dtype,
        "experts": args.experts,
        "hf_attn_implementation": args.hf_attn,
        "git": commit,
    }


def load_avg() -> list[float] | None:
    # Other processes on the same cores make both sides slower and noisier; the numbers say so.
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None
