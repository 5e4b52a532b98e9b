"""How one request wants its tokens chosen and when it ends: `SamplingParams`, validated once.

Every field is checked in `__post_init__`; a value out of range or of the wrong type raises
`SamplingParamsError` naming the parameter, the value and what is allowed. Nothing is clamped or
dropped. The few normalisations are spelled out: lists become tuples, a lone stop string becomes a
one-element tuple, numpy scalars become Python numbers, and `top_k=-1` (vLLM's "off") becomes 0.

Semantics follow vLLM / the OpenAI API; the sampler (`sampler.py`) applies them.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from maverick.engine.errors import SamplingParamsError

DEFAULT_MAX_TOKENS = 1024
MAX_STOP_STRINGS = 16
MAX_BAD_WORDS = 64
# UTF-8 bytes of one stop string or bad word: what the engine loop matches every token against
# stays small (16 stop strings hold at most 4 KiB, 64 bad words 16 KiB)
MAX_WORD_BYTES = 256
MAX_SEED = 2**64  # exclusive: a seed is an unsigned 64-bit integer, as torch.Generator.manual_seed takes
PENALTY_RANGE = (-2.0, 2.0)  # presence / frequency, as the OpenAI API
MAX_TOP_LOGPROBS = 20  # as the OpenAI API
MAX_N = 16  # choices per request
MAX_LOGIT_BIAS = 300  # entries, as the OpenAI API
LOGIT_BIAS_RANGE = (-100.0, 100.0)
# guided decoding: TensorRT-LLM's guide types (maverick/engine/guided.py), and the guide's size
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar", "structural_tag")
MAX_GUIDE_BYTES = 64 << 10
# Logits a request may ask for (context + generation, fp32), a batched request's prompts together:
# 256 MiB is ~330 tokens of Llama 4's 202,048-token vocabulary; more would be one response too
# large to pass through Triton in one go
MAX_LOGITS_BYTES = 256 << 20


def _is_int(v: Any) -> bool:
    # bool is an int subclass but never a count; numpy integers register as numbers.Integral
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _fail(name: str, v: Any, allowed: str) -> SamplingParamsError:
    return SamplingParamsError(f"{name} must be {allowed}, got {v!r}")


def _int(name: str, v: Any, lo: int, hi: int | None = None, note: str = "") -> int:
    """v as an int in [lo, hi] (hi None: no upper bound)."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    if not _is_int(v) or not (lo <= v and (hi is None or v <= hi)):
        raise _fail(name, v, allowed + note)
    return int(v)


def _float(name: str, v: Any, lo: float, hi: float | None, *, lo_open: bool = False, note: str = "") -> float:
    """v as a finite float in [lo, hi] ((lo, hi] when lo_open; hi None: no upper bound)."""
    above = f"> {lo:g}" if lo_open else f">= {lo:g}"
    allowed = (
        f"a finite number {above}" if hi is None else f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    )
    x = math.nan
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        try:
            x = float(v)
        except OverflowError:  # an int too large for a float
            pass
    in_range = (x > lo if lo_open else x >= lo) and (hi is None or x <= hi)
    if not math.isfinite(x) or not in_range:
        raise _fail(name, v, allowed + note)
    return x


def _check_word_bytes(name: str, words: tuple[str, ...] | list[str]) -> None:
    for i, w in enumerate(words):
        n = len(w.encode("utf-8", "surrogatepass"))
        if n > MAX_WORD_BYTES:
            raise SamplingParamsError(f"{name}[{i}] is {n} bytes; at most {MAX_WORD_BYTES} (UTF-8) each")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS  # output tokens at most, >= 1
    min_tokens: int = 0  # stop tokens are masked until this many output tokens exist; <= max_tokens
    temperature: float = 1.0  # >= 0; 0 = greedy (argmax)
    top_p: float = 1.0  # in (0, 1]: keep the smallest top set whose probability reaches top_p
    top_k: int = 0  # >= 0; 0 = off (-1 is accepted as "off" and stored as 0)
    min_p: float = 0.0  # in [0, 1]: drop tokens with prob < min_p * (top token's prob)
    seed: int | None = None  # in [0, 2**64): the request draws only from its own generator
    repetition_penalty: float = 1.0  # > 0; over prompt and output tokens (CTRL / HF style)
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once per token present in the output
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted once per occurrence in the output
    stop: tuple[str, ...] = ()  # non-empty strings, at most 16; output ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # token ids >= 0 that end the request, besides EOS
    bad_words: tuple[str, ...] = ()  # never generated: each word's tokens (with and without a leading space)
    # token sequences never generated, as a front-end tokenized bad_words (Tokenizer.bad_words_ids),
    # so that the engine loop does not tokenize
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # (token id, bias) pairs, at most 300, each bias in [-100, 100], added to the token's logit
    # before penalties and sampling (OpenAI's logit_bias; a dict {id: bias} is accepted). It changes
    # which token is chosen, not the log-probs returned, which are of the raw distribution.
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False  # the model's EOS tokens do not end the request
    include_stop_str_in_output: bool = False  # the matched stop string is part of the output text
    logprobs: bool = False  # return the log-probability of each chosen token
    # with logprobs: also this many most likely tokens of each step with their log-probabilities
    # (same raw distribution), in [0, 20]
    top_logprobs: int = 0
    # choices (sequences) to generate from the prompt, in [1, 16], each sampled on its own; with a
    # seed s, choice i draws from seed s + i (so choice 0 is the n = 1 request with seed s)
    n: int = 1
    # the raw logits (fp32, before bias, penalties and temperature) of every prompt position, once
    # (TensorRT-LLM's context logits; the prompt is computed whole, never from the prefix cache),
    # and of every sampled position (its generation logits)
    return_context_logits: bool = False
    return_generation_logits: bool = False
    # (guide type, guide): the output held to a grammar (GUIDE_TYPES; the guide may be empty for
    # "json": any JSON value), checked and compiled by the engine (engine/guided.py)
    guided_decoding: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        n = _int("max_tokens", self.max_tokens, 1)
        set_("max_tokens", n)
        set_("min_tokens", _int("min_tokens", self.min_tokens, 0, n, note=" (at most max_tokens)"))
        set_("temperature", _float("temperature", self.temperature, 0.0, None, note=" (0 = greedy)"))
        set_("top_p", _float("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        set_("top_k", max(_int("top_k", self.top_k, -1, note=" (0 or -1 = off)"), 0))
        set_("min_p", _float("min_p", self.min_p, 0.0, 1.0))
        set_("n", _int("n", self.n, 1, MAX_N))
        if self.seed is not None:
            # choice i of n draws from seed + i, which must be a seed too
            note = " or null" if self.n == 1 else f" or null (choice i of n={self.n} draws from seed + i)"
            set_("seed", _int("seed", self.seed, 0, MAX_SEED - self.n, note=note))
        rep = _float(
            "repetition_penalty", self.repetition_penalty, 0.0, None, lo_open=True, note=" (1 = off)"
        )
        set_("repetition_penalty", rep)
        for name in ("presence_penalty", "frequency_penalty"):
            set_(name, _float(name, getattr(self, name), *PENALTY_RANGE, note=" (0 = off)"))
        set_("stop", self._stop_strings(self.stop))
        set_("stop_token_ids", self._stop_token_ids(self.stop_token_ids))
        set_("bad_words", self._strings("bad_words", self.bad_words, MAX_BAD_WORDS))
        set_("bad_words_ids", self._token_sequences("bad_words_ids", self.bad_words_ids))
        set_("logit_bias", self._logit_bias(self.logit_bias))
        flags = ("ignore_eos", "include_stop_str_in_output", "logprobs")
        for name in (*flags, "return_context_logits", "return_generation_logits"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, getattr(self, name), "true or false")
        set_("top_logprobs", _int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS))
        if self.top_logprobs and not self.logprobs:
            raise _fail("top_logprobs", self.top_logprobs, "0 unless logprobs is true")
        set_("guided_decoding", self._guide(self.guided_decoding))
        if self.guided_decoding is not None and self.min_tokens:
            # the grammar may end before min_tokens, when only the (masked) end tokens are left
            raise SamplingParamsError(
                "min_tokens must be 0 with guided decoding: the grammar decides where it ends"
            )

    @staticmethod
    def _guide(guide: Any) -> tuple[str, str] | None:
        if guide is None:
            return None
        if (
            not isinstance(guide, (list, tuple))
            or len(guide) != 2
            or not all(isinstance(g, str) for g in guide)
        ):
            raise _fail("guided_decoding", guide, "(guide type, guide), two strings")
        kind, text = guide
        if kind not in GUIDE_TYPES:
            raise _fail("guided_decoding", kind, "a guide type of " + ", ".join(GUIDE_TYPES))
        if not text and kind != "json":
            raise SamplingParamsError(
                f"guided_decoding: a {kind} guide needs its text (only json goes without)"
            )
        if len(text.encode("utf-8", "surrogatepass")) > MAX_GUIDE_BYTES:
            raise SamplingParamsError(f"guided_decoding: the guide is more than {MAX_GUIDE_BYTES} bytes")
        return kind, text

    @staticmethod
    def _stop_strings(stop: Any) -> tuple[str, ...]:
        if isinstance(stop, str):  # the OpenAI API allows one string for a one-element list
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise _fail("stop", stop, "a list of strings")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise _fail("stop", stop, "a list of non-empty strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise _fail("stop", stop, f"a list of at most {MAX_STOP_STRINGS} strings")
        _check_word_bytes("stop", stop)
        return tuple(stop)

    @staticmethod
    def _strings(name: str, words: Any, limit: int) -> tuple[str, ...]:
        if isinstance(words, str):
            words = (words,)
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w for w in words):
            raise _fail(name, words, "a list of non-empty strings")
        if len(words) > limit:
            raise _fail(name, words, f"a list of at most {limit} strings")
        _check_word_bytes(name, words)
        return tuple(words)

    @staticmethod
    def _token_sequences(name: str, seqs: Any) -> tuple[tuple[int, ...], ...]:
        # two variants of each bad word, each token at least one byte (and one more for the space)
        limit, longest = 2 * MAX_BAD_WORDS, MAX_WORD_BYTES + 1
        fail = SamplingParamsError(
            f"{name} must be at most {limit} non-empty lists of at most {longest} token ids (integers >= 0)"
        )
        if not isinstance(seqs, (list, tuple)) or len(seqs) > limit:
            raise fail
        for seq in seqs:
            ok = isinstance(seq, (list, tuple)) and 0 < len(seq) <= longest
            if not ok or not all(_is_int(t) and t >= 0 for t in seq):
                raise fail
        return tuple(tuple(int(t) for t in seq) for seq in seqs)

    @staticmethod
    def _logit_bias(bias: Any) -> tuple[tuple[int, float], ...]:
        pairs = list(bias.items()) if isinstance(bias, dict) else bias
        if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs
        ):
            raise _fail("logit_bias", bias, "a map of token ids to biases, or (token id, bias) pairs")
        if len(pairs) > MAX_LOGIT_BIAS:
            raise SamplingParamsError(f"logit_bias has {len(pairs)} entries; at most {MAX_LOGIT_BIAS}")
        out: dict[int, float] = {}
        for token, value in pairs:
            if not _is_int(token) or token < 0:
                raise SamplingParamsError(f"logit_bias token ids must be integers >= 0, got {token!r}")
            token = int(token)
            if token in out:
                raise SamplingParamsError(f"logit_bias gives token {token} twice")
            out[token] = _float(f"logit_bias[{token}]", value, *LOGIT_BIAS_RANGE)
        return tuple(sorted(out.items()))

    @staticmethod
    def _stop_token_ids(ids: Any) -> tuple[int, ...]:
        if not isinstance(ids, (list, tuple)):
            raise _fail("stop_token_ids", ids, "a list of token ids (integers >= 0)")
        for t in ids:
            if not _is_int(t) or t < 0:
                raise _fail("stop_token_ids", ids, "a list of token ids (integers >= 0)")
        return tuple(int(t) for t in ids)

    def for_choice(self, i: int) -> SamplingParams:
        """The parameters of choice i of this request: one sequence, drawing from seed + i. The
        prompt's logits come with choice 0 only (the others take its blocks from the prefix cache)."""
        seed = None if self.seed is None else self.seed + i
        return dataclasses.replace(
            self, n=1, seed=seed, return_context_logits=self.return_context_logits and i == 0
        )

    def logits_rows(self, num_prompt_tokens: int) -> int:
        """Rows of logits this request asks for at most: the prompt's, and each choice's tokens'."""
        rows = num_prompt_tokens if self.return_context_logits else 0
        return rows + (self.n * self.max_tokens if self.return_generation_logits else 0)

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: no randomness, so top_k / top_p / min_p / seed have no effect."""
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a stop or bad-word token id cannot be a token of a vocabulary of this size."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"stop_token_ids must be in [0, {vocab_size}) (the model's vocabulary), got {bad!r}"
            )
        if any(t >= vocab_size for seq in self.bad_words_ids for t in seq):
            raise SamplingParamsError(f"bad_words_ids must be in [0, {vocab_size}) (the model's vocabulary)")
        bad = [t for t, _ in self.logit_bias if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                f"logit_bias token ids must be in [0, {vocab_size}) (the model's vocabulary), got {bad[:8]!r}"
            )
