"""Where a Triton model finds the checkpoint, the checkpoint's default sampling settings, and the
context the engine serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maverick.config import ModelConfig

# the preprocessing model's config.pbtxt parameters
PREPROCESSING_PARAMETERS = frozenset({"model_dir", "max_model_len", "light_workers", "heavy_workers"})


def parameters(model_config: dict, allowed: set[str]) -> dict[str, str]:
    """A model config's `parameters` as plain strings; a key outside `allowed` is an error."""
    params = {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(
            f"{model_config.get('name')}: unknown parameters {unknown}; known: {sorted(allowed)}"
        )
    return params


def project_root(model_repository: str) -> Path:
    """The folder that holds the model repository (`args["model_repository"]` is the model's folder)."""
    return Path(model_repository).resolve().parents[1]


def resolve_model_dir(
    model_config: dict, model_repository: str, allowed: frozenset[str] = frozenset({"model_dir"})
) -> Path:
    """The `model_dir` parameter, relative paths taken from the project root."""
    raw = parameters(model_config, set(allowed)).get("model_dir")
    if not raw:
        raise ValueError(f"{model_config.get('name')}: parameter model_dir is required")
    path = Path(raw)
    return path if path.is_absolute() else project_root(model_repository) / path


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults from generation_config.json (Llama 4: temperature 0.6, top_p 0.9), applied
    to fields a request leaves out. `do_sample: false` there means greedy."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    if cfg.get("do_sample") is False:
        return {"temperature": 0.0}
    return {k: cfg[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty") if k in cfg}


def context_length(model_dir: Path, max_model_len: str | None = None) -> int:
    """The longest sequence the engine serves, as it decides (EngineConfig.max_model_len): the
    checkpoint's max_position_embeddings, or the `max_model_len` setting where that is shorter
    (empty, "none" or "null": not set)."""
    longest = ModelConfig.from_dir(model_dir).text.max_position_embeddings
    raw = (max_model_len or "").strip().lower()
    if raw in ("", "none", "null"):
        return longest
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"max_model_len must be a whole number of tokens, got {max_model_len!r}") from None
    if value < 2:
        raise ValueError(f"max_model_len must be at least 2 tokens, got {value}")
    return min(value, longest)
