"""The engine's Prometheus metrics, served on Triton's metrics port next to nv_inference_*.

Gauges and counters follow the engine's stats; the latency histograms are fed from samples the
request coroutines only append to a list. A thread publishes both every half second: each metric
call is a round trip to tritonserver, and one per token on the request loop measurably slowed
streaming (see the README's performance record).
"""

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
}
_COUNTERS = {
    "prompt_tokens_total": ("maverick_prompt_tokens_total", "Prompt tokens received"),
    "generated_tokens_total": ("maverick_generation_tokens_total", "Tokens generated"),
    "prefix_cache_hit_tokens_total": (
        "maverick_prefix_cache_hit_tokens_total",
        "Prompt tokens served from the prefix cache",
    ),
    "num_preemptions": ("maverick_preemptions_total", "Sequences preempted for KV space"),
}


class EngineMetrics:
    def __init__(self, engine):
        self.engine = engine
        self.families, self.gauges, self.counters, self.last = [], {}, {}, {}
        for key, (name, doc) in _GAUGES.items():
            self.gauges[key] = self._family(name, doc, pb_utils.MetricFamily.GAUGE).Metric(labels={})
        for key, (name, doc) in _COUNTERS.items():
            self.counters[key] = self._family(name, doc, pb_utils.MetricFamily.COUNTER).Metric(labels={})
        hist = pb_utils.MetricFamily.HISTOGRAM
        self.ttft = self._family("maverick_time_to_first_token_seconds", "Time to first token", hist).Metric(
            labels={}, buckets=TTFT_BUCKETS
        )
        self.itl = self._family("maverick_inter_token_latency_seconds", "Time between tokens", hist).Metric(
            labels={}, buckets=ITL_BUCKETS
        )
        self._previous: dict[str, float] = {}  # request id -> time of its last token (request loop only)
        self._samples: list[tuple[object, float]] = []  # (histogram, value) not yet published
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
        if out.first_token_time is not None and times[0] == out.first_token_time:
            samples.append((self.ttft, out.first_token_time - out.arrival_time))
        previous = self._previous.get(out.request_id)
        for t in times:
            if previous is not None:
                samples.append((self.itl, t - previous))
            previous = t
        self._samples += samples  # one list operation: atomic under the GIL
        if out.finished:
            self._previous.pop(out.request_id, None)
        else:
            self._previous[out.request_id] = previous

    def _poll(self):
        while not self._stop.wait(STATS_PERIOD_S):
            samples, self._samples = self._samples, []
            for histogram, value in samples:
                histogram.observe(value)
            stats = self.engine.stats()
            for key, gauge in self.gauges.items():
                gauge.set(float(stats.get(key, 0)))
            for key, counter in self.counters.items():
                value = float(stats.get(key, 0))
                if value > self.last.get(key, 0.0):
                    counter.increment(value - self.last.get(key, 0.0))
                    self.last[key] = value

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
