"""The oracle: transformers' own Llama 4 on the same checkpoint directory, in fp32.

transformers cannot run the compressed-tensors FP8 experts on the CPU, so this module reads the
safetensors itself (not through maverick's loader), dequantizes each FP8 expert (w * row scale),
fuses them into the bf16 release's layout and loads the result strictly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Llama4Config, Llama4ForConditionalGeneration

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def hf_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    raw: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            raw.update({k: st.get_tensor(k) for k in st.keys()})  # noqa: SIM118
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for k, t in raw.items():
        if k.endswith(".weight_scale"):
            continue
        if m := _EXPERT.match(k):
            w = t.float() * raw[k + "_scale"].float()  # [out, in] * [out, 1]
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = w
        else:
            out[k] = t.float()
    for prefix, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")].t(), parts[(e, "up")].t()], dim=1) for e in range(n)]
        )  # [E, H, 2I], gate columns first
        out[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")].t() for e in range(n)])  # [E, I, H]
    return out


def load_reference(ckpt: str | Path, attn_implementation: str = "eager") -> Llama4ForConditionalGeneration:
    ckpt = Path(ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("quantization_config", None)
    config = Llama4Config(**cfg)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    model = Llama4ForConditionalGeneration(config).float().eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(ckpt), strict=False)
    # Non-persistent buffers are all the model may lack; nothing in the checkpoint may go unused.
    assert not unexpected, unexpected
    assert not missing, missing
    return model
