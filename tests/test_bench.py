"""scripts/bench_engine.py in --quick mode writes a well-formed report. No timing is asserted:
performance claims come from the full benchmark run (`make bench`), not from tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_engine.py"


def test_quick_bench_writes_json_markdown_and_png(tiny_ckpt, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--model-dir", str(tiny_ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| c | side |" in proc.stdout  # the table is printed

    result = json.loads((out / "bench.json").read_text())
    assert result["machine"]["dtype"] == "float32" and result["machine"]["torch"]
    assert [lvl["concurrency"] for lvl in result["levels"]] == [1, 2]
    for lvl in result["levels"]:
        for side in ("engine", "transformers"):
            m = lvl[side]
            assert m["requests"] == 3 and m["output_tokens"] > 0 and m["output_tokens_per_s"] > 0
            for key in ("ttft_s", "itl_s", "e2e_s"):
                assert set(m[key]) == {"p50", "p90", "p99", "mean"} and m[key]["p50"] is not None
        # Both sides ran the same requests and produced exactly max_tokens each.
        assert lvl["engine"]["output_tokens"] == lvl["transformers"]["output_tokens"]
        # Greedy fp32: the engine must give transformers' tokens where transformers is exact.
        assert lvl["tokens_checked"] >= 1 and lvl["tokens_match"] == lvl["tokens_checked"]
        assert lvl["speedup"] > 0

    md = (out / "bench.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 4, md  # one row per level and side

    with Image.open(out / "throughput.png") as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        im.verify()


# -- scripts/bench_peer.py: the parts that need no vLLM ---------------------------------------------
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark scripts import each other by name, as when run


def test_fused_copy_loads_in_transformers_with_the_fp8_checkpoints_logits(tiny_ckpt, reference, tmp_path):
    import torch
    from fused_copy import make_fused_copy
    from transformers import Llama4ForConditionalGeneration

    copy = make_fused_copy(tiny_ckpt, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert json.loads((copy / "generation_config.json").read_text()) == json.loads(
        (tiny_ckpt / "generation_config.json").read_text()
    )
    model = Llama4ForConditionalGeneration.from_pretrained(
        copy, dtype=torch.float32, attn_implementation="eager"
    )
    ids = torch.randint(0, 2000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = model.eval()(input_ids=ids).logits, reference(input_ids=ids).logits
    # The oracle dequantizes the FP8 experts the same way: the same fp32 weights, the same math.
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    # Made once per source: a second call keeps the copy.
    weights = next(copy.glob("*.safetensors"))
    before = weights.stat().st_mtime_ns
    make_fused_copy(tiny_ckpt, copy)
    assert weights.stat().st_mtime_ns == before


def test_peer_requests_are_deterministic_random_ordinary_tokens(tiny_ckpt):
    from bench_peer import ordinary_ids, random_workload

    from maverick.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_ckpt)
    ordinary = ordinary_ids(tok)
    shape = ([3, 20], (32, 512), (16, 256))
    levels = random_workload(ordinary, 0, *shape)
    assert levels == random_workload(ordinary, 0, *shape)
    assert levels != random_workload(ordinary, 1, *shape)
    assert [len(level) for level in levels] == [3, 20]
    reqs = [r for level in levels for r in level]
    for r in reqs:
        assert 32 <= len(r.prompt_ids) <= 512 and 16 <= r.max_tokens <= 256
        assert not any(tok.is_special(i) for i in r.prompt_ids)
    # No two prompts share a first KV block: neither engine's prefix cache gets a hit.
    assert len({tuple(r.prompt_ids[:16]) for r in reqs}) == len(reqs)


def test_peer_token_agreement():
    from bench_peer import level_agreement

    ref = [[1, 2, 3], [4, 5, 6]]
    got = level_agreement(
        {
            "engine": [[[1, 2, 3], [4, 5, 6], [7]]] * 2,
            "vllm": [[[1, 2, 9], [4, 5, 6], [8]], [[1, 2, 3], [4, 5, 6], [8]]],
        },
        ref,
    )
    engine, vllm = got["engine_vs_transformers"], got["vllm_vs_transformers"]
    assert engine == {"checked": 2, "identical": 2, "common_prefix": [3, 3], "common_prefix_median": 3.0}
    assert vllm["identical"] == 1 and vllm["common_prefix"] == [2, 3]
    assert got["engine_vs_vllm"]["identical"] == 1 and got["engine_vs_vllm"]["checked"] == 3
    assert got["same_every_attempt"] == {"engine": True, "vllm": False}
