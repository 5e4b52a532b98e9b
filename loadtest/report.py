"""From the per-request records of a run to its summary, table, chart and pass/fail verdict.

Definitions (genai-perf's), computed exactly from the raw values (numpy's linear-interpolation
percentiles over every measured request, not Locust's rounded histogram buckets):
- TTFT: first response carrying output tokens − send. E2E latency: last response − send.
- ITL, per request: (E2E − TTFT) / (output tokens − 1), for requests with at least 2 tokens.
- A level's measured requests: those sent while it was held, after its warm-up. Its duration:
  first send → last response among them; requests/s and output tokens/s are the successful
  requests and their output tokens over that duration.
- Errors: every failed request of the level (warm-up included), plus exceptions raised in the
  Locust users themselves (counted for the run).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)


def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(request records, level records) from a JSON-lines file."""
    requests, levels = [], []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            {"level": levels, "request": requests}.get(rec["type"], []).append(rec)
    return requests, levels


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    arr = np.asarray(values, dtype=float)
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES} | {"mean": float(arr.mean())}


def itl(record: dict) -> float | None:
    n = record["output_tokens"]
    if not record["ok"] or record["ttft"] is None or n < 2:
        return None
    return (record["latency"] - record["ttft"]) / (n - 1)


def level_summary(level: int, records: list[dict]) -> dict:
    """One level's metrics from its request records (all of them; warm-up ones are dropped here)."""
    errors = [r for r in records if not r["ok"]]
    measured = [r for r in records if not r["warmup"]]
    ok = [r for r in measured if r["ok"]]
    if measured:
        start = min(r["t_send"] for r in measured)
        end = max(r["t_send"] + r["latency"] for r in measured)
        duration = end - start
    else:
        duration = 0.0
    tokens = sum(r["output_tokens"] for r in ok)
    itls = [v for v in map(itl, ok) if v is not None]
    late = [r["late"] for r in measured if r["late"] > 0.01]
    return {
        "level": level,
        "requests": len(ok),
        "errors": len(errors),
        "error_rate": len(errors) / len(records) if records else 0.0,
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else 0.0,
        "output_tokens_per_s": tokens / duration if duration > 0 else 0.0,
        "output_tokens": tokens,
        "mean_input_tokens": float(np.mean([r["input_tokens"] for r in ok])) if ok else None,
        "mean_output_tokens": tokens / len(ok) if ok else None,
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_s": percentiles(itls),
        "e2e_s": percentiles([r["latency"] for r in ok]),
        "late_arrivals": len(late),
        "error_messages": sorted({r["error"] for r in errors})[:10],
    }


def summarize(records_path: Path, meta: dict | None = None, user_exceptions: int = 0) -> dict:
    requests, levels = read_records(records_path)
    order = list(dict.fromkeys([lv["level"] for lv in levels] + [r["level"] for r in requests]))
    per_level = [level_summary(lv, [r for r in requests if r["level"] == lv]) for lv in order]
    return {
        **(meta or {}),
        "levels": per_level,
        "total_requests": len(requests),
        "total_errors": sum(not r["ok"] for r in requests),
        "user_exceptions": user_exceptions,
    }


# -- pass/fail ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 0.0  # failed / sent, per level
    max_p99_ttft_s: float | None = None  # per level
    min_output_tokens_per_s: float | None = None  # per level


def verdict(summary: dict, th: Thresholds) -> list[str]:
    """Why the run fails (empty: it passes). Every threshold holds at every level."""
    problems = []
    if summary["user_exceptions"]:
        problems.append(f"{summary['user_exceptions']} exceptions in the Locust users (see the Locust log)")
    if not summary["levels"]:
        problems.append("no requests were sent")
    for lv in summary["levels"]:
        name = f"level {lv['level']}"
        if lv["error_rate"] > th.max_error_rate:
            first = lv["error_messages"][0] if lv["error_messages"] else ""
            problems.append(
                f"{name}: error rate {lv['error_rate']:.1%} > {th.max_error_rate:.1%} "
                f"({lv['errors']} errors; first: {first})"
            )
        missing = [
            k
            for k, v in (
                ("TTFT", lv["ttft_s"]["p50"]),
                ("ITL", lv["itl_s"]["p50"]),
                ("output tokens/s", lv["output_tokens_per_s"] or None),
            )
            if v is None or not math.isfinite(v)
        ]
        if missing:
            problems.append(
                f"{name}: no {', '.join(missing)} measured ({lv['requests']} successful requests)"
            )
            continue
        p99 = lv["ttft_s"]["p99"]
        if th.max_p99_ttft_s is not None and p99 > th.max_p99_ttft_s:
            problems.append(f"{name}: p99 TTFT {p99 * 1e3:.0f} ms > {th.max_p99_ttft_s * 1e3:.0f} ms")
        rate = lv["output_tokens_per_s"]
        if th.min_output_tokens_per_s is not None and rate < th.min_output_tokens_per_s:
            problems.append(f"{name}: {rate:.1f} output tokens/s < {th.min_output_tokens_per_s:.1f}")
    return problems


# -- table and chart ---------------------------------------------------------------------------------
def ms(v: float | None) -> str:
    return "–" if v is None else f"{v * 1e3:.1f}"


def markdown(summary: dict, title: str = "") -> str:
    head = (
        "| users | req | errors | req/s | out tok/s | TTFT p50 | TTFT p90 | TTFT p99 "
        "| ITL p50 | ITL p90 | ITL p99 | E2E p50 | E2E p99 |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = "".join(
        f"| {lv['level']} | {lv['requests']} | {lv['errors']} | {lv['requests_per_s']:.2f} "
        f"| {lv['output_tokens_per_s']:.1f} | {ms(lv['ttft_s']['p50'])} | {ms(lv['ttft_s']['p90'])} "
        f"| {ms(lv['ttft_s']['p99'])} | {ms(lv['itl_s']['p50'])} | {ms(lv['itl_s']['p90'])} "
        f"| {ms(lv['itl_s']['p99'])} | {ms(lv['e2e_s']['p50'])} | {ms(lv['e2e_s']['p99'])} |\n"
        for lv in summary["levels"]
    )
    intro = f"{title}\n\nTimes in ms.\n\n" if title else "Times in ms.\n\n"
    return intro + head + rows


def chart(series: dict[str, dict], path: Path) -> None:
    """Throughput, TTFT and ITL against the number of users; one colour per summary (name -> summary),
    p50 solid, p99 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ticks = sorted({lv["level"] for s in series.values() for lv in s["levels"] if lv["requests"]})
    for i, (name, summary) in enumerate(series.items()):
        colour = f"C{i}"
        lvs = [lv for lv in summary["levels"] if lv["requests"]]
        x = [lv["level"] for lv in lvs]
        axes[0].plot(x, [lv["output_tokens_per_s"] for lv in lvs], "-o", color=colour, label=name)
        for ax, metric in ((axes[1], "ttft_s"), (axes[2], "itl_s")):
            for p, style in (("p50", "-o"), ("p99", "--o")):
                ys = [lv[metric][p] * 1e3 if lv[metric][p] is not None else np.nan for lv in lvs]
                ax.plot(x, ys, style, color=colour, label=f"{name} {p}")
    titles = ("output tokens/s", "TTFT (ms)", "inter-token latency (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent users")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
