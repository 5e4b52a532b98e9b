"""Typed, frozen configs read from a Hugging Face Llama 4 checkpoint directory.

`ModelConfig.from_dir(path)` reads `config.json` (a `Llama4ForConditionalGeneration` config with
`text_config`, `vision_config` and optionally a compressed-tensors `quantization_config`) once and
validates it. Nothing downstream reads the JSON again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The directory is not a Llama 4 checkpoint we can serve, with the reason in one line."""


def _get(d: dict[str, Any], key: str, default: Any = ..., where: str = "") -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is ...:
        raise ConfigError(f"config.json: missing '{where}{key}'")
    return default


def _rope_theta(d: dict[str, Any], default: float) -> float:
    # transformers 4.x stores `rope_theta` at the top level; 5.x nests it in `rope_parameters`.
    params = d.get("rope_parameters") or {}
    return float(params.get("rope_theta", d.get("rope_theta", default)))


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # each routed expert and the shared expert
    intermediate_size_mlp: int  # dense (non-MoE) layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    no_rope_layers: tuple[int, ...]  # 1 = RoPE + chunked local attention, 0 = NoPE + full attention
    attention_chunk_size: int
    rope_theta: float
    rms_norm_eps: float
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    max_position_embeddings: int
    use_qk_norm: bool
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None

    def uses_rope(self, layer: int) -> bool:
        return bool(self.no_rope_layers[layer])

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextConfig:
        w = "text_config."
        n_layers = int(_get(d, "num_hidden_layers", where=w))
        n_heads = int(_get(d, "num_attention_heads", where=w))
        hidden = int(_get(d, "hidden_size", where=w))
        interval = int(d.get("no_rope_layer_interval") or 4)
        no_rope = d.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
        step = int(d.get("interleave_moe_layer_step") or 1)
        moe_layers = d.get("moe_layers")
        if moe_layers is None:
            moe_layers = list(range(step - 1, n_layers, step))
        eos = _get(d, "eos_token_id", where=w)
        eos = [eos] if isinstance(eos, int) else list(eos)
        if d.get("rope_scaling") or (d.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise ConfigError(
                "config.json: rope scaling (Llama 4 Scout style) is not supported; Maverick uses none"
            )
        tuning = d.get("attn_temperature_tuning", True)
        cfg = cls(
            vocab_size=int(_get(d, "vocab_size", where=w)),
            hidden_size=hidden,
            intermediate_size=int(_get(d, "intermediate_size", where=w)),
            intermediate_size_mlp=int(_get(d, "intermediate_size_mlp", where=w)),
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or hidden // n_heads),
            num_local_experts=int(_get(d, "num_local_experts", where=w)),
            num_experts_per_tok=int(d.get("num_experts_per_tok") or 1),
            moe_layers=tuple(int(i) for i in moe_layers),
            no_rope_layers=tuple(int(i) for i in no_rope),
            attention_chunk_size=int(d.get("attention_chunk_size") or 8192),
            rope_theta=_rope_theta(d, 500000.0),
            rms_norm_eps=float(d.get("rms_norm_eps") or 1e-5),
            # Old configs store the flag as an int (4); any truthy value turns it on.
            attn_temperature_tuning=bool(tuning),
            floor_scale=float(d.get("floor_scale") or 8192),
            attn_scale=float(d.get("attn_scale") if d.get("attn_scale") is not None else 0.1),
            max_position_embeddings=int(d.get("max_position_embeddings") or 131072),
            use_qk_norm=bool(d.get("use_qk_norm", False)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=int(_get(d, "bos_token_id", where=w)),
            eos_token_ids=tuple(int(i) for i in eos),
            pad_token_id=d.get("pad_token_id"),
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if len(self.no_rope_layers) < self.num_hidden_layers:
            raise ConfigError("config.json: text_config.no_rope_layers is shorter than num_hidden_layers")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts_per_tok != 1:
            raise ConfigError(
                "config.json: only top-1 routing (num_experts_per_tok=1) is supported, as in Llama 4"
            )
        if self.head_dim % 2:
            raise ConfigError("config.json: head_dim must be even for rotary embeddings")
        if any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            raise ConfigError("config.json: text_config.moe_layers names a layer that does not exist")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int  # encoder MLP width; also the pixel-shuffled width fed to the adapter
    num_channels: int
    image_size: int  # tile side in pixels (336)
    patch_size: int  # 14
    norm_eps: float
    pixel_shuffle_ratio: float
    projector_input_dim: int
    projector_output_dim: int
    vision_output_dim: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """`<|patch|>` tokens one tile becomes after pixel shuffle (144 for 336/14 and ratio 0.5)."""
        return int(self.patches_per_side**2 * self.pixel_shuffle_ratio**2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        w = "vision_config."
        hidden = int(_get(d, "hidden_size", where=w))
        cfg = cls(
            hidden_size=hidden,
            num_hidden_layers=int(_get(d, "num_hidden_layers", where=w)),
            num_attention_heads=int(_get(d, "num_attention_heads", where=w)),
            intermediate_size=int(_get(d, "intermediate_size", where=w)),
            num_channels=int(d.get("num_channels") or 3),
            image_size=int(_get(d, "image_size", where=w)),
            patch_size=int(_get(d, "patch_size", where=w)),
            norm_eps=float(d.get("norm_eps") or 1e-5),
            pixel_shuffle_ratio=float(_get(d, "pixel_shuffle_ratio", where=w)),
            projector_input_dim=int(_get(d, "projector_input_dim", where=w)),
            projector_output_dim=int(_get(d, "projector_output_dim", where=w)),
            vision_output_dim=int(_get(d, "vision_output_dim", where=w)),
            rope_theta=_rope_theta(d, 10000.0),
        )
        if cfg.image_size % cfg.patch_size:
            raise ConfigError("config.json: vision image_size must be a multiple of patch_size")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError("config.json: vision hidden_size must be a multiple of num_attention_heads")
        shuffled = int(cfg.hidden_size / cfg.pixel_shuffle_ratio**2)
        if shuffled != cfg.intermediate_size:
            raise ConfigError(
                f"config.json: vision intermediate_size {cfg.intermediate_size} must equal the "
                f"pixel-shuffled "
                f"width hidden_size/ratio^2 = {shuffled}"
            )
        if cfg.projector_output_dim != cfg.vision_output_dim:
            raise ConfigError("config.json: vision projector_output_dim must equal vision_output_dim")
        return cfg


@dataclass(frozen=True)
class QuantConfig:
    """How the routed experts are stored. `None` on ModelConfig means an all-bf16 checkpoint.

    compressed-tensors `float-quantized`, as in the Maverick FP8 release: weights float8_e4m3fn with
    one fp32 scale per output row (`weight_scale [out, 1]`), activations quantized per token at
    run time. Modules whose names match `ignore` stay in bf16.
    """

    method: str  # "compressed-tensors"
    weight_dtype: str  # "float8_e4m3fn"
    ignore: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, q: dict[str, Any]) -> QuantConfig:
        method = q.get("quant_method")
        if method != "compressed-tensors":
            raise ConfigError(
                f"config.json: unsupported quantization method {method!r} (want 'compressed-tensors')"
            )
        groups = q.get("config_groups") or {}
        if len(groups) != 1:
            raise ConfigError("config.json: expected exactly one compressed-tensors config group")
        (group,) = groups.values()
        wt, act = group.get("weights") or {}, group.get("input_activations") or {}
        want_w = {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True}
        want_a = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
        for name, got, want in (("weights", wt, want_w), ("input_activations", act, want_a)):
            bad = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
            if bad:
                raise ConfigError(
                    f"config.json: unsupported compressed-tensors {name} scheme {bad}; want {want}"
                )
        fmt = q.get("format", "float-quantized")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ConfigError(f"config.json: unsupported compressed-tensors format {fmt!r}")
        return cls(
            method="compressed-tensors", weight_dtype="float8_e4m3fn", ignore=tuple(q.get("ignore") or ())
        )


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    quant: QuantConfig | None
    image_token_id: int  # <|patch|>: the positions whose embeddings image features replace
    boi_token_id: int
    eoi_token_id: int

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: not a directory")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: no config.json, not a Hugging Face checkpoint directory")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: invalid JSON ({e})") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type != "llama4":
            raise ConfigError(
                f"config.json: model_type is {model_type!r}, not 'llama4' (not a Llama 4 checkpoint)"
            )
        archs = raw.get("architectures") or ["Llama4ForConditionalGeneration"]
        if "Llama4ForConditionalGeneration" not in archs:
            raise ConfigError(
                f"config.json: architectures {archs} do not include Llama4ForConditionalGeneration"
            )
        if not isinstance(raw.get("text_config"), dict) or not isinstance(raw.get("vision_config"), dict):
            raise ConfigError("config.json: needs both text_config and vision_config")
        q = raw.get("quantization_config")
        text = TextConfig.from_dict(raw["text_config"])
        vision = VisionConfig.from_dict(raw["vision_config"])
        if text.use_qk_norm:
            raise ConfigError(
                "config.json: use_qk_norm=True (Llama 4 Scout) is not supported; this engine serves Maverick"
            )
        return cls(
            text=text,
            vision=vision,
            quant=QuantConfig.from_dict(q) if q else None,
            image_token_id=int(raw.get("image_token_index", 200092)),
            boi_token_id=int(raw.get("boi_token_index", 200080)),
            eoi_token_id=int(raw.get("eoi_token_index", 200081)),
        )
