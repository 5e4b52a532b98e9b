"""The `maverick` model's engine settings, read strictly from its config.pbtxt `parameters`.

Every key must be an EngineConfig field (unknown keys are an error, so a typo never goes
unnoticed); values arrive as strings and are converted to the field's type. "auto" for `device`,
when CUDA is there: the GPU Triton gave a KIND_GPU instance; for a KIND_MODEL instance, which
Triton gives no device, the first of its own set of tensor_parallel_size GPUs, by its index among
the model's instances (instance i of T ranks: cuda:i·T, its ranks on cuda:i·T .. i·T+T-1; all
instances × T must be visible); else cuda:0; without CUDA, the CPU. "auto" for `dtype` is bfloat16
on a GPU and float32 on the CPU; "auto" for `cpu_threads` is half the cores on the CPU, shared
among the engine processes of all instances and ranks (they share the cores with tritonserver, the
other models' stubs and, on a dev box, the clients), torch's default on a GPU. A relative
`model_dir` is resolved against the project root (the folder that holds the model repository).
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from maverick.engine.api import EngineConfig
from maverick.plan import check_gpus

_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


class EngineArgsError(ValueError):
    pass


def convert(name: str, raw: str):
    """One parameter's string as its EngineConfig field's type; EngineArgsError if it is none."""
    if name not in _FIELDS:
        raise EngineArgsError(f"unknown engine parameter {name!r}; known: {sorted(_FIELDS)}")
    hint = typing.get_type_hints(EngineConfig)[name]
    if typing.get_origin(hint) is typing.Literal:
        if raw not in typing.get_args(hint):
            raise EngineArgsError(f"parameter {name}: {raw!r} is not one of {typing.get_args(hint)}")
        return raw
    if isinstance(hint, types.UnionType):  # `int | None`
        if raw.strip().lower() in ("", "none", "null"):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    try:
        if hint is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        return hint(raw)
    except ValueError:
        raise EngineArgsError(f"parameter {name}: {raw!r} is not a valid {hint.__name__}") from None


@dataclass(frozen=True)
class Instance:
    """One Triton instance of the model, from the Python backend's `args` (instance names are
    `<group name>_<index>`, the group's name `<model>_<group index>` unless the config names it)."""

    name: str  # e.g. "maverick_0_1"
    index: int  # among all the model's instances, groups in config order
    count: int  # instances of the model, all groups
    device_id: int | None  # the GPU Triton gave a KIND_GPU instance; None for KIND_CPU / KIND_MODEL

    @classmethod
    def from_args(cls, args: dict[str, str], model_config: dict) -> Instance:
        name = args["model_instance_name"]
        groups = model_config.get("instance_group") or []
        index = None
        for i, group in enumerate(groups):
            prefix = group.get("name") or f"{model_config.get('name')}_{i}"
            m = re.fullmatch(re.escape(prefix) + r"_(\d+)", name)
            if m:
                index = sum(int(g.get("count", 1)) for g in groups[:i]) + int(m.group(1))
        if index is None:
            raise EngineArgsError(f"instance {name!r} is in none of the instance groups {groups}")
        kind = args.get("model_instance_kind")
        device_id = int(args["model_instance_device_id"]) if kind == "GPU" else None
        return cls(name, index, sum(int(g.get("count", 1)) for g in groups) or 1, device_id)


def engine_config(
    parameters: dict[str, str],
    project_root: Path,
    instance: Instance | None = None,
    cuda: bool | None = None,
) -> EngineConfig:
    """The EngineConfig of `parameters` for this instance (None: a lone engine, as in tests and
    benchmarks); `cuda` says whether the "auto" settings resolve for a GPU (None: whether this
    process sees one; the planner passes its profile's target)."""
    unknown = sorted(set(parameters) - set(_FIELDS))
    if unknown:
        raise EngineArgsError(f"unknown engine parameters {unknown}; known: {sorted(_FIELDS)}")
    if "model_dir" not in parameters:
        raise EngineArgsError("parameter model_dir is required")
    values = {
        name: raw if (name, raw) == ("cpu_threads", "auto") else convert(name, raw)
        for name, raw in parameters.items()
    }
    model_dir = Path(values["model_dir"])
    values["model_dir"] = str(model_dir if model_dir.is_absolute() else (project_root / model_dir).resolve())
    cuda = torch.cuda.is_available() if cuda is None else cuda
    tp = values.get("tensor_parallel_size", 1)
    processes = tp * (instance.count if instance else 1)  # engine processes sharing this host
    if values.get("device", "auto") == "auto":
        values["device"] = _auto_device(instance, tp) if cuda else "cpu"
    if values.get("dtype", "auto") == "auto":
        values["dtype"] = "bfloat16" if values["device"].startswith("cuda") else "float32"
    if values.get("cpu_threads") == "auto":
        on_cpu = values["device"] == "cpu"
        values["cpu_threads"] = max(1, (os.cpu_count() or 1) // (2 * processes)) if on_cpu else None
    try:
        return EngineConfig(**values)
    except (TypeError, ValueError) as e:
        raise EngineArgsError(str(e)) from None


def _auto_device(instance: Instance | None, tp: int) -> str:
    """The first GPU of this instance's set (see the module's docstring)."""
    if instance is None:
        return "cuda:0"
    if instance.device_id is not None:  # KIND_GPU: Triton placed it
        return f"cuda:{instance.device_id}"
    try:
        check_gpus(instance.count, tp, torch.cuda.device_count(), f"instance {instance.name}")
    except ValueError as e:
        raise EngineArgsError(str(e)) from None
    return f"cuda:{instance.index * tp}"
