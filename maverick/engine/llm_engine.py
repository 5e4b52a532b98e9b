"""The synchronous engine: add requests, step, get outputs. One thread drives it (see async_engine).

A step schedules a batch (continuous batching over the paged cache), runs the model once,
samples for the sequences that reached their last token, and turns each new token into an output
with its text delta, after stop tokens, stop strings, max_tokens and the context limit are checked.
An exception in the model fails the requests of that batch, with the message, and nothing else.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from maverick.checkpoint import load_model
from maverick.config import ModelConfig
from maverick.engine.api import DTYPES, EngineConfig, Prompt, RequestOutput, SamplingParams
from maverick.engine.block_manager import BlockManager
from maverick.engine.errors import RequestError
from maverick.engine.execution import resolve_modes
from maverick.engine.guided import Grammars
from maverick.engine.model_runner import ModelRunner
from maverick.engine.parallel import TensorParallelRanks, join_group, rank_device
from maverick.engine.sampler import SamplerOutput, SamplingState, sample
from maverick.engine.sampling_params import MAX_LOGITS_BYTES
from maverick.engine.scheduler import Scheduler, SchedulerConfig
from maverick.engine.sequence import FinishReason, Sequence, SequenceStatus
from maverick.engine.stop import StopStringMatcher
from maverick.layers.parallel import SINGLE, TensorParallel
from maverick.plan import check_fits, check_gpus, kv_cache_budget
from maverick.tokenizer import MIN_CONTEXT_TOKENS, Tokenizer

log = logging.getLogger(__name__)

# generation_tokens_per_s in stats() is measured over the steps of this many recent seconds
RATE_WINDOW_S = 5.0


def stats_as_of(stats: dict[str, float], taken_at: float) -> dict[str, float]:
    """A copy of `stats()` taken at monotonic time `taken_at` by a front-end that refreshes it only
    when the engine steps: with no step for a whole rate window since, no token was generated in
    the window, so the rate is 0 (not the last busy value)."""
    out = dict(stats)
    if time.monotonic() - taken_at > RATE_WINDOW_S:
        out["generation_tokens_per_s"] = 0.0
    return out


def _check_fits_gpus(model_config: ModelConfig, config: EngineConfig, device: torch.device) -> None:
    """The planner's arithmetic (maverick/plan.py) on the GPUs at hand, before anything loads: a
    checkpoint the ranks cannot hold fails at once with what would fit."""
    visible = torch.cuda.device_count()
    check_gpus(1, config.tensor_parallel_size, visible - (device.index or 0), "this engine")
    total = torch.cuda.get_device_properties(device).total_memory
    check_fits(model_config, config, total, model=config.model_dir, max_gpus=visible)


@dataclass
class _Logprobs:
    """The log-probs and raw logits of an output's new tokens (a request that asked for them)."""

    logprobs: list[float] | None = None  # [n]
    top_token_ids: list[list[int]] | None = None  # [n, top_logprobs]
    top_logprobs: list[list[float]] | None = None  # [n, top_logprobs]
    generation_logits: np.ndarray | None = None  # [n, vocab] raw


def _generation_logits(logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, np.ndarray]:
    """{row: raw logits [vocab]} of the sampled rows whose requests asked for them (one copy)."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.return_generation_logits]
    if not rows:
        return {}
    raw = logits[torch.tensor(rows, device=logits.device)].float().cpu().numpy()
    return dict(zip(rows, raw, strict=True))


@dataclass
class _Stream:
    """Text-side state of one sequence (a request's choice): detokenizer context and stop-string matcher."""

    matcher: StopStringMatcher | None
    emitted_ids: int = 0  # output ids already turned into text


class LLMEngine:
    def __init__(self, config: EngineConfig, on_rank_failure: Callable[[str], None] | None = None):
        """on_rank_failure(reason): called from a watchdog thread when a tensor-parallel rank
        stops; by default the next step raises. The engine process exits instead (engine_core)."""
        self.config = config
        self.device = rank_device(config, 0)
        if config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)  # process-wide: the engine owns its process
        model_config = ModelConfig.from_dir(config.model_dir)  # what is decided before the weights load
        if self.device.type == "cuda":
            _check_fits_gpus(model_config, config, self.device)
        self.modes = resolve_modes(
            config.decode_path,
            config.moe_path,
            self.device,
            config.block_size,
            model_config.text.head_dim,
            config.tensor_parallel_size,
        )
        self.rank_failure: str | None = None
        self.ranks: TensorParallelRanks | None = None
        tp = SINGLE
        if config.tensor_parallel_size > 1:
            self.ranks = TensorParallelRanks(config, on_rank_failure or self._rank_failed)
            try:
                tp = join_group(config, 0, self.ranks.store_path)
            except BaseException:
                self.ranks.shutdown()
                raise
        try:
            self._start(tp)
        except BaseException:
            self.close()
            raise

    def _start(self, tp: TensorParallel) -> None:
        config = self.config
        self.model = load_model(
            config.model_dir, dtype=DTYPES[config.dtype], device=self.device, experts=config.experts, tp=tp
        )
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        mcfg = self.model.config
        num_blocks = config.num_kv_blocks or self._num_kv_blocks()
        self.max_model_len = min(
            config.max_model_len or mcfg.text.max_position_embeddings, mcfg.text.max_position_embeddings
        )
        setup = dict(
            num_blocks=num_blocks,
            block_size=config.block_size,
            modes=self.modes,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
        )
        if self.ranks is not None:
            self.ranks.send(("setup", setup))  # the ranks build their runners (and graphs) with ours
        self.runner = ModelRunner(self.model, **setup, peers=self.ranks)
        if self.ranks is not None:
            self.ranks.wait_ready()
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.block_manager
        )
        self.vocab_size = mcfg.text.vocab_size
        self.eos_ids = frozenset(self.tokenizer.stop_ids) | frozenset(mcfg.text.eos_token_ids)
        self.grammars = Grammars(
            config.model_dir, self.vocab_size, self.eos_ids, overlap=self.device.type == "cuda"
        )
        # every unfinished request's choices (n > 1: SamplingParams.n), choice i at index i
        self.requests: dict[str, list[Sequence]] = {}
        # choices 1..n-1 of requests whose choice 0 has yet to compute the prompt (see _release_choices)
        self.held_choices: dict[str, list[Sequence]] = {}
        self.streams: dict[tuple[str, int], _Stream] = {}  # by (request id, choice)
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self._token_marks: deque[tuple[float, int]] = deque()  # (time, generated total) after recent steps

    def _rank_failed(self, reason: str) -> None:
        self.rank_failure = reason

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one) and the grammar thread."""
        self.grammars.close()
        if self.ranks is not None:
            self.ranks.shutdown()
            self.ranks = None
            dist.destroy_process_group()

    def _num_kv_blocks(self) -> int:
        per_block = ModelRunner.kv_bytes_per_block(self.model, self.config.block_size)
        budget = self.config.kv_cache_bytes
        if self.device.type == "cuda":
            # the planner's budget with the weights as loaded (rank 0 holds the vision tower too,
            # so its budget binds; every rank allocates rank 0's block count)
            free, total = torch.cuda.mem_get_info(self.device)
            in_use = torch.cuda.memory_reserved(self.device)
            budget = kv_cache_budget(self.model.config.text, self.config, total, free, in_use)
        # the runner allocates one block more: the scratch block of fixed-shape decode batches
        if budget < 2 * per_block:
            raise ValueError(
                f"no room for a KV block and the scratch block ({per_block} bytes each; {budget} available)"
            )
        return budget // per_block - 1

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kwargs) -> LLMEngine:
        return cls(EngineConfig(model_dir=str(model_dir), **kwargs))

    # -- requests --------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> list[Sequence]:
        """Validate a request and build its sequences, one per choice (params.n; choice i samples
        with params.for_choice(i): seed + i). Thread-safe: touches no engine state."""
        ids = prompt.token_ids
        if not ids:
            raise RequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this model serves at most {self.max_model_len - 1} "
                f"prompt tokens (max_model_len {self.max_model_len}, one left to generate)"
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(ids)} tokens exceed the model's "
                f"context of {self.max_model_len} tokens"
            )
        self._check_logits_size(len(ids), params)
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if len(ids) + 1 > capacity:
            raise RequestError(f"the prompt has {len(ids)} tokens but the KV cache holds {capacity} in all")
        vcfg = self.model.config.vision
        for i, image in enumerate(prompt.images):
            shape = tuple(image.pixel_values.shape)
            if len(shape) != 4 or shape[1:] != (3, vcfg.image_size, vcfg.image_size):
                raise RequestError(
                    f"image {i}: pixel values must be [tiles, 3, {vcfg.image_size}, {vcfg.image_size}]"
                )
        grammar = self.grammars.compile(*params.guided_decoding) if params.guided_decoding else None
        try:
            bad_words = [*params.bad_words_ids, *self._bad_words_ids(params.bad_words)]
            arrival = time.monotonic()
            seqs = [
                self._sequence(request_id, i, prompt, params.for_choice(i), bad_words, arrival)
                for i in range(params.n)
            ]
        except ValueError as e:
            raise RequestError(str(e)) from None
        if grammar is not None:  # each choice walks the grammar on its own
            for seq in seqs:
                seq.grammar = self.grammars.matcher(grammar, sorted(seq.sampling.stop_ids))
        return seqs

    def _check_logits_size(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        rows = params.logits_rows(num_prompt_tokens)
        size = rows * self.vocab_size * 4  # fp32
        if size > MAX_LOGITS_BYTES:
            raise RequestError(
                f"the logits asked for (return_context_logits / return_generation_logits) would be "
                f"{size / 2**20:.0f} MiB ({rows} rows of {self.vocab_size} fp32 values); at most "
                f"{MAX_LOGITS_BYTES >> 20} MiB per request: lower max_tokens or the prompt's length"
            )

    def _sequence(self, request_id, index, prompt, params, bad_words_ids, arrival) -> Sequence:
        output_ids: list[int] = []  # shared by the sequence and its sampling state
        state = SamplingState.create(
            params,
            prompt.token_ids,
            eos_token_ids=self.eos_ids,
            vocab_size=self.vocab_size,
            device=self.device,
            output_token_ids=output_ids,
            bad_words_ids=bad_words_ids,
        )
        return Sequence(
            request_id=request_id,
            index=index,
            prompt_token_ids=list(prompt.token_ids),
            images=tuple(prompt.images),
            params=params,
            sampling=state,
            patch_token_id=self.model.config.image_token_id,
            tokens_per_tile=self.model.config.vision.tokens_per_tile,
            arrival_time=arrival,
            output_token_ids=output_ids,
        )

    def _bad_words_ids(self, words: tuple[str, ...]) -> list[list[int]]:
        """Bad words given as text, tokenized here (bounded by SamplingParams' limits); the server's
        preprocessing sends them as bad_words_ids instead, so its requests cost the loop nothing."""
        return self.tokenizer.bad_words_ids(words)

    def add_sequences(self, seqs: list[Sequence]) -> None:
        """Queue a request's sequences (make_request's). Choice 0 is scheduled now; the others
        wait until it has computed the prompt, then start from its cached blocks."""
        request_id = seqs[0].request_id
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        self.requests[request_id] = seqs
        for seq in seqs:
            p = seq.params
            matcher = StopStringMatcher(p.stop, p.include_stop_str_in_output) if p.stop else None
            self.streams[seq.key] = _Stream(matcher)
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:
            self.held_choices[request_id] = seqs[1:]
        self.num_prompt_tokens += seqs[0].num_prompt_tokens  # the prompt comes once

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> None:
        self.add_sequences(self.make_request(request_id, prompt, params))

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Finish every choice of a request now and free their blocks: one finished output per
        choice still running (none if the request is unknown or already finished)."""
        held = self.held_choices.pop(request_id, [])
        outputs = []
        for seq in self.requests.get(request_id, []):
            if seq.is_finished:
                continue
            if any(seq is h for h in held):  # never queued: nothing to take back
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
            else:
                self.scheduler.finish(seq, FinishReason.ABORT)
            outputs.append(self._finish_output(seq, [], ""))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _release_choices(self) -> None:
        """Queue the held choices of requests whose choice 0 has computed its prompt (or ended).

        Why choices wait rather than fork: once choice 0's prompt is computed, its full blocks are
        in the prefix cache (hash-chained, images included), so each sibling admitted now takes
        every full prompt block by reference (BlockManager.computed_blocks: shared, ref-counted)
        and computes only the rest, at least the prompt's last token, whose logits it samples its
        own first token from. No K/V is copied and no block is written by two sequences: the
        partial last block is each choice's own. With the prefix cache off, siblings compute the
        whole prompt. They go to the front of the queue: their request was admitted already.
        """
        for request_id, held in list(self.held_choices.items()):
            first = self.requests[request_id][0]
            if first.is_finished or first.num_computed_tokens >= first.num_prompt_tokens:
                del self.held_choices[request_id]
                self.scheduler.add_first(held)

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.rank_failure is not None:
            raise RuntimeError(self.rank_failure)
        if self.held_choices:
            self._release_choices()
        sched = self.scheduler.schedule()
        outputs = [self._finish_output(s, [], self._flush(s)) for s in sched.out_of_memory]
        if sched.is_empty:
            return outputs
        # guided sequences that sample this step: their token masks are filled during the forward
        guided = [
            s for s, n in zip(sched.seqs, sched.num_new_tokens, strict=True)
            if s.grammar is not None and s.num_computed_tokens + n == s.num_tokens
        ]  # fmt: skip
        try:
            masks = self.grammars.start_masks(guided)
            logits, sample_seqs = self.runner.execute(sched)
            for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
                seq.num_computed_tokens += n
                self.block_manager.cache_full_blocks(seq)
            bitmask = None
            if masks is not None:
                row = {id(s): i for i, s in enumerate(sample_seqs)}
                bitmask = [row[id(s)] for s in guided], masks.result()
            sampled = sample(logits, [s.sampling for s in sample_seqs], bitmask)
        except Exception as e:  # noqa: BLE001 - one bad batch must not take the engine down
            if self.ranks is not None:  # the other ranks may wait in a collective: the engine is done
                reason = self.ranks.failure(wait_s=2.0) or f"a tensor-parallel step failed: {e}"
                raise RuntimeError(reason) from e
            log.exception("engine step failed")
            for seq in list(sched.seqs):
                self.scheduler.finish(seq, FinishReason.ERROR)
                seq.error = f"engine step failed: {type(e).__name__}: {e}"
                outputs.append(self._finish_output(seq, [], ""))
            return outputs
        now = time.monotonic()
        raw = _generation_logits(logits, sample_seqs)
        for i, (seq, token) in enumerate(zip(sample_seqs, sampled.token_ids, strict=True)):
            outputs.append(self._append_token(seq, token, sampled, i, now, raw.get(i)))
        self._token_marks.append((now, self.num_generated_tokens))
        while now - self._token_marks[0][0] > RATE_WINDOW_S:
            self._token_marks.popleft()
        return outputs

    def _append_token(
        self,
        seq: Sequence,
        token: int,
        sampled: SamplerOutput,
        row: int,
        now: float,
        raw_logits: np.ndarray | None = None,
    ) -> RequestOutput:
        seq.output_token_ids.append(token)
        seq.token_times.append(now)
        if seq.first_token_time is None:
            seq.first_token_time = now
        self.num_generated_tokens += 1
        p = seq.params
        reason = None
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            # only a step whose guided row had no allowed token at all can get here
            seq.error = f"guided decoding: token {token} is outside the grammar (nothing else was allowed)"
            reason = FinishReason.ERROR
        elif token in seq.sampling.stop_ids:  # the sampler masks them until min_tokens
            reason = FinishReason.STOP
        elif seq.grammar is not None and seq.grammar.is_terminated():  # the grammar ended the answer
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        text = self._detokenize(seq, final=reason is not None)
        stream = self.streams[seq.key]
        if stream.matcher is not None:
            text, stopped, _ = stream.matcher.feed(text)
            if stopped:
                reason = FinishReason.STOP
            elif reason is not None:
                text += stream.matcher.flush()
                if stream.matcher.stopped:  # a stop string completed inside the held-back text
                    reason = FinishReason.STOP
        lps = None
        if p.logprobs:
            seq.cumulative_logprob += sampled.logprobs[row]
            lps = _Logprobs([sampled.logprobs[row]])
            if p.top_logprobs:
                lps.top_token_ids = [sampled.top_token_ids[row]]
                lps.top_logprobs = [sampled.top_logprobs[row]]
        if raw_logits is not None:
            lps = lps or _Logprobs()
            lps.generation_logits = raw_logits[None]
        if reason is not None:
            self.scheduler.finish(seq, reason)
            return self._finish_output(seq, [token], text, lps)
        return self._output(seq, [token], text, lps, finished=False)

    # -- text --------------------------------------------------------------------------------------
    def _detokenize(self, seq: Sequence, final: bool) -> str:
        stream = self.streams[seq.key]
        out = seq.output_token_ids
        start = stream.emitted_ids
        window = out[max(0, start - MIN_CONTEXT_TOKENS) :]
        stream.emitted_ids = len(out)
        return self.tokenizer.detokenize_incrementally(window, len(out) - start, final=final)

    def _flush(self, seq: Sequence) -> str:
        """Text still held back when a request ends without a new token."""
        stream = self.streams.get(seq.key)
        if stream is None:
            return ""
        text = self._detokenize(seq, final=True)
        if stream.matcher is not None:
            text, _, _ = stream.matcher.feed(text)
            text += stream.matcher.flush()
        return text

    # -- outputs -----------------------------------------------------------------------------------
    def _output(self, seq, token_ids, text, lps: _Logprobs | None = None, finished=False) -> RequestOutput:
        new_times = seq.token_times[-len(token_ids) :] if token_ids else []
        lps = lps or _Logprobs()
        context = None
        if (
            seq.context_logits
            and not seq.context_logits_sent
            and seq.num_context_logits == seq.num_prompt_tokens
        ):
            context = torch.cat(seq.context_logits).numpy()  # [prompt, vocab]
            seq.context_logits, seq.context_logits_sent = [], True
        return RequestOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=token_ids,
            text=text,
            finished=finished,
            finish_reason=seq.finish_reason.value if finished and seq.finish_reason else None,
            error=seq.error,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=lps.logprobs,
            cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs else None,
            top_token_ids=lps.top_token_ids,
            top_logprobs=lps.top_logprobs,
            arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time,
            token_times=new_times,
            first_scheduled_time=seq.first_scheduled_time,
            last_token_time=seq.token_times[-1] if seq.token_times else None,
            num_new_blocks=seq.num_new_blocks,
            num_reused_blocks=seq.num_reused_blocks,
            context_logits=context,
            generation_logits=lps.generation_logits,
        )

    def _finish_output(self, seq, token_ids, text, lps: _Logprobs | None = None) -> RequestOutput:
        self.streams.pop(seq.key, None)
        choices = self.requests.get(seq.request_id, [])
        if all(s.is_finished for s in choices):  # its last choice: the request is done
            self.requests.pop(seq.request_id, None)
        return self._output(seq, token_ids, text, lps, finished=True)

    # -- introspection -----------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_total": bm.num_blocks,
            "prefix_cache_hit_rate": bm.prefix_hit_rate,
            "prefix_cache_hit_tokens_total": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generated_tokens_total": self.num_generated_tokens,
            "generation_tokens_per_s": self._generation_rate(),
        }

    def _generation_rate(self) -> float:
        """Tokens per second over the steps of the last RATE_WINDOW_S seconds (0 when idle)."""
        marks = self._token_marks
        if len(marks) < 2 or time.monotonic() - marks[-1][0] > RATE_WINDOW_S:
            return 0.0
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
