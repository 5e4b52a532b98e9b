"""scripts/bench_peer.py's engine side: this project's engine serving one level of the workload.

    .venv/bin/python scripts/bench_peer_engine.py SPEC.json RESULT.json

A process of its own, as the peer gets one (scripts/bench_peer_vllm.py), so neither side inherits
the other's threads, allocations or caches. SPEC and RESULT are the JSON that scripts/bench_peer.py
writes and reads (see its `run_side`); the closed loop is bench_engine's `run_engine`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from bench_engine import Request, run_engine
from bench_machine import Meter

from maverick.engine.api import EngineConfig
from maverick.engine.llm_engine import LLMEngine


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    t0 = time.monotonic()
    c = spec["concurrency"]
    engine = LLMEngine(
        EngineConfig(
            model_dir=spec["model_dir"],
            dtype="float32",
            max_num_seqs=c,
            cpu_threads=spec["threads"],
            **spec.get("engine_args", {}),
        )
    )
    # First calls allocate, pick kernels and fill caches: not timed.
    warm = [Request(ids, n) for ids, n in spec["warmup"]]
    run_engine(engine, warm, c)
    startup = time.monotonic() - t0
    reqs = [Request(ids, n) for ids, n in spec["requests"]]
    with Meter() as meter:
        recs, wall = run_engine(engine, reqs, c)
    result = {
        "records": [{"arrival": r.arrival, "token_times": r.token_times, "tokens": r.tokens} for r in recs],
        "wall_s": wall,
        "other_processes_cores": meter.other_cores,
        "startup_s": startup,
        "info": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "engine_config": asdict(engine.config),
            "engine_stats": engine.stats(),
        },
    }
    Path(result_path).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
