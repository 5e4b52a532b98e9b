"""The load test's workload against the engine directly, in this process: the baseline that shows
what Triton costs.

    python -m loadtest.engine_direct --workload-file results/loadtest/run/workload.json \\
        --levels 1,2,4,8 --duration 30 [--warmup 5] [--model-dir models/tiny-maverick] \\
        [--engine key=value ...] --out results/loadtest/direct

Everything but Triton is the same as in the Locust run. The engine is the one the `maverick` model
runs: an `EngineClient` (the engine loop in a child process) configured like the served model (its
config.pbtxt parameters, then --engine overrides). The load is the
same closed loop: users are added at each level boundary and each sends its next request as soon
as its previous one is done, taking requests from the same workload file in the same order. Each
request does the server's per-request work in the user (chat template, tokenization, image tiling:
`parse_request`, as the preprocessing step does) and then streams from `engine.generate`; a
"response" is one engine output. Records, summary and table have the format of `python -m loadtest`'s,
and each level record also carries this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
import uuid
from pathlib import Path

from loadtest import report, workload
from loadtest.cli import seconds
from server.launch import engine_parameters

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "model_repository"


class DirectRun:
    def __init__(self, engine, tokenizer, defaults, load: dict, records_path: Path, warmup: float):
        from maverick.serving.request import fit_max_tokens, numpy_inputs, parse_request

        self._parse = lambda fields: fit_max_tokens(
            parse_request(numpy_inputs(fields), tokenizer, defaults), engine.max_model_len
        )
        self.engine, self.load, self.warmup = engine, load, warmup
        self.records = open(records_path, "w")  # noqa: SIM115 - closed by run()
        self.next_index = itertools.count()
        self.t0 = time.perf_counter()
        self.level, self.level_start = 0, self.t0
        self.stopping = False

    def write(self, record: dict) -> None:
        self.records.write(json.dumps(record) + "\n")

    async def user(self) -> None:
        reqs = self.load["requests"]
        while not self.stopping:
            request = reqs[next(self.next_index) % len(reqs)]
            level, since_level = self.level, time.perf_counter() - self.level_start
            start = time.perf_counter()
            first = end = None
            tokens = num_responses = 0
            error, req = None, None
            try:
                req = self._parse(workload.request_fields(self.load, request))
                async for out in self.engine.generate(uuid.uuid4().hex, req.prompt, req.params):
                    t = time.perf_counter()
                    if out.error:
                        raise RuntimeError(out.error)
                    num_responses += 1
                    tokens += len(out.token_ids)
                    if first is None and out.token_ids:
                        first = t
                    end = t
                if tokens != request["max_tokens"]:
                    error = f"{tokens} output tokens for max_tokens={request['max_tokens']}"
            except Exception as e:  # noqa: BLE001 - recorded as a failed request, like the server's
                error = f"{type(e).__name__}: {e}"
            end = end if error is None else time.perf_counter()
            self.write(
                {
                    "type": "request",
                    "protocol": "direct",
                    "level": level,
                    "warmup": since_level < self.warmup,
                    "t_send": start - self.t0,
                    "late": 0.0,
                    "ok": error is None,
                    "error": error,
                    "ttft": (first - start) if first is not None and error is None else None,
                    "latency": end - start,
                    "output_tokens": tokens,
                    "input_tokens": len(req.prompt.token_ids) if error is None else 0,
                    "responses": num_responses,
                    "max_tokens": request["max_tokens"],
                }
            )

    async def run(self, levels: list[int], hold: float) -> None:
        import psutil

        proc = psutil.Process()
        tasks: list[asyncio.Task] = []
        for level in levels:
            self.level, self.level_start = level, time.perf_counter()
            cpu = proc.cpu_times()
            self.write(
                {
                    "type": "level",
                    "level": level,
                    "t": self.level_start - self.t0,
                    "wall": time.time(),
                    "cpu_s": cpu.user + cpu.system,
                }
            )
            tasks += [asyncio.create_task(self.user()) for _ in range(level - len(tasks))]
            await asyncio.sleep(hold)
        self.stopping = True  # requests in flight finish and are measured, as in Locust's run
        await asyncio.gather(*tasks)
        cpu = proc.cpu_times()
        self.write(
            {
                "type": "end",
                "t": time.perf_counter() - self.t0,
                "wall": time.time(),
                "cpu_s": cpu.user + cpu.system,
            }
        )
        self.records.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload-file", type=Path, required=True)
    ap.add_argument("--levels", required=True, help="numbers of users in turn, e.g. 1,2,4,8")
    ap.add_argument("--duration", type=seconds, default=30.0, help="per level")
    ap.add_argument("--warmup", type=seconds, default=0.0)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models" / "tiny-maverick")
    ap.add_argument("--engine", nargs="*", default=[], help="engine parameter overrides, key=value")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from maverick.engine.engine_client import EngineClient
    from maverick.serving.engine_args import engine_config
    from maverick.serving.model_dir import generation_defaults
    from maverick.tokenizer import Tokenizer

    params = engine_parameters(args.model_dir, dict(kv.split("=", 1) for kv in args.engine))
    config = engine_config(params, ROOT)
    engine = EngineClient(config)
    levels = [int(x) for x in args.levels.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    load = workload.load(args.workload_file)
    run = DirectRun(
        engine,
        Tokenizer.from_dir(args.model_dir),
        generation_defaults(args.model_dir),
        load,
        args.out / "records.jsonl",
        args.warmup,
    )
    print(f"engine direct: users {levels}, {args.duration:g} s each -> {args.out}", flush=True)
    try:
        asyncio.run(run.run(levels, args.duration))
    finally:
        engine.shutdown()
    meta = {
        "protocol": "direct",
        "arrival": "closed loop",
        "level_time_s": args.duration,
        "warmup_s": args.warmup,
        "workload": load["spec"],
        "engine_config": config.__dict__,
    }
    summary = report.summarize(args.out / "records.jsonl", meta)
    problems = report.verdict(summary, report.Thresholds())
    summary["passed"], summary["problems"] = not problems, problems
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = report.markdown(summary, "# The same workload, engine directly (its own process, no Triton)")
    (args.out / "summary.md").write_text(table)
    print(table)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
