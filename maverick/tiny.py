"""Build the embedded default: a tiny checkpoint with Maverick's architecture and file format.

    python -m maverick.tiny models/tiny-maverick              # FP8 experts, like the FP8 release
    python -m maverick.tiny models/tiny-maverick-bf16 --bf16  # fused bf16 experts, like the bf16 release

The output is a Hugging Face `Llama4ForConditionalGeneration` directory: config.json,
generation_config.json, sharded safetensors with their index, tokenizer files with the chat
template, and the image processor config. Same seed, same bytes. Its text is gibberish; its code
paths (interleaved dense/MoE layers, NoPE layers every 4th, chunked attention with a 32-token chunk,
temperature tuning, top-1 sigmoid router + shared expert, GQA, vision tower on 336x336 tiles) are
the real ones.

The weights are drawn wider than the usual 0.02 init (about unit-variance activations, logits with
a std of a few units) so that greedy choices are well separated and two correct implementations
agree token for token.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from maverick.checkpoint import param_shards, plain_targets
from maverick.config import ModelConfig
from maverick.image import image_processor_config
from maverick.layers.fp8 import quantize_rowwise
from maverick.layers.moe import RoutedExperts
from maverick.models.llama4 import Llama4Model
from maverick.tiny_tokenizer import write_tokenizer

BASE_VOCAB = (
    2000  # byte-level BPE ranks; Llama 4's 2048 special tokens follow, as 200000.. do in the real one
)
NUM_SHARDS = 3


def tiny_config(bf16: bool = False) -> dict:
    bos = BASE_VOCAB
    text = {
        "model_type": "llama4_text",
        "vocab_size": BASE_VOCAB + 2048,
        "hidden_size": 128,
        "intermediate_size": 128,
        "intermediate_size_mlp": 256,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_local_experts": 8,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 2,
        "moe_layers": [1, 3, 5, 7],
        "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(8)],
        "attention_chunk_size": 32,
        "attn_temperature_tuning": True,
        "floor_scale": 32,  # Maverick: 8192; small so test prompts reach tuned positions
        "attn_scale": 0.1,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "use_qk_norm": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": bos,
        "eos_token_id": [bos + 1, bos + 7, bos + 8],
        "pad_token_id": bos + 18,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    vision = {
        "model_type": "llama4_vision_model",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 256,  # = hidden / pixel_shuffle_ratio^2
        "num_channels": 3,
        "image_size": 336,
        "patch_size": 14,
        "norm_eps": 1e-5,
        "pixel_shuffle_ratio": 0.5,
        "projector_input_dim": 128,
        "projector_output_dim": 128,
        "vision_output_dim": 128,
        "rope_theta": 10000,
        "hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "multi_modal_projector_bias": False,
    }
    cfg = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "boi_token_index": bos + 80,
        "eoi_token_index": bos + 81,
        "image_token_index": bos + 92,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": text,
        "vision_config": vision,
    }
    if not bf16:
        cfg["quantization_config"] = _quantization_config(text)
    return cfg


def _quantization_config(text: dict) -> dict:
    """compressed-tensors, as in the Maverick FP8 release: only routed experts are quantized."""
    ignore = ["language_model.lm_head", "re:vision_model.*", "re:multi_modal_projector.*"]
    for i in range(text["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}"
        ignore += [f"{p}.self_attn.{n}_proj" for n in "qkvo"]
        if i in text["moe_layers"]:
            ignore += [f"{p}.feed_forward.router"] + [
                f"{p}.feed_forward.shared_expert.{n}_proj" for n in ("gate", "up", "down")
            ]
        else:
            ignore += [f"{p}.feed_forward.{n}_proj" for n in ("gate", "up", "down")]
    scheme = {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "block_structure": None,
        "actorder": None,
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**scheme, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": {**scheme, "strategy": "token", "dynamic": True, "observer": None},
                "output_activations": None,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def _init(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A wide, seeded init: unit-variance activations through linears, near-1 norms."""
    if name.endswith(("layernorm.weight", "norm.weight", "layernorm_pre.weight", "layernorm_post.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g)
    if name.endswith("lm_head.weight"):
        return 4.0 / math.sqrt(shape[-1]) * torch.randn(shape, generator=g)
    if len(shape) == 1 or name.endswith(("class_embedding", "positional_embedding_vlm")):
        return 0.5 * torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])  # [.., out, in]: std 1/sqrt(fan_in)


def build_weights(config: dict, seed: int, bf16: bool) -> dict[str, torch.Tensor]:
    """Checkpoint tensors named and laid out as in the real release."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Llama4Model(
            ModelConfig.from_dict({k: v for k, v in config.items() if k != "quantization_config"})
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, (target, _) in plain_targets(model, param_shards(model)).items():
        tensors[name] = _init(name, tuple(target.shape), g).to(torch.bfloat16)
    for prefix, experts in model.named_modules():
        if not isinstance(experts, RoutedExperts):
            continue
        E, two_i, H = experts.w13.shape
        gate_up = torch.randn(E, two_i, H, generator=g) / math.sqrt(H)  # [E, 2I, H]
        down = torch.randn(E, H, two_i // 2, generator=g) / math.sqrt(two_i // 2)  # [E, H, I]
        if bf16:
            tensors[f"{prefix}.gate_up_proj"] = gate_up.transpose(1, 2).to(torch.bfloat16)  # [E, H, 2I]
            tensors[f"{prefix}.down_proj"] = down.transpose(1, 2).to(torch.bfloat16)  # [E, I, H]
            continue
        for e in range(E):
            halves = (("gate", gate_up[e, : two_i // 2]), ("up", gate_up[e, two_i // 2 :]), ("down", down[e]))
            for proj, w in halves:
                w_fp8, scale = quantize_rowwise(w)
                tensors[f"{prefix}.{e}.{proj}_proj.weight"] = w_fp8
                tensors[f"{prefix}.{e}.{proj}_proj.weight_scale"] = scale  # [out, 1] fp32
    return tensors


def write_checkpoint(out_dir: str | Path, seed: int = 0, bf16: bool = False) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(bf16)
    tensors = build_weights(config, seed, bf16)
    names = list(tensors)
    shards = [names[i::NUM_SHARDS] for i in range(NUM_SHARDS)]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, out / fname, metadata={"format": "pt"})
        # safetensors writes its files owner-only (0600); readable like the JSON beside them, so that
        # a server running as another user (the images' non-root one) can load what root built
        (out / fname).chmod(0o644)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / "model.safetensors.index.json", index)
    _write_json(out / "config.json", config)
    text = config["text_config"]
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": text["bos_token_id"],
            "eos_token_id": text["eos_token_id"],
            "pad_token_id": text["pad_token_id"],
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        },
    )
    write_tokenizer(out, base_vocab_size=BASE_VOCAB, model_max_length=text["max_position_embeddings"])
    _write_json(out / "preprocessor_config.json", image_processor_config())
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="fused bf16 experts and no quantization_config")
    args = ap.parse_args()
    out = write_checkpoint(args.out_dir, seed=args.seed, bf16=args.bf16)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
