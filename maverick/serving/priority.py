"""The serving processes yield the CPU to the engine loop.

Every token the engine makes is then handled by tritonserver and three Python backend stubs
(preprocessing, the `maverick` step, postprocessing), about half a millisecond of CPU per streamed
response in all. Where the machine has cores to spare this costs nothing; where it has not (a CI
box, a laptop, a GPU node whose cores something else uses), the kernel's scheduler shares a core
between the engine loop and that per-response work as equals, so the loop that makes every token
waits behind the work that relays them. The stubs therefore run niced: the engine gets its core
when it needs it, the responses wait instead, and what queues meanwhile leaves merged (flow control,
response_window.py), so the relaying gets cheaper per token exactly when CPU is short.

Each stub calls `yield_to_engine()` from `initialize()`; the `maverick` stub after it has started its
engine process, which keeps the niceness it was started with. tritonserver itself is left alone (a
stub that reniced its parent would also renice the engine processes of instances started later).
Linux keeps niceness per thread, and a new thread inherits its creator's: so every thread the
process has now is reniced, and the threads it makes later follow. Raising one's own niceness needs
no privilege.

`MAVERICK_SERVING_NICE` (set by `server.launch --serving-nice`, default SERVING_NICE; 0 turns it
off) is how many steps the stubs go down from where they started.
"""

from __future__ import annotations

import os

SERVING_NICE = 10
ENV = "MAVERICK_SERVING_NICE"
MAX_NICE = 19


def parse_serving_nice(raw: str) -> int:
    """A niceness step count as given (environment, command line): 0..MAX_NICE, 0 = off."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{raw!r}: expected a whole number of niceness steps (0 = off)") from None
    if not 0 <= value <= MAX_NICE:
        raise ValueError(f"{value}: expected 0..{MAX_NICE} niceness steps")
    return value


def serving_nice() -> int:
    try:
        return parse_serving_nice(os.environ.get(ENV, str(SERVING_NICE)))
    except ValueError as e:
        raise ValueError(f"{ENV}={e}") from None


def _threads() -> list[int]:
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no procfs: this thread only
        return [0]


def yield_to_engine(steps: int | None = None) -> int:
    """Lower this process's priority by `steps` niceness (default: `serving_nice()`), on every
    thread, from the niceness this thread has now. Returns the new niceness."""
    steps = serving_nice() if steps is None else steps
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if steps == 0:
        return base
    target = min(MAX_NICE, base + steps)
    for tid in _threads():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:  # the thread has ended since it was listed
            pass
    return target
