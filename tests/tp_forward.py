"""One rank of a tensor-parallel paged forward, in a process of its own (tests/test_tensor_parallel.py).

Every rank runs the same schedule through `PagedDriver` on its shard: three sequences side by
side, prompts prefilled in chunks while another decodes, one of them an image chat whose
patch rows (encoded by the TP 1 model, as rank 0 would) arrive in a file. Rank 0 writes the
gathered fp32 logits of every step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from paged import PagedDriver  # noqa: E402

from maverick.checkpoint import load_model  # noqa: E402
from maverick.layers.parallel import SINGLE, TensorParallel  # noqa: E402

CHUNK = 24  # prefill chunk: prompts cross chunk and block edges mid-prefill


def schedule(prompts: dict[str, list[int]], image_rows: torch.Tensor, patch_id: int, decode: int):
    """The steps: each a list of (seq id, new ids or None for 'the last greedy token', image rows).
    Sequence "c" starts decoding while "a" and "img" are still prefilling."""
    steps, used = [], 0
    pos = {sid: 0 for sid in prompts}
    while any(pos[s] < len(p) for s, p in prompts.items()) or not steps:
        items = []
        for sid, prompt in prompts.items():
            if pos[sid] < len(prompt):
                piece = prompt[pos[sid] : pos[sid] + CHUNK]
                k = sum(t == patch_id for t in piece) if sid == "img" else 0
                items.append((sid, piece, image_rows[used : used + k] if k else None))
                used += k
                pos[sid] += len(piece)
            else:
                items.append((sid, None, None))  # a decode of its last greedy token
        steps.append(items)
    steps += [[(sid, None, None) for sid in prompts]] * decode
    return steps


def run(driver: PagedDriver, steps) -> list[torch.Tensor]:
    """Every step's logits [new tokens, vocab], the decodes feeding back their own argmax."""
    last: dict[str, int] = {}
    out = []
    for items in steps:
        fed = [(sid, new if new is not None else [last[sid]], img) for sid, new, img in items]
        logits = driver.step(fed)
        for (sid, _, _), lg in zip(fed, logits, strict=True):
            last[sid] = int(lg[-1].argmax())
        out.append(torch.cat(logits))
    return out


def main(ckpt: str, rank: int, world: int, store: str, experts: str, inputs: str, out: str) -> None:
    tp = SINGLE
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        tp = TensorParallel(rank, world, dist.group.WORLD)
    torch.set_num_threads(1)
    model = load_model(ckpt, dtype=torch.float32, experts=experts, tp=tp)
    data = torch.load(inputs)
    steps = schedule(data["prompts"], data["image_rows"], model.config.image_token_id, data["decode"])
    logits = run(PagedDriver(model), steps)
    if rank == 0:
        torch.save(logits, out)
    if world > 1:
        dist.barrier()  # gloo aborts a rank that tears down while a peer still talks to it
        dist.destroy_process_group()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), a[3], a[4], a[5], a[6])
