"""The processes of a load-test run: which is which (tritonserver, a Python backend stub, the engine
process, Locust, the direct side), their CPU time over a run, and, for a record with the engine
apart, which CPUs they run on.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import psutil

STEPS = ("preprocessing", "maverick", "postprocessing")


def role(proc: psutil.Process) -> str | None:
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return None
    for step in STEPS:
        if f"model_repository/{step}/1/model.py" in cmd:
            return f"stub:{step}"
    if "maverick.engine.engine_core" in cmd:
        return "engine core"  # the maverick model's engine process
    if "bin/tritonserver" in cmd:
        return "tritonserver"
    if "-m locust" in cmd:
        return "locust"
    if "loadtest.engine_direct" in cmd:
        return "engine direct"
    return None


def parse_cpus(text: str) -> set[int]:
    """A CPU list as taskset writes it: "0", "0,2", "0-3,6"."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, dash, hi = part.partition("-")
            first = int(lo)
            last = int(hi) if dash else first
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a CPU list like 0 or 0-3,6, got {text!r}") from None
    if not cpus:
        raise argparse.ArgumentTypeError("no CPUs given")
    return cpus


def pin_threads(proc: psutil.Process, cpus: set[int]) -> None:
    """Every thread of a process onto these CPUs (affinity is per thread; new threads inherit
    their creator's)."""
    for thread in proc.threads():
        try:
            if os.sched_getaffinity(thread.id) != cpus:
                os.sched_setaffinity(thread.id, cpus)
        except OSError:
            pass  # the thread has ended


class CpuSampler(threading.Thread):
    """CPU seconds (user + system) of every process below the given roots, by role, over time.
    With engine_cpus, each engine process it finds is pinned to those CPUs (all its threads, at
    every sample: it may start threads later), and the CPUs of every role are noted."""

    def __init__(self, period: float = 0.5, engine_cpus: set[int] | None = None):
        super().__init__(daemon=True)
        self.period, self.roots, self.engine_cpus = period, [], engine_cpus
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.affinity: dict[str, set[int]] = {}  # role -> the CPUs its processes ran on
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        last: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds when last seen)
        while not self._done.is_set():
            procs = me.children(recursive=True) + [
                psutil.Process(p) for p in self.roots if psutil.pid_exists(p)
            ]
            for proc in procs:
                name = role(proc)
                try:
                    if name is not None and self.engine_cpus is not None:
                        if name == "engine core":
                            pin_threads(proc, self.engine_cpus)
                        self.affinity.setdefault(name, set()).update(proc.cpu_affinity())
                    t = proc.cpu_times()
                except psutil.Error:
                    continue
                if name is not None:
                    last[proc.pid] = (name, t.user + t.system)
            cpu: dict[str, float] = {}
            for name, seconds_ in last.values():  # processes that exited keep their last count
                cpu[name] = cpu.get(name, 0.0) + seconds_
            self.samples.append((time.time(), cpu))
            self._done.wait(self.period)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def at(self, wall: float) -> dict[str, float]:
        """CPU seconds by role at a wall time (the nearest sample at or after it)."""
        for t, cpu in self.samples:
            if t >= wall:
                return cpu
        return self.samples[-1][1] if self.samples else {}

    def cores(self, start: float, end: float) -> dict[str, float]:
        a, b = self.at(start), self.at(end)
        return {k: (b[k] - a.get(k, 0.0)) / (end - start) for k in sorted(b)} if end > start else {}
