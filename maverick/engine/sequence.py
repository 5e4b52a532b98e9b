"""Per-request state: the tokens, where their K/V lives, how far prefill has got, and the images.

A sequence's tokens are `prompt_token_ids + output_token_ids`; `num_computed_tokens` of them have
K/V in the cache (in `block_table`). The scheduler gives it `n` new tokens per step; prefill may
take several steps (chunked), decode takes one token a step. Preemption drops all of its K/V and
sets `num_computed_tokens` back to 0: the prompt and the output so far are then recomputed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from maverick.engine.api import ImageInput, SamplingParams

if TYPE_CHECKING:
    from maverick.engine.sampler import SamplingState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens, the model's context, or the KV cache for a lone sequence
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed this request (the message says why)


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    images: tuple[ImageInput, ...]
    params: SamplingParams
    sampling: SamplingState
    patch_token_id: int
    tokens_per_tile: int
    index: int = 0  # which choice of its request (SamplingParams.n > 1), 0..n-1
    arrival_time: float = field(default_factory=time.monotonic)

    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    num_preemptions: int = 0
    cumulative_logprob: float = 0.0  # sum of the output tokens' raw log-probs (with params.logprobs)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks, chained
    num_registered_blocks: int = 0  # leading full blocks already offered to the prefix cache
    # Image embeddings computed for the prefill in progress, by image index; dropped once the
    # prefill has passed the image's last <|patch|> token.
    image_embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    first_scheduled_time: float | None = None
    num_new_blocks: int = 0  # KV blocks allocated to it (again after a preemption)
    num_reused_blocks: int = 0  # and taken from the prefix cache
    # with params.return_context_logits: the prompt's raw logits so far, [rows, vocab] pieces in
    # order (prefill may take several steps); sent whole with the first update
    context_logits: list[torch.Tensor] = field(default_factory=list)
    num_context_logits: int = 0  # prompt positions covered by context_logits
    context_logits_sent: bool = False
    # with params.guided_decoding: its xgrammar GrammarMatcher (engine/guided.py), fed each token
    grammar: Any = None

    def __post_init__(self) -> None:
        # patch_rank[i] = number of <|patch|> tokens in the prompt before position i (length n + 1),
        # so a chunk [a, b) covers image-embedding rows [patch_rank[a], patch_rank[b]).
        self.prompt_is_patch = np.asarray(self.prompt_token_ids) == self.patch_token_id  # [prompt] bool
        self.patch_rank = [0, *accumulate(self.prompt_is_patch.tolist())]
        rows = [im.num_tiles * self.tokens_per_tile for im in self.images]
        self.image_row_start = [0, *accumulate(rows)]  # image k owns rows [start[k], start[k + 1])
        if self.patch_rank[-1] != self.image_row_start[-1]:
            raise ValueError(
                f"prompt has {self.patch_rank[-1]} <|patch|> tokens but its {len(self.images)} image(s) "
                f"make {self.image_row_start[-1]}"
            )

    @property
    def key(self) -> tuple[str, int]:
        """(request id, choice): unique among the engine's sequences."""
        return self.request_id, self.index

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_id(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def token_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    # -- images --------------------------------------------------------------------------------
    def image_rows(self, start: int, end: int) -> tuple[int, int]:
        """Embedding rows [a, b) of the <|patch|> tokens among positions [start, end)."""
        end_p = min(end, self.num_prompt_tokens)
        start_p = min(start, end_p)
        return self.patch_rank[start_p], self.patch_rank[end_p]

    def image_mask(self, start: int, end: int) -> np.ndarray:
        """[end - start] bool: which of positions [start, end) are image positions (prompt patches)."""
        mask = np.zeros(end - start, dtype=bool)
        stop = min(end, self.num_prompt_tokens)
        if stop > start:
            mask[: stop - start] = self.prompt_is_patch[start:stop]
        return mask

    def images_in_rows(self, a: int, b: int) -> list[int]:
        """Indices of the images whose rows overlap [a, b)."""
        s = self.image_row_start
        return [k for k in range(len(self.images)) if s[k] < b and s[k + 1] > a]

    def block_extra_keys(self, start: int, end: int) -> tuple[bytes, ...]:
        """Content hashes of the images whose patches lie in positions [start, end): a prefix-cache
        key must change when the picture does, even if the token ids are equal."""
        a, b = self.image_rows(start, end)
        return tuple(self.images[k].content_hash for k in self.images_in_rows(a, b)) if b > a else ()

    # -- lifecycle -----------------------------------------------------------------------------
    def reset_for_recompute(self) -> None:
        """After preemption: nothing is cached any more; prompt and output will be recomputed."""
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.num_preemptions += 1
        self.image_embeds.clear()
        self.status = SequenceStatus.WAITING
