"""Strict loading: the right checkpoint loads in both release formats; every kind of mismatch is a
one-line error that names the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from maverick.checkpoint import CheckpointError, load_model
from maverick.config import ConfigError, ModelConfig
from maverick.layers.fp8 import FP8_DTYPE

Q_PROJ = "language_model.model.layers.0.self_attn.q_proj.weight"
EXPERT_SCALE = "language_model.model.layers.1.feed_forward.experts.3.up_proj.weight_scale"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(ckpt: Path, edit) -> None:
    """Rewrite the shard files through `edit(dict) -> dict`, applied to each shard."""
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
        save_file(edit(tensors), f, metadata={"format": "pt"})


def _error(ckpt: Path, exc=CheckpointError) -> str:
    with pytest.raises(exc) as info:
        load_model(ckpt, dtype=torch.float32)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_config_is_typed_and_frozen(tiny_ckpt):
    cfg = ModelConfig.from_dir(tiny_ckpt)
    assert cfg.text.moe_layers == (1, 3, 5, 7)
    assert [cfg.text.uses_rope(i) for i in range(8)] == [True, True, True, False] * 2
    assert cfg.quant is not None and cfg.quant.method == "compressed-tensors"
    assert cfg.vision.tokens_per_tile == 144
    with pytest.raises(AttributeError):
        cfg.text.hidden_size = 1  # type: ignore[misc]


def test_fp8_checkpoint_keeps_fp8_experts(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype=torch.bfloat16, experts="fp8")
    experts = model.language_model.model.layers[1].feed_forward.experts
    assert experts.w13.dtype == FP8_DTYPE and experts.w13_scale.dtype == torch.float32
    assert model.language_model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16


def test_auto_dequantizes_experts_on_the_cpu(tiny_ckpt):
    """The CPU has no FP8 GEMM (`_scaled_mm` runs, emulated, several times slower than a float
    matmul): "auto" dequantizes there; FP8 stays for GPUs of compute capability 8.9+."""
    model = load_model(tiny_ckpt, dtype=torch.float32)
    experts = model.language_model.model.layers[1].feed_forward.experts
    assert not experts.fp8 and experts.w13.dtype == torch.float32
    fp8 = load_model(tiny_ckpt, dtype=torch.float32, experts="fp8").language_model.model.layers[1]
    deq = fp8.feed_forward.experts.w13.float() * fp8.feed_forward.experts.w13_scale[..., None]
    assert torch.equal(experts.w13, deq)  # the same numbers, dequantized at load


def test_bf16_checkpoint_loads_and_quantizes_on_request(tiny_ckpt_bf16):
    plain = load_model(tiny_ckpt_bf16, dtype=torch.bfloat16)
    assert plain.language_model.model.layers[1].feed_forward.experts.w13.dtype == torch.bfloat16
    quant = load_model(tiny_ckpt_bf16, dtype=torch.bfloat16, experts="fp8", quantize_experts=True)
    experts = quant.language_model.model.layers[1].feed_forward.experts
    assert experts.w13.dtype == FP8_DTYPE
    # Dequantized FP8 is the bf16 weight to within e4m3's relative precision (2^-4).
    w = plain.language_model.model.layers[1].feed_forward.experts.w13.float()
    deq = experts.w13.float() * experts.w13_scale[..., None]
    assert ((deq - w).abs() <= w.abs() * 2**-4 + 1e-6).all()


def test_missing_tensor(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_tensors(ckpt, lambda t: {k: v for k, v in t.items() if k != Q_PROJ})
    assert f"missing tensor '{Q_PROJ}'" in _error(ckpt)


def test_missing_expert_scale(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_tensors(ckpt, lambda t: {k: v for k, v in t.items() if k != EXPERT_SCALE})
    assert f"missing tensor '{EXPERT_SCALE}'" in _error(ckpt)


def test_extra_tensor(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    extra = "language_model.model.layers.0.self_attn.qk_norm.weight"
    first = sorted(ckpt.glob("*.safetensors"))[0]
    with safe_open(first, framework="pt") as st:
        tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    save_file({**tensors, extra: torch.ones(32, dtype=torch.bfloat16)}, first, metadata={"format": "pt"})
    assert f"unexpected tensor '{extra}'" in _error(ckpt)


def test_wrong_shape(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_tensors(ckpt, lambda t: {k: (v[:-1] if k == Q_PROJ else v) for k, v in t.items()})
    msg = _error(ckpt)
    assert Q_PROJ in msg and "shape [127, 128], expected [128, 128]" in msg


def test_wrong_dtype_outside_experts(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_tensors(ckpt, lambda t: {k: (v.to(FP8_DTYPE) if k == Q_PROJ else v) for k, v in t.items()})
    assert Q_PROJ in _error(ckpt) and "only routed experts" in _error(ckpt)


def _edit_config(ckpt: Path, edit) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_not_a_llama4_config(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_config(ckpt, lambda c: c.update(model_type="llama"))
    assert "not a Llama 4 checkpoint" in _error(ckpt, ConfigError)


def test_unsupported_quantization(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "c")
    _edit_config(ckpt, lambda c: c["quantization_config"].update(quant_method="gptq"))
    assert "unsupported quantization method 'gptq'" in _error(ckpt, ConfigError)
    _edit_config(
        ckpt,
        lambda c: (
            c["quantization_config"].update(quant_method="compressed-tensors")
            or c["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="tensor")
        ),
    )
    assert "weights scheme" in _error(ckpt, ConfigError)


def test_not_a_checkpoint_dir(tmp_path):
    assert "no config.json" in _error(tmp_path, ConfigError)
