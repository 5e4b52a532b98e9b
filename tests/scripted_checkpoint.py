"""A copy of a tiny checkpoint whose greedy answer is scripted: after the prompt's last token it
writes the given tokens, whatever the prompt. For end-to-end tests that need the real stack to
produce a known answer (a tool call) from a real forward pass, where the tiny model's own answers
are gibberish.

How: every attention and feed-forward block's output projection is zero, so the last hidden state
is the embedding of the last token alone. Each token of the chain (the prompt's last token, then
the answer but its last) gets a one-hot embedding of its own, and the head maps that one-hot to
the next token of the chain: a bigram model, so no token may appear twice in it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EMBED = "language_model.model.embed_tokens.weight"
HEAD = "language_model.lm_head.weight"
NORM = "language_model.model.norm.weight"
LOGIT = 4.0  # per unit of the normalised one-hot (sqrt(hidden) of it): every other logit is 0


def write_scripted_checkpoint(src: Path, dst: Path, after: int, answer: list[int]) -> Path:
    """`src` copied to `dst`, scripted to answer `answer` (ids; end it with a stop token) once the
    prompt ends in `after`."""
    chain = [after, *answer]
    if len(set(chain)) != len(chain):
        raise ValueError(f"a scripted chain cannot repeat a token: {chain}")
    shutil.copytree(src, dst)
    for path in sorted(dst.glob("*.safetensors")):
        tensors = load_file(path)
        for name, t in tensors.items():
            if name.endswith(("self_attn.o_proj.weight", "down_proj.weight")) and "vision" not in name:
                tensors[name] = torch.zeros_like(t)
        if NORM in tensors:
            tensors[NORM] = torch.ones_like(tensors[NORM])
        if EMBED in tensors:
            embed = tensors[EMBED]
            if len(chain) - 1 > embed.shape[1]:
                raise ValueError(
                    f"a chain of {len(chain)} tokens needs more than {embed.shape[1]} dimensions"
                )
            for i, token in enumerate(chain[:-1]):
                embed[token] = 0
                embed[token, i] = 1
        if HEAD in tensors:
            head = tensors[HEAD]
            head.zero_()
            for i, token in enumerate(chain[1:]):
                head[token, i] = LOGIT
        save_file({n: t.contiguous() for n, t in tensors.items()}, path, metadata={"format": "pt"})
    return dst
