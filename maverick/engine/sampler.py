"""Batched sampling: one token for each row of fp32 logits [N, vocab], every row with its own parameters.

Per row, in this order (vLLM / OpenAI semantics):
  0. logit_bias: each (token, bias) pair's bias added to the token's logit;
  1. repetition_penalty over the tokens of prompt and output (CTRL / HF: a positive logit is divided
     by the penalty, a negative one multiplied); then presence_penalty (subtracted once per token
     present in the output) and frequency_penalty (subtracted once per occurrence in the output);
  2. min_tokens: while the output is shorter than min_tokens, the row's stop ids get -inf;
  3. greedy rows (temperature 0): argmax, no randomness consumed;
  4. other rows: softmax(logits / temperature), then top_k, then top_p (renormalised over the top-k
     set), then min_p, then one draw.

The draw is an exponential race: token = argmax(p / q) with q_i ~ Exp(1) i.i.d., which picks i with
probability p_i / sum(p) (so dropped tokens, p = 0, never win, and no renormalisation is needed). A
seeded row draws its V exponentials from its own generator and nothing else, so it gets the same
tokens alone or in any batch; unseeded rows share one draw from torch's global generator.

Ties: argmax takes the lowest token id; top_k keeps exactly k tokens, lower ids first among equal
probabilities (a stable sort).

Logprobs are those of the model's raw distribution: log_softmax of the unmodified logits row at
the chosen token (before penalties, temperature and filtering), as vLLM returns by default; so are
a row's `top_logprobs` most likely tokens (equal log-probs: lower ids first).

`sample` does not append the chosen tokens to the states: the caller does (the state's
`output_token_ids` is usually the sequence's own list).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from maverick.engine.guided import apply_bitmask
from maverick.engine.sampling_params import SamplingParams


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The request's own random stream on `device` (where its logits live); None without a seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingState:
    """What the sampler needs to know about one sequence; lives as long as the request."""

    params: SamplingParams
    generator: torch.Generator | None  # from params.seed on the logits' device; None: global RNG
    prompt_token_ids: Seq[int]
    output_token_ids: list[int]  # grows as the caller appends sampled tokens
    stop_ids: frozenset[int]  # the model's EOS ids (unless ignore_eos) and params.stop_token_ids
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never to complete
    # unique prompt ids on the logits' device, built on the first repetition-penalty step
    _prompt_ids: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Seq[int],
        *,
        eos_token_ids: Iterable[int],
        vocab_size: int,
        device: torch.device | str,
        output_token_ids: list[int] | None = None,
        bad_words_ids: Seq[Seq[int]] = (),
    ) -> SamplingState:
        """Raises SamplingParamsError if a stop token id is outside the vocabulary."""
        params.check_vocab(vocab_size)
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= frozenset(eos_token_ids)
        return cls(
            params=params,
            generator=make_generator(params.seed, device),
            prompt_token_ids=prompt_token_ids,
            output_token_ids=[] if output_token_ids is None else output_token_ids,
            stop_ids=stop_ids,
            bad_words_ids=tuple(tuple(w) for w in bad_words_ids if w),
        )

    def prompt_ids_on(self, device: torch.device) -> torch.Tensor:
        if self._prompt_ids is None or self._prompt_ids.device != device:
            ids = sorted(set(self.prompt_token_ids))
            self._prompt_ids = torch.tensor(ids, dtype=torch.long, device=device)
        return self._prompt_ids


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [N]: the chosen token of each row
    logprobs: list[float | None]  # [N]: raw-distribution log-prob of the chosen token; None if not asked
    # [N]: each row's top_logprobs most likely token ids, most likely first, and their raw log-probs;
    # None where the row asks for none
    top_token_ids: list[list[int] | None] = field(default_factory=list)
    top_logprobs: list[list[float] | None] = field(default_factory=list)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)[:, None]  # [R, 1], broadcasts over vocab


def _repeat_rows(rows: list[int], counts: list[int], device: torch.device) -> torch.Tensor:
    """rows[j] repeated counts[j] times [sum(counts)]; output_size given so CUDA need not sync."""
    return torch.repeat_interleave(_index(rows, device), _index(counts, device), output_size=sum(counts))


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def apply_penalties(logits: torch.Tensor, states: Seq[SamplingState]) -> torch.Tensor:
    """Repetition, presence and frequency penalties, in place on logits [N, V]; returns it.

    Only rows with a penalty are touched; in a batch, a row's neutral values (1, 0, 0) change
    nothing exactly (x / 1, x * 1, x - 0).
    """
    rows = [i for i, s in enumerate(states) if _has_penalty(s.params)]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    sub = [states[i] for i in rows]
    r = len(rows)

    # counts[j, t] = occurrences of token t in row j's output  [R, V]
    outputs = [s.output_token_ids for s in sub]
    counts = torch.zeros(r, vocab, dtype=logits.dtype, device=device)
    tok = _index([t for o in outputs for t in o], device)
    if len(tok) > 0:
        row_of = _repeat_rows(list(range(r)), [len(o) for o in outputs], device)
        counts.index_put_((row_of, tok), torch.ones_like(tok, dtype=logits.dtype), accumulate=True)
    present = counts > 0  # [R, V]

    # seen = present in prompt or output  [R, V]; needed only by rows with a repetition penalty
    seen = present.clone()
    rep_rows = [j for j, s in enumerate(sub) if s.params.repetition_penalty != 1.0]
    if rep_rows:
        prompts = [sub[j].prompt_ids_on(device) for j in rep_rows]
        row_of = _repeat_rows(rep_rows, [len(p) for p in prompts], device)
        seen[row_of, torch.cat(prompts)] = True

    idx = _index(rows, device)
    x = logits[idx]  # [R, V] copy
    rep = _column([s.params.repetition_penalty for s in sub], logits.dtype, device)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    freq = _column([s.params.frequency_penalty for s in sub], logits.dtype, device)
    pres = _column([s.params.presence_penalty for s in sub], logits.dtype, device)
    x = x - freq * counts - pres * present.to(logits.dtype)
    logits[idx] = x
    return logits


def apply_logit_bias(logits: torch.Tensor, states: Seq[SamplingState]) -> torch.Tensor:
    """OpenAI's logit_bias: each row's (token, bias) pairs added to its logits; in place on [N, V]."""
    rows: list[int] = []
    cols: list[int] = []
    bias: list[float] = []
    for i, s in enumerate(states):
        for token, b in s.params.logit_bias:
            rows.append(i)
            cols.append(token)
            bias.append(b)
    if rows:
        device = logits.device
        values = torch.tensor(bias, dtype=logits.dtype, device=device)
        logits.index_put_((_index(rows, device), _index(cols, device)), values, accumulate=True)
    return logits


def apply_min_tokens(logits: torch.Tensor, states: Seq[SamplingState]) -> torch.Tensor:
    """Stop ids get -inf while a row's output is shorter than min_tokens; in place on [N, V]."""
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        if len(s.output_token_ids) < s.params.min_tokens and s.stop_ids:
            rows.extend([i] * len(s.stop_ids))
            cols.extend(s.stop_ids)
    if rows:
        logits[_index(rows, logits.device), _index(cols, logits.device)] = float("-inf")
    return logits


def apply_bad_words(logits: torch.Tensor, states: Seq[SamplingState]) -> torch.Tensor:
    """-inf for the last token of each bad word whose earlier tokens end the output so far; in place."""
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        out = s.output_token_ids
        for word in s.bad_words_ids:
            prefix = word[:-1]
            if len(out) >= len(prefix) and (not prefix or tuple(out[len(out) - len(prefix) :]) == prefix):
                rows.append(i)
                cols.append(word[-1])
    if rows:
        logits[_index(rows, logits.device), _index(cols, logits.device)] = float("-inf")
    return logits


def apply_top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k, then outside its top-p nucleus.

    probs [R, V] (need not sum to 1), top_k [R] long (0 = off), top_p [R] float (1 = off).
    top_k keeps exactly k tokens (equal probabilities: lower ids first). top_p then keeps the
    smallest top set whose probability, renormalised over the top-k set, reaches top_p: a token is
    kept when the mass strictly before it is < top_p. The top token is always kept. Returns a new
    tensor, not renormalised.
    """
    r, vocab = probs.shape
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [R, V]
    rank = torch.arange(vocab, device=probs.device)
    k = torch.where(top_k > 0, top_k, vocab)
    keep = rank[None, :] < k[:, None]  # [R, V] in sorted order
    sorted_probs = sorted_probs.masked_fill(~keep, 0.0)
    cum = sorted_probs.cumsum(dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass strictly before
    p = top_p[:, None].to(probs.dtype)
    # rows with top_p = 1 skip the test: fp32 rounding of a long cumsum must not drop the tail
    keep &= (before < p * cum[:, -1:]) | (p >= 1.0)
    keep[:, 0] = True
    mask = torch.empty_like(keep).scatter_(-1, order, keep)  # back to vocabulary order
    return probs.masked_fill(~mask, 0.0)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens with prob < min_p * (the row's largest prob). probs [R, V], min_p [R]."""
    threshold = min_p[:, None].to(probs.dtype) * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def _exponential_noise(shape: torch.Size, states: Seq[SamplingState], device: torch.device) -> torch.Tensor:
    """q ~ Exp(1) [R, V]. Seeded rows: V draws from their own generator, whatever the batch."""
    r, vocab = shape
    q = torch.empty(r, vocab, device=device)
    unseeded = [j for j, s in enumerate(states) if s.generator is None]
    if len(unseeded) == r:
        q.exponential_()
    elif unseeded:
        q[_index(unseeded, device)] = torch.empty(len(unseeded), vocab, device=device).exponential_()
    for j, s in enumerate(states):
        if s.generator is not None:
            q[j] = torch.empty(vocab, device=device).exponential_(generator=s.generator)
    # p / 0 would be nan for a dropped token (p = 0); argmax treats nan as the largest value
    return q.clamp_(min=torch.finfo(q.dtype).tiny)


def _sample_random(logits: torch.Tensor, states: Seq[SamplingState]) -> torch.Tensor:
    """Temperature, top_k, top_p, min_p, draw. logits [R, V] -> token ids [R]."""
    device = logits.device
    params = [s.params for s in states]
    temperature = _column([p.temperature for p in params], logits.dtype, device)
    # subtract the row max first: a tiny temperature then gives -inf, never inf - inf = nan
    probs = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).softmax(dim=-1)  # [R, V]

    rows = [j for j, p in enumerate(params) if p.top_k > 0 or p.top_p < 1.0]
    if rows:
        top_k = _index([params[j].top_k for j in rows], device)
        top_p = torch.tensor([params[j].top_p for j in rows], dtype=probs.dtype, device=device)
        if len(rows) == len(params):
            probs = apply_top_k_top_p(probs, top_k, top_p)
        else:
            idx = _index(rows, device)
            probs[idx] = apply_top_k_top_p(probs[idx], top_k, top_p)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=probs.dtype, device=device)
        probs = apply_min_p(probs, min_p)

    q = _exponential_noise(probs.shape, states, device)
    return (probs / q).argmax(dim=-1)


def sample(
    logits: torch.Tensor,
    states: Seq[SamplingState],
    token_bitmask: tuple[list[int], torch.Tensor] | None = None,
) -> SamplerOutput:
    """One token per row. logits [N, V] (fp32; not modified), states[i] describes row i.
    `token_bitmask`: (rows, xgrammar's packed bitmask [len(rows), ceil(V / 32)]): the only tokens
    those rows may take (guided decoding; applied after bias and penalties, so it constrains the
    choice, not the log-probs)."""
    if logits.dim() != 2 or logits.shape[0] != len(states):
        shape = tuple(logits.shape)
        raise ValueError(f"logits must be [N, vocab] with N = {len(states)} (one row per state), got {shape}")
    n = len(states)
    if n == 0:
        return SamplerOutput(token_ids=[], logprobs=[], top_token_ids=[], top_logprobs=[])
    device = logits.device
    work = logits.to(torch.float32, copy=True)  # [N, V]
    apply_logit_bias(work, states)
    apply_penalties(work, states)
    apply_min_tokens(work, states)
    apply_bad_words(work, states)
    if token_bitmask is not None:
        apply_bitmask(work, *token_bitmask)

    greedy = [i for i, s in enumerate(states) if s.params.is_greedy]
    if len(greedy) == n:
        token_ids = work.argmax(dim=-1)
    else:
        random = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if not greedy:
            token_ids = _sample_random(work, states)
        else:
            token_ids = torch.empty(n, dtype=torch.long, device=device)
            g = _index(greedy, device)
            token_ids[g] = work[g].argmax(dim=-1)
            r = _index(random, device)
            token_ids[r] = _sample_random(work[r], [states[i] for i in random])

    logprobs: list[float | None] = [None] * n
    top_ids: list[list[int] | None] = [None] * n
    top_lps: list[list[float] | None] = [None] * n
    want = [i for i, s in enumerate(states) if s.params.logprobs]
    if want:
        w = _index(want, device)
        raw = logits[w].to(torch.float32).log_softmax(dim=-1)  # [W, V]
        chosen = raw.gather(-1, token_ids[w, None]).squeeze(-1)
        for i, lp in zip(want, chosen.tolist(), strict=True):
            logprobs[i] = lp
        top = [j for j, i in enumerate(want) if states[i].params.top_logprobs]
        if top:
            # a stable sort, not topk: equal log-probs must come lower id first, which topk leaves open
            rows = raw if len(top) == len(want) else raw[_index(top, device)]  # [K_rows, V]
            k = max(states[want[j]].params.top_logprobs for j in top)
            values, ids = rows.sort(dim=-1, descending=True, stable=True)
            values, ids = values[:, :k].tolist(), ids[:, :k].tolist()  # [K_rows, k]
            for r, j in enumerate(top):
                i = want[j]
                ki = states[i].params.top_logprobs
                top_ids[i], top_lps[i] = ids[r][:ki], values[r][:ki]
    return SamplerOutput(token_ids.tolist(), logprobs, top_ids, top_lps)
