"""Strict, streaming loading of a Hugging Face Llama 4 checkpoint directory into `Llama4Model`.

Every checkpoint tensor must be consumed, every model parameter filled, and every shape and dtype
must be the expected one; anything else is a `CheckpointError` whose one-line message names the
tensor. One tensor is read at a time (safetensors memory maps the files), so host memory stays
small even for the 400 GB release.

Two expert layouts are understood:
- FP8 (compressed-tensors, the Maverick FP8 release): per expert, unfused
  `...feed_forward.experts.{e}.{gate,up,down}_proj.weight` float8_e4m3fn [out, in] with
  `.weight_scale` [out, 1];
- bf16 (the plain release): fused `...feed_forward.experts.gate_up_proj` [E, H, 2I] (gate columns
  first) and `...experts.down_proj` [E, I, H].
Both land in the model's stacked w13 [E, 2I, H] / w2 [E, H, I], kept in FP8 (run through
`_scaled_mm`) or turned into the compute dtype.

Tensor parallel: a rank reads only its piece of each tensor from the file (safetensors slices;
each parameter's `Shard` says which piece), so no rank materialises more than its shard plus the
piece being copied. The vision tower's tensors are skipped on the ranks that have none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from maverick.config import ModelConfig
from maverick.layers.fp8 import FP8_DTYPE, dequantize, fp8_supported, quantize_rowwise
from maverick.layers.linear import MergedColumnLinear
from maverick.layers.moe import RoutedExperts
from maverick.layers.parallel import SINGLE, Shard, TensorParallel, shape_of, shard_of
from maverick.models.llama4 import Llama4Model

ExpertMode = Literal["auto", "fp8", "dequant"]

_UNFUSED = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.(weight|weight_scale)$")
_FUSED = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model, with the offending tensor named."""


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{path}: the index names {f.name}, which does not exist")
    return files


@dataclass
class _ExpertParts:
    """Pending FP8 halves of one expert projection when the model wants it dequantized."""

    weight: torch.Tensor | None = None
    scale: torch.Tensor | None = None


def _read(tensor, shard: Shard | None) -> torch.Tensor:
    """The rank's piece of a safetensors slice (or tensor), read from the file only in part."""
    return tensor[:] if shard is None else shard.take(tensor)


def param_shards(model: Llama4Model) -> dict[str, Shard | None]:
    """Each parameter's piece on this rank, read while the model is on the meta device (moving it
    makes new parameter objects, without the annotation)."""
    return {name: shard_of(p) for name, p in model.state_dict(keep_vars=True).items()}


def plain_targets(
    model: Llama4Model, shards: dict[str, Shard | None]
) -> dict[str, tuple[torch.Tensor, Shard | None]]:
    """Checkpoint name -> (where it goes in the model, the rank's piece of it), for every tensor
    but the routed experts. Merged projections (qkv, gate_up) take their parts' names and rows."""
    targets: dict[str, tuple[torch.Tensor, Shard | None]] = {}
    merged = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, MergedColumnLinear)}
    for name, param in model.state_dict(keep_vars=True).items():
        if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), RoutedExperts):
            continue
        if name in merged:
            parent = name.rsplit(".", 2)[0]
            for part in merged[name].parts:
                rows = merged[name].part_rows(part)
                targets[f"{parent}.{part}.weight"] = (param.data[rows], merged[name].part_shards[part])
        else:
            targets[name] = (param.data, shards[name])
    return targets


class _Loader:
    def __init__(self, model: Llama4Model, shards: dict[str, Shard | None], quantize_experts: bool):
        self.model = model
        self.quantize_experts = quantize_experts  # bf16 checkpoint experts -> FP8 at load
        self.params = plain_targets(model, shards)
        self.filled: set[str] = set()  # plain tensors, and "{experts}.{e}.{gate|up|down}" parts
        self.pending: dict[str, _ExpertParts] = {}
        self.cfg = model.config.text

    # -- plain tensors -------------------------------------------------------------------------
    def load_plain(self, name: str, sl) -> None:
        if name in self.filled:
            raise CheckpointError(f"tensor '{name}' appears twice in the checkpoint")
        if name not in self.params:
            raise CheckpointError(f"unexpected tensor '{name}' (the model has no such parameter)")
        param, shard = self.params[name]
        want = list(param.shape) if shard is None else list(shard.full_shape(tuple(param.shape)))
        if list(shape_of(sl)) != want:
            raise CheckpointError(f"tensor '{name}' has shape {list(shape_of(sl))}, expected {want}")
        t = _read(sl, shard)
        if t.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor '{name}' has dtype {t.dtype}; only routed experts may be {FP8_DTYPE}"
            )
        with torch.no_grad():
            param.copy_(t)
        self.filled.add(name)

    # -- experts -------------------------------------------------------------------------------
    def _experts(self, prefix: str, name: str) -> RoutedExperts:
        try:
            mod = self.model.get_submodule(prefix)
        except AttributeError:
            mod = None
        if not isinstance(mod, RoutedExperts):
            raise CheckpointError(f"unexpected tensor '{name}' (layer is not a MoE layer in this config)")
        return mod

    def _store_expert(
        self, experts, e: int, proj: str, w: torch.Tensor, scale: torch.Tensor | None, name: str
    ):
        """w [out, in] for one expert's gate/up/down (this rank's slice), scale [out] or None."""
        inter = experts.intermediate_size
        if e >= experts.num_experts:
            raise CheckpointError(
                f"tensor '{name}': expert {e} but the config has {experts.num_experts} experts"
            )
        target, rows = (experts.w2, slice(None)) if proj == "down" else (experts.w13, slice(0, inter))
        if proj == "up":
            rows = slice(inter, 2 * inter)
        want = tuple(target[e, rows].shape)
        if tuple(w.shape) != want:
            raise CheckpointError(
                f"tensor '{name}' has shape {list(w.shape)} for this rank, expected {list(want)}"
            )
        with torch.no_grad():
            if experts.fp8:
                if scale is None:  # bf16 checkpoint quantized at load
                    w, scale = quantize_rowwise(w.float())
                target[e, rows].copy_(w)
                (experts.w2_scale if proj == "down" else experts.w13_scale)[e, rows].copy_(scale.reshape(-1))
            else:
                target[e, rows].copy_(dequantize(w, scale, target.dtype) if scale is not None else w)

    def load_unfused(self, m: re.Match, name: str, sl) -> None:
        prefix, e, proj, kind = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        experts = self._experts(prefix, name)
        key = f"{prefix}.{e}.{proj}"
        # gate/up are column parallel (their rows, and the rows' scales); down is row parallel
        # (its columns; each output row keeps its whole scale)
        dim = 1 if (proj == "down" and kind == "weight") else (None if proj == "down" else 0)
        if dim is not None and len(shape_of(sl)) != 2:
            raise CheckpointError(f"tensor '{name}' must be 2-D, got shape {list(shape_of(sl))}")
        t = _read(sl, None if dim is None else experts.tp.shard(dim))
        if kind == "weight" and t.dtype != FP8_DTYPE:
            raise CheckpointError(f"tensor '{name}' has dtype {t.dtype}, expected {FP8_DTYPE}")
        if kind == "weight_scale":
            if t.dtype not in _FLOAT_DTYPES or t.dim() != 2 or t.shape[1] != 1:
                raise CheckpointError(
                    f"tensor '{name}' must be a float [out, 1] per-row scale, got {t.dtype} {list(t.shape)}"
                )
            t = t.float()
        parts = self.pending.setdefault(key, _ExpertParts())
        if getattr(parts, "weight" if kind == "weight" else "scale") is not None:
            raise CheckpointError(f"tensor '{name}' appears twice in the checkpoint")
        setattr(parts, "weight" if kind == "weight" else "scale", t)
        if parts.weight is not None and parts.scale is not None:
            self._store_expert(experts, e, proj, parts.weight, parts.scale, name)
            del self.pending[key]
            self.filled.add(key)

    def load_fused(self, m: re.Match, name: str, sl) -> None:
        prefix, which = m.group(1), m.group(2)
        experts = self._experts(prefix, name)
        E, H, inter_all = experts.num_experts, self.cfg.hidden_size, self.cfg.intermediate_size
        want = [E, H, 2 * inter_all] if which == "gate_up_proj" else [E, inter_all, H]
        if list(shape_of(sl)) != want:
            raise CheckpointError(f"tensor '{name}' has shape {list(shape_of(sl))}, expected {want}")
        a, b = (0, inter_all) if experts.tp.size == 1 else experts.tp.shard(0).bounds(inter_all)
        if which == "gate_up_proj":  # [E, H, 2I], gate columns first: this rank's of each half
            parts = {"gate": sl[:, :, a:b], "up": sl[:, :, inter_all + a : inter_all + b]}
        else:  # [E, I, H]: this rank's rows
            parts = {"down": sl[:, a:b, :]}
        for proj, t in parts.items():
            if t.dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"tensor '{name}' has dtype {t.dtype}, expected a float dtype")
            for e in range(E):
                self._store_expert(experts, e, proj, t[e].t(), None, name)  # [out, in]
                self.filled.add(f"{prefix}.{e}.{proj}")

    # -- bookkeeping ---------------------------------------------------------------------------
    def load(self, name: str, t) -> None:
        """t: a safetensors slice (or a tensor): only this rank's piece of it is read."""
        if not self.model.has_vision and name.startswith(_VISION_PREFIXES):
            return  # rank 0 encodes the images
        if m := _UNFUSED.match(name):
            self.load_unfused(m, name, t)
        elif m := _FUSED.match(name):
            self.load_fused(m, name, t)
        else:
            self.load_plain(name, t)

    def check_complete(self) -> None:
        if self.pending:
            key, parts = next(iter(self.pending.items()))
            half = "weight_scale" if parts.scale is None else "weight"
            raise CheckpointError(f"missing tensor '{key}_proj.{half}'")
        for prefix, mod in self.model.named_modules():
            if isinstance(mod, RoutedExperts):
                for e in range(mod.num_experts):
                    for proj in ("gate", "up", "down"):
                        if f"{prefix}.{e}.{proj}" not in self.filled:
                            raise CheckpointError(
                                f"missing tensor '{prefix}.{e}.{proj}_proj.weight' (expert {e})"
                            )
        missing = [n for n in self.params if n not in self.filled]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"missing tensor '{missing[0]}'{more}")


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    experts: ExpertMode = "auto",
    quantize_experts: bool = False,
    tp: TensorParallel = SINGLE,
) -> Llama4Model:
    """Build `Llama4Model` for `path` and fill it strictly from its safetensors.

    experts: "fp8" keeps FP8 experts in FP8 (`_scaled_mm`), "dequant" turns them into `dtype`,
    "auto" picks fp8 where the device has FP8 GEMMs (CUDA, compute capability 8.9+) and dequant
    elsewhere: the CPU runs `_scaled_mm` (so "fp8" works there, for tests), but several times
    slower than a float matmul. `quantize_experts` quantizes a bf16 checkpoint's experts to FP8
    at load. `tp`: this rank's place in a tensor-parallel group; it builds and reads its shard.
    """
    path, device = Path(path), torch.device(device)
    config = ModelConfig.from_dir(path)
    if experts == "fp8" and not fp8_supported(device):
        raise CheckpointError(
            f"FP8 experts need a GPU of compute capability 8.9+ or the CPU; {device} has none"
        )
    fp8_native = device.type == "cuda" and fp8_supported(device)
    fp8 = (config.quant is not None or quantize_experts) and (
        experts == "fp8" or (experts == "auto" and fp8_native)
    )
    with torch.device("meta"):
        model = Llama4Model(config, dtype=dtype, fp8_experts=fp8, tp=tp)
    shards = param_shards(model)
    model.to_empty(device=device)
    loader = _Loader(model, shards, quantize_experts)
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                loader.load(name, f.get_slice(name))
    loader.check_complete()
    return model.eval()
