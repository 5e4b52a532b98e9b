"""GPU check: the tiny model and the FP8 `_scaled_mm` path on CUDA against the CPU oracle, and the
fixed-shape decode path (Triton kernels, CUDA graphs) against the reference path.

    make gpu-check                      # or: python scripts/gpu_check.py --model-dir models/tiny-maverick

The CPU oracle is our fp32 model with dequantized experts, which tests/test_model.py holds equal to
transformers' Llama 4. The decode-path checks are in scripts/decode_path_check.py. Prints errors and
timings and writes them to results/gpu_check.json. `--device cpu` runs the same script without a GPU
(to check the script itself); the checks that need CUDA say so and are skipped. On two GPUs or more
it also runs the engine at tensor parallel 2 over NCCL against TP 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from decode_path_check import check_decode_path  # noqa: E402
from paged import PagedDriver  # noqa: E402
from test_engine import run as run_workload  # noqa: E402
from test_engine import workload  # noqa: E402

from maverick.checkpoint import load_model  # noqa: E402
from maverick.engine.api import EngineConfig  # noqa: E402
from maverick.engine.llm_engine import LLMEngine  # noqa: E402
from maverick.layers.fp8 import fp8_linear, fp8_supported, quantize_rowwise  # noqa: E402
from maverick.tokenizer import Tokenizer  # noqa: E402

NEW_TOKENS = 32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int = 20) -> float:
    """Median seconds per call."""
    fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 2000, (n,), generator=g).tolist() for n in (150, 97, 64)]


def _logits(model, prompts) -> torch.Tensor:
    out = PagedDriver(model).step([(str(i), p, None) for i, p in enumerate(prompts)])
    return torch.cat(out).float().cpu()


def compare_models(model_dir: str, device: torch.device, report: dict) -> None:
    prompts = _prompts()
    oracle = load_model(model_dir, dtype=torch.float32, experts="dequant")
    ref = _logits(oracle, prompts)
    ref_greedy = PagedDriver(oracle).greedy("g", prompts[0], NEW_TOKENS)
    scale = ref.abs().max().item()
    variants = [("fp32 dequant", torch.float32, "dequant"), ("bf16 dequant", torch.bfloat16, "dequant")]
    if fp8_supported(device):
        variants.append(("bf16 + fp8 experts", torch.bfloat16, "fp8"))
    for name, dtype, experts in variants:
        model = load_model(model_dir, dtype=dtype, device=device, experts=experts)
        got = _logits(model, prompts)
        greedy = PagedDriver(model).greedy("g", prompts[0], NEW_TOKENS)
        row = {
            "max_rel_logit_err": (got - ref).abs().max().item() / scale,
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "greedy_equal_tokens": sum(a == b for a, b in zip(greedy, ref_greedy, strict=True)),
            "prefill_314_tokens_ms": 1e3 * _time(lambda m=model: _logits(m, prompts), device, iters=5),
        }
        report["models"][name] = row
        print(f"{name:>20}: {row}")


def bench_fp8_linear(device: torch.device, report: dict) -> None:
    """Maverick expert shapes: gate_up [2*8192, 5120] and down [5120, 8192], bf16 vs FP8."""
    shapes = (
        {"gate_up": (16384, 5120), "down": (5120, 8192)} if device.type == "cuda" else {"small": (512, 256)}
    )
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=device) / k**0.5
        w_fp8, w_scale = quantize_rowwise(w)
        w_bf16 = w.to(torch.bfloat16)
        for m in (1, 16, 128, 1024, 4096):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            exact = x.float() @ (w_fp8.float() * w_scale).t()
            y = fp8_linear(x, w_fp8, w_scale.squeeze(1))
            err = ((y.float() - exact).norm() / exact.norm()).item()
            t_bf16 = _time(lambda x=x, w=w_bf16: x @ w.t(), device)
            t_fp8 = _time(lambda x=x, w=w_fp8, s=w_scale: fp8_linear(x, w, s.squeeze(1)), device)
            row = {
                "m": m,
                "rel_l2_err_vs_dequant": err,
                "bf16_us": 1e6 * t_bf16,
                "fp8_us": 1e6 * t_fp8,
                "fp8_tflops": 2 * m * n * k / t_fp8 / 1e12,
            }
            report["fp8_linear"].setdefault(name, []).append(row)
            print(f"fp8_linear {name} {row}")


def check_tensor_parallel(model_dir: str, device: torch.device, report: dict) -> None:
    """The engine at TP 1 and TP 2 on the 19-request workload (3 with images, chunked prefill):
    NCCL across two GPUs, each rank's CUDA graphs replaying the decode batches rank 0 sends. fp32
    with dequantized experts must give identical tokens (as on the CPU, tests/test_tensor_parallel.py);
    bf16 (+ FP8 experts where supported) is reported as the share of equal requests. On the CPU it
    runs over gloo, to check the script."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        report["tensor_parallel"] = {"skipped": "needs 2 GPUs; this machine has 1"}
        return
    reqs = workload(Tokenizer.from_dir(model_dir))
    variants = [("fp32 dequant", "float32", "dequant")]
    if fp8_supported(device):
        variants.append(("bf16 + fp8 experts", "bfloat16", "fp8"))
    out = report["tensor_parallel"] = {}
    for name, dtype, experts in variants:
        tokens, seconds = {}, {}
        for tp in (1, 2):
            config = EngineConfig(
                model_dir=model_dir,
                device=str(device),
                dtype=dtype,
                experts=experts,
                tensor_parallel_size=tp,
                num_kv_blocks=256,
                max_num_batched_tokens=64,
            )
            engine = LLMEngine(config)
            try:
                t0 = time.perf_counter()
                tokens[tp] = run_workload(engine, reqs)
                seconds[tp] = time.perf_counter() - t0
            finally:
                engine.close()
        same = sum(tokens[2][r] == tokens[1][r] for r in tokens[1])
        out[name] = {
            "requests_equal": f"{same}/{len(tokens[1])}",
            "seconds_tp1": seconds[1],
            "seconds_tp2": seconds[2],
        }
        print(f"tensor_parallel {name} {out[name]}")
    if out["fp32 dequant"]["requests_equal"] != f"{len(reqs)}/{len(reqs)}":
        raise AssertionError(f"TP 2 differs from TP 1 in fp32: {out['fp32 dequant']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default="models/tiny-maverick")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="results/gpu_check.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device visible; use --device cpu to check the script itself")
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "models": {},
        "fp8_linear": {},
    }
    print(f"device: {report['device']}, torch {report['torch']}")
    sections = [("models", lambda: compare_models(args.model_dir, device, report))]
    if fp8_supported(device):
        sections.append(("fp8_linear", lambda: bench_fp8_linear(device, report)))
    sections.append(("decode_path", lambda: check_decode_path(args.model_dir, device, report)))
    sections.append(("tensor_parallel", lambda: check_tensor_parallel(args.model_dir, device, report)))
    # One GPU session is short: a section that raises is recorded and the others still run.
    failed = report["failed_sections"] = {}
    for name, run in sections:
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - reported below, and the exit code says so
            traceback.print_exc()
            failed[name] = f"{type(exc).__name__}: {exc}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
