"""The fixed-shape decode path end to end on the tiny model (fp32): the same logits as the reference
forward, the same greedy tokens through the engine, and K/V writes only where they belong.

Its Triton kernels run on the CPU in Triton's interpreter, so the work happens in a subprocess with
TRITON_INTERPRET=1 (tests/fixed_shape_decode.py; tests/test_kernels.py says why a subprocess), and
this process compares what it saved. The CUDA-graph capture itself needs a GPU: scripts/gpu_check.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from interpreter import run_interpreted

from maverick.kernels import moe, paged_attention

ROOT = Path(__file__).resolve().parents[1]
# |fixed-shape - reference| / max|reference logit|: both fp32; measured ~1e-6 (summation order).
REL_TOL = 1e-5

pytestmark = pytest.mark.skipif(
    not (moe.HAS_TRITON and paged_attention.HAS_TRITON), reason="triton is not installed"
)


@pytest.fixture(scope="module")
def interpreted(tiny_ckpt, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("static_decode") / "out.pt"
    run_interpreted([str(ROOT / "tests" / "fixed_shape_decode.py"), str(tiny_ckpt), str(out)], timeout=600)
    return torch.load(out)


def test_fixed_shape_forward_equals_reference(interpreted):
    """6 decodes (inside a chunk, at a chunk's first position, temperature-tuned) padded to 8 rows."""
    f = interpreted["forward"]
    ref = f["reference"]
    assert f["static"].shape == ref.shape == (6, ref.shape[1])
    scale = ref.abs().max()
    for name in ("static", "splits"):
        err = ((f[name] - ref).abs().max() / scale).item()
        assert err < REL_TOL, (name, err)
        assert torch.equal(f[name].argmax(-1), ref.argmax(-1)), name


def test_padding_rows_write_only_the_scratch_slot(interpreted):
    """The reference writes the 6 new tokens' slots; the padded batch those and the scratch slot
    (the 2 padding rows), nothing else. Block 0 belongs to a sequence here, so a padding row
    writing slot 0 would show, in this and in the logits."""
    f = interpreted["forward"]
    new = sorted(f["new_token_slots"])
    assert f["reference_written"] == new
    assert f["static_written"] == sorted([*new, f["scratch_slot"]])
    assert f["scratch_slot"] not in new


def test_engine_greedy_tokens_equal_on_the_static_path(interpreted):
    ref_tokens, ref_steps = interpreted["engine"]["reference"]
    tokens, steps = interpreted["engine"]["static"]
    assert all(len(t) == 5 for t in ref_tokens.values())
    assert tokens == ref_tokens
    assert ref_steps["fixed_shape"] == 0
    # requests arrive one per step: the first steps mix prefill and decode (reference), then the
    # decodes run in fixed shapes
    assert steps["reference"] > 0 and steps["fixed_shape"] > 0
    assert steps["reference"] + steps["fixed_shape"] == ref_steps["reference"]


def test_engine_greedy_tokens_equal_with_the_moe_kernel_on_every_step(interpreted):
    """moe_path "kernel": the prefill and mixed steps' routed experts through the fused kernel too."""
    ref_tokens, ref_steps = interpreted["engine"]["reference"]
    tokens, steps = interpreted["engine"]["static, moe kernel"]
    assert tokens == ref_tokens
    # the kernel saw whole prefill chunks (the longest prompt is 90 tokens), not only decode batches
    seen = interpreted["fused_moe_max_tokens"]
    assert seen["reference"] == 0 and seen["static"] <= 8 and seen["static, moe kernel"] >= 90
    assert steps["reference"] > 0 and steps["reference"] + steps["fixed_shape"] == ref_steps["reference"]
