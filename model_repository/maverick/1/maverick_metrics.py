"""The engine's Prometheus metrics, served on Triton's metrics port next to nv_inference_*.

Gauges and counters follow the engine's stats. The latency histograms (TTFT, inter-token latency)
are counted here and published as their Prometheus series — `<name>_bucket{le="..."}`
(cumulative), `<name>_sum`, `<name>_count` — each a Triton counter, so `histogram_quantile()` works
on them as on any histogram. Not `Metric.observe()` per sample: every metric call is a round trip
to tritonserver during which the stub holds the GIL (the binding does not release it), so one call
per token stalled the engine thread and cost streaming throughput (see docs/performance.md's
record). A thread publishes everything every half second: a few dozen calls per period, whatever
the load.
"""

import bisect
import math
import threading

import triton_python_backend_utils as pb_utils

STATS_PERIOD_S = 0.5
TTFT_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]

_GAUGES = {
    "num_running": ("maverick_num_requests_running", "Requests in the running batch"),
    "num_waiting": ("maverick_num_requests_waiting", "Requests waiting to be scheduled"),
    "kv_blocks_used": ("maverick_kv_cache_blocks_used", "KV cache blocks in use"),
    "kv_blocks_free": ("maverick_kv_cache_blocks_free", "KV cache blocks free"),
    "prefix_cache_hit_rate": (
        "maverick_prefix_cache_hit_rate",
        "Share of prompt tokens served by the prefix cache",
    ),
    "engine_up": (
        "maverick_engine_up",
        "1 while the engine process serves, 0 while it is down or restarting",
    ),
}
_COUNTERS = {
    "prompt_tokens_total": ("maverick_prompt_tokens_total", "Prompt tokens received"),
    "generated_tokens_total": ("maverick_generation_tokens_total", "Tokens generated"),
    "prefix_cache_hit_tokens_total": (
        "maverick_prefix_cache_hit_tokens_total",
        "Prompt tokens served from the prefix cache",
    ),
    "num_preemptions": ("maverick_preemptions_total", "Sequences preempted for KV space"),
    "engine_restarts": ("maverick_engine_restarts_total", "Times the engine process was started again"),
}


def instance_labels(args: dict) -> dict[str, str]:
    """The labels of one instance's series: replicas (cpu-2x, h100x8-2xtp4) each publish their own
    instead of overwriting one gauge. Not `instance`, which Prometheus sets to the scrape target."""
    return {
        "model": args["model_name"],
        "version": args["model_version"],
        "model_instance": args["model_instance_name"],
    }


class EngineMetrics:
    def __init__(self, engine, labels: dict[str, str]):
        self.engine = engine
        self.families, self.gauges, self.counters, self.last = [], {}, {}, {}
        for key, (name, doc) in _GAUGES.items():
            self.gauges[key] = self._family(name, doc, pb_utils.MetricFamily.GAUGE).Metric(labels=labels)
        for key, (name, doc) in _COUNTERS.items():
            family = self._family(name, doc, pb_utils.MetricFamily.COUNTER)
            self.counters[key] = family.Metric(labels=labels)
        self.ttft = LatencyHistogram(
            self._family, "maverick_time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS, labels
        )
        self.itl = LatencyHistogram(
            self._family, "maverick_inter_token_latency_seconds", "Time between tokens", ITL_BUCKETS, labels
        )
        # (request id, choice) -> time of its last token (request loop only)
        self._previous: dict[tuple[str, int], float] = {}
        self._samples: list[tuple[LatencyHistogram, float]] = []  # not yet counted (metrics thread)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="maverick-metrics", daemon=True)
        self._thread.start()

    def _family(self, name, doc, kind):
        family = pb_utils.MetricFamily(name=name, description=doc, kind=kind)
        self.families.append(family)
        return family

    def observe(self, out):
        """Latencies of one engine output (first token, then the gaps between tokens)."""
        times = out.token_times
        if not times:
            return
        samples = []
        # the request's first token: choice 0's (the others start from its computed prompt)
        if out.index == 0 and out.first_token_time is not None and times[0] == out.first_token_time:
            samples.append((self.ttft, out.first_token_time - out.arrival_time))
        key = (out.request_id, out.index)  # each choice of an n > 1 request has its own gaps
        previous = self._previous.get(key)
        for t in times:
            if previous is not None:
                samples.append((self.itl, t - previous))
            previous = t
        self._samples += samples  # one list operation: atomic under the GIL
        if out.finished:
            self._previous.pop(key, None)
        else:
            self._previous[key] = previous

    def _poll(self):
        while not self._stop.wait(STATS_PERIOD_S):
            samples, self._samples = self._samples, []
            for histogram, value in samples:
                histogram.count(value)
            self.ttft.publish()
            self.itl.publish()
            stats = self.engine.stats()
            for key, gauge in self.gauges.items():
                gauge.set(float(stats.get(key, 0)))
            restarts = stats.get("engine_restarts", 0.0)
            if restarts != self.last.get("engine_restarts", 0.0):
                # a new engine process counts from 0: its totals add to the series, not replace them
                self.last = {"engine_restarts": self.last.get("engine_restarts", 0.0)}
            for key, counter in self.counters.items():
                value = float(stats.get(key, 0))
                if value > self.last.get(key, 0.0):
                    counter.increment(value - self.last.get(key, 0.0))
                    self.last[key] = value

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)


class LatencyHistogram:
    """A Prometheus histogram counted in this process and published as its counter series."""

    def __init__(self, family, name: str, doc: str, bounds: list[float], labels: dict[str, str]):
        self.bounds = [*bounds, math.inf]
        counter = pb_utils.MetricFamily.COUNTER
        buckets = family(f"{name}_bucket", f"{doc}: samples <= le (cumulative)", counter)
        self.buckets = [buckets.Metric(labels={**labels, "le": _le(b)}) for b in self.bounds]
        self.sum = family(f"{name}_sum", f"{doc}: sum of the samples", counter).Metric(labels=labels)
        self.total = family(f"{name}_count", f"{doc}: number of samples", counter).Metric(labels=labels)
        self.new = [0] * len(self.bounds)  # samples per bucket (not cumulative) since the last publish
        self.new_sum = 0.0

    def count(self, value: float) -> None:
        self.new[bisect.bisect_left(self.bounds, value)] += 1
        self.new_sum += value

    def publish(self) -> None:
        if not any(self.new):
            return
        cumulative = 0
        for metric, n in zip(self.buckets, self.new, strict=True):
            cumulative += n
            if cumulative:
                metric.increment(cumulative)
        self.total.increment(cumulative)
        self.sum.increment(self.new_sum)
        self.new, self.new_sum = [0] * len(self.bounds), 0.0


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)
