"""What a guided request costs per engine step: a batch of B decoding sequences of which G are
JSON-schema-guided (G = 0: none), in one process, the settings alternating; each G > 0 twice: the
token masks filled before the forward (the engine's choice on the CPU) and on the grammar thread
during it (its choice on a GPU).

    .venv/bin/python scripts/bench_guided.py [--model-dir models/tiny-maverick] [--batch 8] [--guided 1 4]

For each setting the engine runs the same prompts (greedy, ignore_eos, a fixed number of decode
steps) and times every step after the prompts are in (pure decode steps). Reported per setting:
median and p90 step time, and the guided requests' own work per step, timed inside the engine's
calls: filling the token bitmasks (xgrammar, on the grammar thread, overlapped with the forward)
and applying them to the logits in the sampler (xgrammar's apply_token_bitmask_inplace). Written to
results/bench/guided.{json,md}. Performance claims come from this script, never from tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from maverick.engine import guided as guided_module
from maverick.engine import sampler
from maverick.engine.api import EngineConfig, Prompt, SamplingParams
from maverick.engine.llm_engine import LLMEngine
from maverick.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "tags"],
}
OUT = Path("results/bench")


class Timer:
    """Wall time spent inside a function, summed."""

    def __init__(self, fn):
        self.fn, self.total, self.calls = fn, 0.0, 0

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += time.perf_counter() - t
            self.calls += 1


def run(engine: LLMEngine, prompts: list[Prompt], batch: int, guided: int, steps: int, overlap: bool) -> dict:
    plain = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    json_guide = SamplingParams(
        max_tokens=steps + 1,
        temperature=0.0,
        ignore_eos=True,
        guided_decoding=("json_schema", json.dumps(SCHEMA)),
    )
    for i in range(batch):  # the same prompts in every setting; the first G guided
        engine.add_request(f"seq-{i}", prompts[i % len(prompts)], json_guide if i < guided else plain)
    engine.grammars.overlap = overlap
    fill = Timer(engine.grammars._fill)
    engine.grammars._fill = fill
    apply = Timer(guided_module.apply_bitmask)
    sampler.apply_bitmask = apply
    times = []
    try:
        while engine.has_unfinished():
            decoding = all(s.num_computed_tokens >= s.num_prompt_tokens for s in engine.scheduler.running)
            t = time.perf_counter()
            engine.step()
            if decoding and not engine.scheduler.waiting:
                times.append(time.perf_counter() - t)
    finally:
        del engine.grammars._fill
        sampler.apply_bitmask = guided_module.apply_bitmask
    times.sort()
    return {
        "batch": batch,
        "guided": guided,
        "overlap": overlap,
        "steps": len(times),
        "step_ms_p50": 1e3 * statistics.median(times),
        "step_ms_p90": 1e3 * times[int(0.9 * (len(times) - 1))],
        "fill_ms_per_step": 1e3 * fill.total / max(fill.calls, 1),
        "apply_ms_per_step": 1e3 * apply.total / max(apply.calls, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/tiny-maverick")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    ap.add_argument("--guided", type=int, nargs="+", default=[1, 4, 8], help="of which guided")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = LLMEngine(EngineConfig(model_dir=args.model_dir, dtype="float32", experts="dequant"))
    tok = Tokenizer.from_dir(args.model_dir)
    prompts = [Prompt(tok.encode(t * 8, add_bos=True)) for t in ("Tell me. ", "JSON please. ", "A record: ")]
    engine.grammars.compile("json_schema", json.dumps(SCHEMA))  # compiled once, as a warm server has it
    settings = [(0, False)] + [(g, overlap) for g in args.guided for overlap in (False, True)]
    run(engine, prompts, args.batch, max(args.guided), 8, True)  # warm-up
    rows = []
    for _ in range(args.repeat):
        for g, overlap in settings:
            rows.append(run(engine, prompts, args.batch, g, args.steps, overlap))
    summary = []
    for g, overlap in settings:
        mine = [r for r in rows if (r["guided"], r["overlap"]) == (g, overlap)]
        summary.append({k: statistics.median(r[k] for r in mine) for k in mine[0]})
    base = summary[0]["step_ms_p50"]
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "threads": 2, "torch": torch.__version__}
    (OUT / "guided.json").write_text(json.dumps({"meta": meta, "runs": rows, "summary": summary}, indent=2))
    lines = [
        "# Guided decoding: cost per decode step",
        "",
        f"`scripts/bench_guided.py`, {args.model_dir}, fp32, {meta['threads']} threads, "
        f"torch {meta['torch']}; {args.batch} greedy sequences decoding, G of them JSON-schema-guided; "
        f"medians of {args.repeat} runs.",
        "",
        "| G guided | masks filled | step p50 ms | step p90 ms | vs G = 0 | bitmask fill ms/step "
        "| mask apply ms/step |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['guided']} | {'during the forward' if s['overlap'] else 'before it'} | "
            f"{s['step_ms_p50']:.2f} | {s['step_ms_p90']:.2f} | "
            f"{s['step_ms_p50'] / base:.2f}× | {s['fill_ms_per_step']:.3f} | {s['apply_ms_per_step']:.3f} |"
        )
    (OUT / "guided.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
