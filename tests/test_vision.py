"""Vision tower and projector against transformers' Llama 4 modules (the oracle), fp32 on CPU."""

import pytest
import torch
from transformers import Llama4Config, Llama4VisionConfig
from transformers.models.llama4 import modeling_llama4 as hf

from maverick.config import VisionConfig
from maverick.models.vision import MultiModalProjector, VisionModel, pixel_shuffle, vision_rope_cos_sin

HF_VISION = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,  # hidden / ratio²: the adapter's input width
    num_channels=3,
    image_size=336,
    patch_size=14,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=128,
    projector_output_dim=128,
    vision_output_dim=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000},
    norm_eps=1e-5,
)


def _hf_config(attn: str = "eager") -> Llama4VisionConfig:
    cfg = Llama4VisionConfig(**HF_VISION)
    cfg._attn_implementation = attn
    return cfg


@pytest.fixture(scope="module")
def oracle() -> hf.Llama4VisionModel:
    torch.manual_seed(0)
    model = hf.Llama4VisionModel(_hf_config()).eval()
    with torch.no_grad():
        for p in model.parameters():  # wider than the usual init, so differences would show
            p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def ours(oracle) -> VisionModel:
    model = VisionModel(VisionConfig.from_dict(_hf_config().to_dict())).eval()
    model.load_state_dict(oracle.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    return torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(1))  # [3, 3, 336, 336]


def test_state_dict_keys_equal_checkpoint_keys(oracle, ours):
    assert sorted(ours.state_dict()) == sorted(oracle.state_dict())
    for key, value in oracle.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    keys = set(ours.state_dict())
    assert {
        "patch_embedding.linear.weight",
        "class_embedding",
        "positional_embedding_vlm",
        "model.layers.1.self_attn.q_proj.bias",
        "vision_adapter.mlp.fc2.weight",
    } <= keys
    assert not any("rot" in k or "freq" in k for k in keys)


def test_rope_table_matches_reference():
    hf_freqs = hf.Llama4VisionRotaryEmbedding(_hf_config()).freqs_ci  # [577, 1, head_dim // 2] complex
    cos, sin = vision_rope_cos_sin(VisionConfig.from_dict(HF_VISION))
    assert torch.equal(cos, hf_freqs.real[:, 0]) and torch.equal(sin, hf_freqs.imag[:, 0])
    assert torch.equal(cos[-1], torch.ones_like(cos[-1])) and torch.equal(sin[-1], torch.zeros_like(sin[-1]))


def test_pixel_shuffle_matches_reference():
    x = torch.randn(2, 576, 8)
    assert torch.equal(pixel_shuffle(x, 0.5), hf.pixel_shuffle(x, 0.5))  # [2, 144, 32]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_forward_matches_reference_fp32(oracle, ours, tiles, attn):
    oracle.config._attn_implementation = attn
    for layer in oracle.model.layers:
        layer.self_attn.config._attn_implementation = attn
    with torch.no_grad():
        want = oracle(tiles).last_hidden_state
        got = ours(tiles)
    assert got.shape == (3, 144, 128) == want.shape
    assert want.abs().max() > 0.1  # not a degenerate comparison
    assert (got - want).abs().max().item() <= 1e-5


def test_chunked_equals_unchunked(ours, tiles):
    with torch.no_grad():
        whole = ours(tiles)
        chunked = ours(tiles, max_tiles_per_batch=1)
        pairs = ours(tiles, max_tiles_per_batch=2)
    assert (chunked - whole).abs().max().item() <= 1e-5
    assert (pairs - whole).abs().max().item() <= 1e-5


def test_bf16_close_to_fp32(oracle, tiles):
    fp32 = VisionModel(VisionConfig.from_dict(HF_VISION)).eval()
    fp32.load_state_dict(oracle.state_dict(), strict=True)
    bf16 = VisionModel(VisionConfig.from_dict(HF_VISION)).eval()
    bf16.load_state_dict(oracle.state_dict(), strict=True)
    bf16.to(torch.bfloat16)
    with torch.no_grad():
        want = fp32(tiles)
        got = bf16(tiles.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 0.02, rel  # reached ~0.006


def test_rejects_wrong_tile_shape(ours):
    with pytest.raises(ValueError, match="pixel_values"):
        ours(torch.zeros(1, 3, 224, 224))


def test_projector_matches_reference():
    text = dict(
        hidden_size=96,
        intermediate_size=64,
        intermediate_size_mlp=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        vocab_size=256,
    )
    full = Llama4Config(vision_config=HF_VISION, text_config=text)
    torch.manual_seed(2)
    want_mod = hf.Llama4MultiModalProjector(full).eval()
    ours = MultiModalProjector(vision_output_dim=128, text_hidden_size=96).eval()
    ours.load_state_dict(want_mod.state_dict(), strict=True)
    assert list(ours.state_dict()) == ["linear_1.weight"]
    feats = torch.randn(3, 144, 128)
    with torch.no_grad():
        assert torch.equal(ours(feats), want_mod(feats))  # [3, 144, 96]
