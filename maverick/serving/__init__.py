"""What the Triton adapters call: request parsing, the engine's settings from a model config, and
response shaping, all as plain Python over numpy (this package never imports Triton)."""
