"""The sampler on small hand-made logits: penalties, min_tokens, greedy, the top-k / top-p / min-p
support, seeded reproducibility in any batch, and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from maverick.engine.api import SamplingParams
from maverick.engine.errors import SamplingParamsError
from maverick.engine.sampler import (
    SamplingState,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    make_generator,
    sample,
)

EOS = (3,)


def state(prompt=(), output=(), vocab=64, eos=EOS, **kw) -> SamplingState:
    return SamplingState.create(
        SamplingParams(**kw),
        list(prompt),
        eos_token_ids=eos,
        vocab_size=vocab,
        device="cpu",
        output_token_ids=list(output),
    )


def log_probs(*p: float) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log().to(torch.float32)


def support(logits: torch.Tensor, n: int = 3000, seed: int = 0, **kw) -> set[int]:
    """Tokens drawn from one row in n draws from a seeded generator."""
    st = state(vocab=logits.shape[-1], seed=seed, **kw)
    return set(sample(logits.expand(n, -1), [st] * n).token_ids)


# -- state -----------------------------------------------------------------------------------------
def test_create_state():
    st = state(prompt=[1, 2], eos=(3, 4), stop_token_ids=[7], seed=11)
    assert st.stop_ids == {3, 4, 7}
    assert st.output_token_ids == [] and list(st.prompt_token_ids) == [1, 2]
    expected = torch.Generator().manual_seed(11)
    assert torch.equal(st.generator.get_state(), expected.get_state())
    assert state(eos=(3, 4), stop_token_ids=[7], ignore_eos=True).stop_ids == {7}
    assert state().generator is None
    with pytest.raises(SamplingParamsError, match="stop_token_ids"):
        state(vocab=8, stop_token_ids=[8])


def test_output_list_is_shared():
    out: list[int] = []
    st = SamplingState.create(
        SamplingParams(), [1], eos_token_ids=EOS, vocab_size=8, device="cpu", output_token_ids=out
    )
    out.append(5)
    assert st.output_token_ids == [5]


def test_make_generator():
    assert make_generator(None, "cpu") is None
    g = make_generator(2**64 - 1, torch.device("cpu"))
    assert g.device.type == "cpu" and g.initial_seed() == 2**64 - 1


# -- greedy ----------------------------------------------------------------------------------------
def test_greedy_is_argmax_and_consumes_no_randomness():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    states = [state(vocab=50, temperature=0.0, seed=i) for i in range(5)]
    rng, gens = torch.get_rng_state(), [s.generator.get_state() for s in states]
    out = sample(logits, states)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(s.generator.get_state(), g) for s, g in zip(states, gens, strict=True))


def test_greedy_ties_take_lowest_id():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0]])
    assert sample(logits, [state(vocab=4, temperature=0.0)]).token_ids == [1]


def test_input_logits_untouched():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    before = logits.clone()
    sample(logits, [state(prompt=[3], output=[3], vocab=4, repetition_penalty=2.0, min_tokens=5)])
    assert torch.equal(logits, before)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="one row per state"):
        sample(torch.zeros(2, 4), [state(vocab=4)])
    assert sample(torch.zeros(0, 4), []).token_ids == []


# -- penalties -------------------------------------------------------------------------------------
def test_penalties_exact():
    logits = torch.tensor(
        [
            [2.0, -1.0, 0.5, 3.0, -0.5],
            [2.0, -1.0, 0.5, 3.0, -0.5],
            [2.0, -1.0, 0.5, 3.0, -0.5],
        ]
    )
    states = [
        # token 0 in the prompt (rep only); 1 once and 2 twice in the output (rep, presence, frequency)
        state(
            prompt=[0],
            output=[1, 2, 2],
            vocab=5,
            repetition_penalty=2.0,
            presence_penalty=0.5,
            frequency_penalty=0.25,
        ),
        state(prompt=[4, 4], output=[], vocab=5, repetition_penalty=1.5),  # only the prompt counts
        state(prompt=[0, 1], output=[2], vocab=5),  # no penalty: the row is not touched
    ]
    out = apply_penalties(logits.clone(), states)
    expected = torch.tensor(
        [
            [1.0, -2.0 - 0.25 - 0.5, 0.25 - 0.5 - 0.5, 3.0, -0.5],
            [2.0, -1.0, 0.5, 3.0, -0.75],
            [2.0, -1.0, 0.5, 3.0, -0.5],
        ]
    )
    assert torch.equal(out, expected)


def test_negative_presence_and_frequency_reward():
    logits = torch.zeros(1, 4)
    out = apply_penalties(
        logits, [state(output=[1, 1, 2], vocab=4, presence_penalty=-1.0, frequency_penalty=-0.5)]
    )
    assert out.tolist() == [[0.0, 2.0, 1.5, 0.0]]


def test_penalty_changes_greedy_choice():
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    assert sample(logits, [state(output=[0], vocab=3, temperature=0.0)]).token_ids == [0]
    assert sample(logits, [state(output=[0], vocab=3, temperature=0.0, presence_penalty=0.2)]).token_ids == [
        1
    ]
    assert sample(
        logits, [state(prompt=[0], vocab=3, temperature=0.0, repetition_penalty=1.2)]
    ).token_ids == [1]


# -- min_tokens ------------------------------------------------------------------------------------
def test_min_tokens_masks_stop_ids_then_releases_them():
    # stop ids: EOS 3 and stop_token_ids 5; they are the two best tokens
    logits = torch.tensor([[0.0, 1.0, 0.0, 9.0, 0.0, 8.0, 0.0, 0.0]])
    params = dict(vocab=8, temperature=0.0, min_tokens=2, stop_token_ids=[5])
    assert sample(logits, [state(output=[], **params)]).token_ids == [1]
    assert sample(logits, [state(output=[1], **params)]).token_ids == [1]
    assert sample(logits, [state(output=[1, 1], **params)]).token_ids == [3]
    # with ignore_eos, EOS is no stop id: only 5 is masked
    assert sample(logits, [state(output=[], ignore_eos=True, **params)]).token_ids == [3]


def test_min_tokens_in_random_rows():
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0]])  # EOS 3 carries almost all the mass
    assert support(logits, n=500, min_tokens=1) == {0, 1, 2}
    assert 3 in support(logits, n=500, min_tokens=0)


# -- top-k / top-p / min-p: exact boundaries on dyadic probabilities ------------------------------
P = torch.tensor([[0.125, 0.5, 0.125, 0.25]])  # sorted: 1 (0.5), 3 (0.25), 0 (0.125), 2 (0.125)


def kept(probs: torch.Tensor) -> set[int]:
    return set(probs[0].nonzero().flatten().tolist())


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (1e-6, {1}),  # the top token is always kept
        (0.5, {1}),  # mass before token 3 is 0.5, not < 0.5
        (0.5 + 2**-20, {1, 3}),
        (0.75, {1, 3}),  # mass before token 0 is 0.75, not < 0.75
        (0.75 + 2**-20, {1, 3, 0}),
        (0.875, {1, 3, 0}),
        (0.875 + 2**-20, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_boundary(top_p, expected):
    out = apply_top_k_top_p(P, torch.tensor([0]), torch.tensor([top_p]))
    assert kept(out) == expected
    assert torch.equal(out[0, sorted(expected)], P[0, sorted(expected)])  # kept values unchanged


@pytest.mark.parametrize(
    ("top_k", "expected"), [(1, {1}), (2, {1, 3}), (3, {1, 3, 0}), (4, {0, 1, 2, 3}), (99, {0, 1, 2, 3})]
)
def test_top_k_exact_count_ties_by_lower_id(top_k, expected):
    assert kept(apply_top_k_top_p(P, torch.tensor([top_k]), torch.tensor([1.0]))) == expected


def test_top_p_renormalised_over_top_k():
    # top_k = 2 leaves {1: 0.5, 3: 0.25} = {2/3, 1/3}; mass before token 3 is 2/3
    assert kept(apply_top_k_top_p(P, torch.tensor([2]), torch.tensor([0.66]))) == {1}
    assert kept(apply_top_k_top_p(P, torch.tensor([2]), torch.tensor([0.67]))) == {1, 3}


def test_top_k_top_p_per_row():
    probs = P.expand(3, -1)
    out = apply_top_k_top_p(probs, torch.tensor([1, 0, 3]), torch.tensor([1.0, 0.6, 0.9]))
    assert [set(r.nonzero().flatten().tolist()) for r in out] == [{1}, {1, 3}, {0, 1, 3}]


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [
        (0.0, {0, 1, 2, 3}),
        (0.25, {0, 1, 2, 3}),
        (0.25 + 2**-20, {1, 3}),
        (0.5, {1, 3}),
        (0.75, {1}),
        (1.0, {1}),
    ],
)
def test_min_p_boundary(min_p, expected):
    assert kept(apply_min_p(P, torch.tensor([min_p]))) == expected  # dropped when prob < min_p * 0.5


# -- the same rules through sample(): the support of many seeded draws -----------------------------
Q = log_probs(0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005)[None, :]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, set(range(8))),
        ({"top_k": 3}, {0, 1, 2}),
        ({"top_k": 1}, {0}),
        ({"top_p": 0.64}, {0, 1}),  # mass before token 2 is 0.65
        ({"top_p": 0.66}, {0, 1, 2}),
        ({"top_p": 0.79}, {0, 1, 2}),  # mass before token 3 is 0.8
        ({"top_p": 0.81}, {0, 1, 2, 3}),
        ({"top_k": 2, "top_p": 0.6}, {0}),  # renormalised: mass before token 1 is 0.4 / 0.65
        ({"top_k": 2, "top_p": 0.62}, {0, 1}),
        ({"min_p": 0.3}, {0, 1, 2}),  # threshold 0.12
        ({"min_p": 0.24}, {0, 1, 2, 3}),  # threshold 0.096
        ({"top_k": 5, "min_p": 0.3, "top_p": 0.6}, {0, 1}),
        ({"temperature": 0.5, "min_p": 0.3}, {0, 1}),  # p^2: min_p applies after temperature
    ],
)
def test_support(kw, expected):
    assert support(Q, **kw) == expected


def test_temperature_frequencies():
    logits = log_probs(0.2, 0.8)[None, :]
    n = 20000
    for temperature, p0 in [(1.0, 0.2), (2.0, 1 / 3), (0.5, 1 / 17)]:  # p ∝ p^(1 / T)
        tokens = sample(logits.expand(n, -1), [state(vocab=2, seed=1, temperature=temperature)] * n).token_ids
        assert abs(tokens.count(0) / n - p0) < 0.01, temperature


def test_tiny_temperature_is_finite():
    logits = torch.tensor([[30.0, 29.0, -1e30, float("-inf")]])
    assert sample(logits, [state(vocab=4, temperature=1e-30, seed=0)]).token_ids == [0]


# -- reproducibility -------------------------------------------------------------------------------
VOCAB = 97


def fake_logits(history: list[int], request: int) -> torch.Tensor:
    """A deterministic 'model': logits [V] from the request and its tokens so far."""
    g = torch.Generator().manual_seed(hash((request, *history)) % 2**63)
    return torch.randn(VOCAB, generator=g) * 3


def run(requests: list[tuple[int, dict]], steps: int = 20) -> list[list[int]]:
    """Decode requests together for `steps` steps; requests[i] = (request id, SamplingParams kwargs)."""
    states = [state(prompt=[rid % VOCAB, 7], vocab=VOCAB, **kw) for rid, kw in requests]
    for _ in range(steps):
        rows = [fake_logits(s.output_token_ids, rid) for s, (rid, _) in zip(states, requests, strict=True)]
        out = sample(torch.stack(rows), states)
        for s, t in zip(states, out.token_ids, strict=True):
            s.output_token_ids.append(t)
    return [s.output_token_ids for s in states]


def test_seeded_rows_same_alone_or_in_any_batch():
    a = (100, dict(seed=1234, top_p=0.9, presence_penalty=0.5))
    b = (200, dict(seed=7, temperature=0.7, top_k=20, min_p=0.05, repetition_penalty=1.3))
    alone_a, alone_b = run([a])[0], run([b])[0]
    torch.manual_seed(0)
    batch1 = run([a, (1, {}), (2, dict(temperature=0.0)), b, (3, dict(seed=5, top_k=3))])
    torch.manual_seed(1)
    batch2 = run([(4, dict(top_p=0.5)), b, (5, dict(seed=99)), (6, dict(temperature=1.5)), a])
    assert batch1[0] == batch2[4] == alone_a
    assert batch1[3] == batch2[1] == alone_b
    assert len(set(alone_a)) > 5  # really random, not stuck
    assert run([(100, dict(a[1], seed=1235))])[0] != alone_a


def test_unseeded_rows_use_the_global_generator():
    torch.manual_seed(3)
    requests = [(0, {}), (1, dict(top_k=5)), (2, dict(seed=1))]
    first = run(requests, steps=5)
    torch.manual_seed(3)
    assert run(requests, steps=5) == first
    assert all(0 <= t < VOCAB for row in first for t in row)


# -- logprobs --------------------------------------------------------------------------------------
def test_logprobs_are_of_the_raw_distribution():
    torch.manual_seed(0)
    logits = torch.randn(4, 16)
    states = [
        state(vocab=16, temperature=0.0, logprobs=True, output=[0, 1], frequency_penalty=2.0),
        state(
            vocab=16, temperature=0.3, top_k=4, logprobs=True, seed=3, repetition_penalty=1.5, prompt=[2, 5]
        ),
        state(vocab=16, logprobs=False),
        state(vocab=16, temperature=2.0, min_p=0.1, logprobs=True),
    ]
    out = sample(logits, states)
    raw = torch.log_softmax(logits, dim=-1)
    for i in (0, 1, 3):
        assert out.logprobs[i] == pytest.approx(raw[i, out.token_ids[i]].item(), abs=0)
    assert out.logprobs[2] is None
    assert all(math.isfinite(lp) for lp in out.logprobs if lp is not None)


def test_bad_words_mask_only_the_completing_token():
    from maverick.engine.sampler import SamplingState, apply_bad_words

    params = SamplingParams(bad_words=("x",))
    state = SamplingState.create(
        params,
        [1],
        eos_token_ids=(),
        vocab_size=8,
        device="cpu",
        output_token_ids=[3, 4],
        bad_words_ids=[[5], [4, 6], [2, 7]],
    )
    logits = apply_bad_words(torch.zeros(1, 8), [state])
    assert logits[0].isinf().nonzero().flatten().tolist() == [5, 6]  # 7 is allowed: its prefix 2 is not there


def test_top_logprobs_are_the_raw_distributions_top_k():
    torch.manual_seed(1)
    logits = torch.randn(4, 40) * 3
    states = [
        state(vocab=40, temperature=0.0, logprobs=True, top_logprobs=5, frequency_penalty=2.0, output=[3]),
        state(vocab=40, logprobs=True),  # log-probs without a top
        state(vocab=40, temperature=0.7, seed=2, logprobs=True, top_logprobs=20, logit_bias={7: 50.0}),
        state(vocab=40, top_k=3, logprobs=True, top_logprobs=1, repetition_penalty=2.0, prompt=[1, 2]),
    ]
    out = sample(logits, states)
    oracle = torch.log_softmax(logits, dim=-1)  # the unmodified rows, whatever the row's sampling
    for i, k in ((0, 5), (2, 20), (3, 1)):
        values, ids = oracle[i].topk(k)
        assert out.top_token_ids[i] == ids.tolist()
        assert out.top_logprobs[i] == values.tolist()
    assert out.top_token_ids[1] is None and out.top_logprobs[1] is None
    assert out.logprobs[1] == oracle[1, out.token_ids[1]].item()


def test_equal_top_logprobs_come_lower_id_first():
    logits = torch.tensor([[0.0, 1.0, 0.5, 1.0, 1.0, 1.0]])
    out = sample(logits, [state(vocab=6, temperature=0.0, logprobs=True, top_logprobs=3)])
    assert out.top_token_ids == [[1, 3, 4]]
    assert out.top_logprobs[0] == [torch.log_softmax(logits[0], dim=-1)[1].item()] * 3


# -- logit_bias ------------------------------------------------------------------------------------
def test_logit_bias_is_added_to_the_logits():
    from maverick.engine.sampler import apply_logit_bias

    states = [
        state(vocab=8, logit_bias={1: 2.5, 6: -100}),
        state(vocab=8),
        state(vocab=8, logit_bias=[(0, 1)]),
    ]
    got = apply_logit_bias(torch.ones(3, 8), states)
    want = torch.ones(3, 8)
    want[0, 1], want[0, 6], want[2, 0] = 3.5, -99.0, 2.0
    assert torch.equal(got, want)


def test_logit_bias_forces_and_bans_tokens_but_not_the_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(1, 30)
    best, worst = logits[0].argmax().item(), logits[0].argmin().item()
    raw = torch.log_softmax(logits[0], dim=-1)
    forced = sample(logits, [state(vocab=30, temperature=0.0, logprobs=True, logit_bias={worst: 100})])
    assert forced.token_ids == [worst] and forced.logprobs == [raw[worst].item()]
    banned = sample(logits, [state(vocab=30, temperature=0.0, logit_bias={best: -100})])
    assert banned.token_ids == [logits[0].topk(2).indices[1].item()]
    # sampled rows: a banned token is never drawn, even where it is by far the likeliest
    peaked = torch.zeros(1, 30)
    peaked[0, 4] = 20.0
    assert 4 in support(peaked, n=500)
    assert 4 not in support(peaked, n=3000, logit_bias={4: -100})


def test_logit_bias_token_ids_must_be_in_the_vocabulary():
    with pytest.raises(SamplingParamsError, match=r"logit_bias token ids must be in \[0, 8\) .*\[8\]"):
        state(vocab=8, logit_bias={8: 1.0})
