"""The `maverick` model's engine settings, read strictly from its config.pbtxt `parameters`.

Every key must be an EngineConfig field (unknown keys are an error, so a typo never goes
unnoticed); values arrive as strings and are converted to the field's type. "auto" for `device`
picks the GPU Triton gave the instance (or cuda:0) when CUDA is there, else the CPU; "auto" for
`dtype` is bfloat16 on a GPU and float32 on the CPU; "auto" for `cpu_threads` is half the cores on
the CPU (the engine process shares them with tritonserver, the other models' stubs and, on a dev
box, the clients) and torch's default on a GPU. A relative `model_dir` is resolved against
the project root (the folder that holds the model repository).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path

import torch

from maverick.engine.api import EngineConfig

_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}


class EngineArgsError(ValueError):
    pass


def _convert(name: str, raw: str):
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


def engine_config(
    parameters: dict[str, str], project_root: Path, device_id: int | None = None
) -> EngineConfig:
    unknown = sorted(set(parameters) - set(_FIELDS))
    if unknown:
        raise EngineArgsError(f"unknown engine parameters {unknown}; known: {sorted(_FIELDS)}")
    if "model_dir" not in parameters:
        raise EngineArgsError("parameter model_dir is required")
    values = {
        name: raw if (name, raw) == ("cpu_threads", "auto") else _convert(name, raw)
        for name, raw in parameters.items()
    }
    model_dir = Path(values["model_dir"])
    values["model_dir"] = str(model_dir if model_dir.is_absolute() else (project_root / model_dir).resolve())
    cuda = torch.cuda.is_available()
    if values.get("device", "auto") == "auto":
        values["device"] = f"cuda:{device_id or 0}" if cuda else "cpu"
    if values.get("dtype", "auto") == "auto":
        values["dtype"] = "bfloat16" if values["device"].startswith("cuda") else "float32"
    if values.get("cpu_threads") == "auto":
        on_cpu = values["device"] == "cpu"
        values["cpu_threads"] = max(1, (os.cpu_count() or 1) // 2) if on_cpu else None
    try:
        return EngineConfig(**values)
    except (TypeError, ValueError) as e:
        raise EngineArgsError(str(e)) from None
