"""Argument types the loadtest commands share, so that every one reads a duration the same way."""

from __future__ import annotations


def seconds(text: str) -> float:
    """'30', '30s', '2m', '1h', '250ms' -> seconds."""
    text = text.strip()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)
