"""A liveness check that means it: the launcher asks the whole stack for one token, on an interval.

Triton's `/v2/health/live` answers 200 as long as the server process runs, also when a Python
backend stub is dead or every request hangs. This probe sends a real one-token request through the
ensemble (preprocessing, the engine, postprocessing) and calls the stack wedged when, several times
in a row, no answer comes within the timeout, the server cannot be reached, or Triton reports a
stub unhealthy. An error answered promptly is not a hang: the engine restarting after a crash
answers UNAVAILABLE at once, and the supervisor is already on it; only when such errors last longer
than `unavailable_limit_s` does the probe give up on it too.

When the stack is wedged the launcher stops the server and exits non-zero, so `make serve` ends
and a container (restart policy, Kubernetes) starts afresh.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

PROBE = {"text_input": "ping", "max_tokens": 1, "temperature": 0.0}
# Triton's words for a Python backend stub that died (the request never reaches our code)
STUB_DEAD = ("is not healthy", "Stub process")


@dataclass(frozen=True)
class LivenessPolicy:
    interval_s: float = 10.0  # between probes; 0 turns the probe off
    timeout_s: float = 60.0  # one probe's answer, including its wait in the queue under load
    failures: int = 3  # consecutive wedged probes before the server is stopped
    unavailable_limit_s: float = 900.0  # errors for this long in a row also count (a 400 GB reload fits)

    def __post_init__(self) -> None:
        if self.interval_s < 0 or self.timeout_s <= 0 or self.failures < 1 or self.unavailable_limit_s <= 0:
            raise ValueError(f"invalid liveness policy: {self}")


def probe(http_url: str, timeout_s: float) -> tuple[str, str]:
    """One request through the stack: ("ok" | "error" | "wedged", detail). "error": the server
    answered promptly with an error (alive, not serving); "wedged": no answer, or a dead stub."""
    body = json.dumps(PROBE).encode()
    request = urllib.request.Request(
        f"http://{http_url}/v2/models/ensemble/generate",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            r.read()
            return "ok", ""
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        wedged = any(words in detail for words in STUB_DEAD)
        return ("wedged" if wedged else "error"), f"HTTP {e.code}: {detail}"
    except (OSError, TimeoutError) as e:  # refused, reset, or no answer within the timeout
        return "wedged", f"{type(e).__name__}: {e}"


class LivenessProbe:
    """Probes `http_url` on a thread once `ready()` first holds; calls `on_wedged(reason)` once."""

    def __init__(
        self,
        http_url: str,
        policy: LivenessPolicy,
        ready: Callable[[], bool],
        on_wedged: Callable[[str], None],
    ):
        self.http_url, self.policy = http_url, policy
        self._ready, self._on_wedged = ready, on_wedged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness-probe", daemon=True)

    def start(self) -> LivenessProbe:
        if self.policy.interval_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._ready():  # a checkpoint loads first (minutes for 400 GB)
            if self._stop.wait(1.0):
                return
        wedged, erring_since = 0, None
        while not self._stop.wait(self.policy.interval_s):
            outcome, detail = probe(self.http_url, self.policy.timeout_s)
            if self._stop.is_set():
                return
            now = time.monotonic()
            if outcome == "ok":
                wedged, erring_since = 0, None
                continue
            if outcome == "error":
                erring_since = erring_since or now
                if now - erring_since < self.policy.unavailable_limit_s:
                    log.warning("liveness probe: answered with an error (%s)", detail)
                    continue
            wedged += 1
            log.error("liveness probe %d/%d failed: %s", wedged, self.policy.failures, detail)
            if wedged >= self.policy.failures:
                self._on_wedged(detail)
                return
