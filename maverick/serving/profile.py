"""Deployment profiles: server/profiles/<name>.json, read strictly.

A profile names a hardware target and how the `maverick` model is laid out on it: its Triton
instance group (kind and count: each instance is one engine, with its own GPU set on a GPU node)
and the engine settings every instance starts with (EngineConfig fields, rendered into the model's
`parameters`; MODEL_DIR and ENGINE_ARGS still override them). A GPU profile also states the node
it is for (GPUs and each one's memory), which the capacity planner (maverick/plan.py) sizes the
KV cache against. A file is data, not code:

    {"description": "one line",
     "kind": "KIND_MODEL", "instances": 1,                  # KIND_CPU on the CPU
     "gpus_per_node": 8, "gpu_memory_gib": 79.19,           # GPU profiles only
     "engine": {"tensor_parallel_size": 8, "dtype": "bfloat16", ...}}

Unknown keys are an error, engine keys must be EngineConfig fields with values of their type, and
model_dir is not a profile's to set (the checkpoint is MODEL_DIR's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from maverick.engine.api import EngineConfig
from maverick.plan import GiB, check_gpus
from maverick.serving.engine_args import EngineArgsError, convert, engine_config

PROFILES_DIR = Path(__file__).resolve().parents[2] / "server" / "profiles"
DEFAULT_PROFILE = "cpu-tiny"
KINDS = ("KIND_CPU", "KIND_MODEL")
_KEYS = {"description", "kind", "instances", "engine"}
_GPU_KEYS = {"gpus_per_node", "gpu_memory_gib"}


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    kind: Literal["KIND_CPU", "KIND_MODEL"]
    instances: int
    gpus_per_node: int  # 0 on the CPU
    gpu_memory_bytes: int | None  # each GPU's total memory; None on the CPU
    engine: MappingProxyType[str, str]  # EngineConfig field -> its parameter string

    @property
    def on_gpu(self) -> bool:
        return self.kind == "KIND_MODEL"

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine.get("tensor_parallel_size", "1"))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (server/profiles/<name>.json) or by path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ProfileError(f"no profile {str(name_or_path)!r}; known: {', '.join(profile_names())}")
    try:
        return _parse(path.stem, json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: invalid JSON ({e})") from None
    except (ProfileError, EngineArgsError) as e:
        raise ProfileError(f"{path}: {e}") from None


def _parse(name: str, raw: Any) -> Profile:
    if not isinstance(raw, dict):
        raise ProfileError("a profile is a JSON object")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ProfileError(f"kind must be one of {KINDS}, got {kind!r}")
    # a GPU profile states its node, a CPU profile has none to state
    allowed = _KEYS | (_GPU_KEYS if kind == "KIND_MODEL" else set())
    unknown, missing = sorted(set(raw) - allowed), sorted(allowed - set(raw))
    if unknown or missing:
        raise ProfileError(
            f"unknown keys {unknown}, missing keys {missing} (a {kind} profile has {sorted(allowed)})"
        )
    description = raw["description"]
    if not isinstance(description, str) or not description.strip() or "\n" in description:
        raise ProfileError("description must be one non-empty line")
    instances = _positive_int(raw, "instances")
    engine = raw["engine"]
    if not isinstance(engine, dict):
        raise ProfileError("engine must be an object of EngineConfig fields")
    if "model_dir" in engine:
        raise ProfileError("engine.model_dir: the checkpoint is MODEL_DIR's (--model-dir), not a profile's")
    params = {key: _parameter(key, value) for key, value in engine.items()}
    device = params.get("device", "auto")
    if kind == "KIND_CPU" and device != "cpu":
        raise ProfileError(f'a KIND_CPU profile runs on the CPU: set engine.device "cpu", not {device!r}')
    if kind == "KIND_MODEL" and device != "auto":
        # each instance takes its GPU set by its index (engine_args.py); a fixed device would put
        # every instance on the same GPUs
        raise ProfileError(
            f'a KIND_MODEL profile places its instances itself: engine.device "auto", not {device!r}'
        )
    profile = Profile(
        name=name,
        description=description,
        kind=kind,
        instances=instances,
        gpus_per_node=_positive_int(raw, "gpus_per_node") if kind == "KIND_MODEL" else 0,
        gpu_memory_bytes=_gpu_memory(raw) if kind == "KIND_MODEL" else None,
        engine=MappingProxyType(params),
    )
    profile_engine_config(profile, ".")  # every value together (EngineConfig's own checks)
    if profile.on_gpu:
        try:
            check_gpus(instances, profile.tensor_parallel_size, profile.gpus_per_node, f"profile {name}")
        except ValueError as e:
            raise ProfileError(f"{e} (gpus_per_node)") from None
    return profile


def _positive_int(raw: dict, key: str) -> int:
    value = raw[key]
    if type(value) is not int or value < 1:
        raise ProfileError(f"{key} must be a positive integer, got {value!r}")
    return value


def _gpu_memory(raw: dict) -> int:
    value = raw["gpu_memory_gib"]
    if type(value) not in (int, float) or value <= 0:
        raise ProfileError(f"gpu_memory_gib must be a positive number, got {value!r}")
    return int(value * GiB)


def _parameter(key: str, value: Any) -> str:
    """A JSON value as the string Triton's `parameters` carry, checked against its field's type."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "none"
    elif isinstance(value, (int, float, str)):
        text = str(value)
    else:
        raise ProfileError(f"engine.{key}: {value!r} is not a number, string, boolean or null")
    if (key, text) != ("cpu_threads", "auto"):
        convert(key, text)
    return text


def profile_engine_config(
    profile: Profile, model_dir: str | Path, overrides: dict[str, str] | None = None
) -> EngineConfig:
    """The EngineConfig an instance of `profile` starts with on its target (GPU or CPU), as the
    planner sees it: the "auto" settings resolved for the profile, not for this machine."""
    params = {**profile.engine, **(overrides or {}), "model_dir": str(model_dir)}
    return engine_config(params, Path("."), cuda=profile.on_gpu)
