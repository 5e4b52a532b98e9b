"""The serving processes step below the engine in priority (maverick/serving/priority.py): every
thread of the calling process, those it starts later too, and nothing outside it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from maverick.serving import priority

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading
    from maverick.serving.priority import yield_to_engine

    def nice(tid):
        return os.getpriority(os.PRIO_PROCESS, tid)

    stop = threading.Event()
    before = threading.Thread(target=stop.wait)
    before.start()
    start = nice(0)
    new = yield_to_engine(int(sys.argv[1]))
    after = threading.Thread(target=lambda: print(json.dumps({
        "start": start, "new": new, "main": nice(0), "before": nice(before.native_id),
        "after": nice(threading.get_native_id()),
        "all": sorted({nice(int(t)) for t in os.listdir("/proc/self/task")}),
    })))
    after.start(); after.join(); stop.set(); before.join()
    """
)


def _run(steps: int, env: dict | None = None) -> dict:
    import json

    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(steps)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread niceness is read from procfs")
def test_every_thread_steps_down_and_new_threads_follow():
    got = _run(7)
    want = min(priority.MAX_NICE, got["start"] + 7)
    assert got["new"] == got["main"] == got["before"] == got["after"] == want
    assert got["all"] == [want]
    assert os.getpriority(os.PRIO_PROCESS, 0) == got["start"]  # the caller of the child is untouched


def test_zero_steps_changes_nothing():
    got = _run(0)
    assert got["new"] == got["main"] == got["before"] == got["start"]


@pytest.mark.parametrize("raw", ["ten", "-1", "20"])
def test_a_bad_setting_is_refused_with_its_name(monkeypatch, raw):
    monkeypatch.setenv(priority.ENV, raw)
    with pytest.raises(ValueError, match=priority.ENV):
        priority.serving_nice()
