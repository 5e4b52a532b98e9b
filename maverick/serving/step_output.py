"""One streamed update of the `maverick` step as a single UINT8 tensor, for postprocessing.

Every tensor of a response costs Triton an allocation and a copy at each hop (the stub's shared
memory, the response, the ensemble's request to postprocessing, postprocessing's shared memory),
per streamed response. So the step's private output is one byte string, and postprocessing,
which makes the public tensors, unpacks it.

Layout (little-endian): a header of HEADER int64 values — num_input_tokens, number of token ids,
number of log-probs, bytes of text, of finish reason and of abort handle, the optional
outputs the request asked for (`returns`, RETURN_* bits), the flow-control acknowledgement
(board id, slot, value; see response_window.py), 1 for a heartbeat, the sequence index (the
choice of an n > 1 request), K (top log-probs per token), the prompt tokens served from the prefix
cache, the batch index (the prompt of a batched request), the PERF_METRICS values, the rows of
context and of generation logits and their width (the vocabulary), and the cumulative log-prob (a
float64's bits) — followed by the token ids (int32), the log-probs (float32), the top log-probs
[m, K] (float32) and their token ids [m, K] (int32), the context logits and the generation logits
(float32, [rows, width] each), the text, the finish reason and the abort handle (UTF-8). The sizes
must add up to the tensor's exactly.

A heartbeat carries no output: the step sends one while a request has been silent for a while, so
that postprocessing sees a cancelled ensemble request (Triton tells only the next step) and
answers it with no response.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HEADER = 26
_I64, _I32, _F32, _F64 = np.dtype("<i8"), np.dtype("<i4"), np.dtype("<f4"), np.dtype("<f8")


class MalformedStepOutput(ValueError):
    pass


# `returns` bits: the optional public outputs a request asked for (TensorRT-LLM's return_* inputs)
RETURN_NUM_INPUT_TOKENS = 1
RETURN_NUM_OUTPUT_TOKENS = 2
RETURN_LOG_PROBS = 4  # output_log_probs and cum_log_probs
RETURN_SEQUENCE_INDEX = 8  # an n > 1 request: sequence_index in each response
RETURN_BATCH_INDEX = 16  # a batched request (batch size > 1): batch_index in each response
RETURN_PERF_METRICS = 32  # return_perf_metrics: PERF_METRICS in each response
RETURN_CONTEXT_LOGITS = 64  # context_logits, in each choice's first response
RETURN_GENERATION_LOGITS = 128  # generation_logits of the response's tokens
STREAMED = 256  # not an output: the request streams (TensorRT-LLM lays its logits out per token)

# TensorRT-LLM's per-request perf metrics (int64 each): KV blocks newly allocated to the request,
# taken from the prefix cache, and allocated in all (as TensorRT-LLM counts, the new ones), then
# times in ns of CLOCK_MONOTONIC (std::chrono::steady_clock's, what TensorRT-LLM reports)
PERF_METRICS = (
    "kv_cache_alloc_new_blocks",
    "kv_cache_reused_blocks",
    "kv_cache_alloc_total_blocks",
    "arrival_time_ns",
    "first_scheduled_time_ns",
    "first_token_time_ns",
    "last_token_time_ns",
)


@dataclass(frozen=True)
class StepOutput:
    text: bytes  # UTF-8 delta
    token_ids: np.ndarray  # [n] int32
    finish_reason: bytes  # UTF-8; empty until the last update
    num_input_tokens: int
    log_probs: np.ndarray  # [m] float32 (m = 0 when not asked for)
    # the request's secret abort handle, UTF-8: the only key the `maverick` model's `abort` takes
    # (how postprocessing stops a cancelled request; nobody else is given it)
    abort_handle: bytes
    returns: int = 0  # RETURN_* bits
    ack: tuple[int, int, int] = (-1, -1, 0)  # (board id, slot, value), -1: not flow-controlled
    heartbeat: bool = False  # no output: only lets postprocessing check for a cancelled request
    sequence_index: int = 0  # which choice of an n > 1 request this update belongs to
    cum_log_prob: float = 0.0  # sum of the choice's log-probs so far (with RETURN_LOG_PROBS)
    # [m, K]: each log-prob'd token's K most likely tokens' log-probs and ids (K = 0: not asked)
    top_log_probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), _F32))
    top_log_prob_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), _I32))
    num_cached_tokens: int = 0  # of num_input_tokens, those whose KV came from the prefix cache
    batch_index: int = 0  # which prompt of a batched request
    perf_metrics: tuple[int, ...] = (0,) * len(PERF_METRICS)
    # raw logits, [rows, vocab] each (rows = 0: none): the prompt's, and the response's tokens'
    context_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), _F32))
    generation_logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), _F32))

    @classmethod
    def beat(cls, abort_handle: bytes, ack: tuple[int, int, int]) -> StepOutput:
        """A heartbeat of the request with this handle."""
        empty = np.zeros(0, _I32)
        return cls(b"", empty, b"", 0, np.zeros(0, _F32), abort_handle, 0, ack, heartbeat=True)

    def to_array(self) -> np.ndarray:
        """[1, N] uint8, the batch-1 tensor the step sends."""
        ids = np.ascontiguousarray(self.token_ids, dtype=_I32)
        lps = np.ascontiguousarray(self.log_probs, dtype=_F32)
        top = np.ascontiguousarray(self.top_log_probs, dtype=_F32)
        top_ids = np.ascontiguousarray(self.top_log_prob_ids, dtype=_I32)
        k = top.shape[1] if top.ndim == 2 else 0
        ctx = np.ascontiguousarray(self.context_logits, dtype=_F32)
        gen = np.ascontiguousarray(self.generation_logits, dtype=_F32)
        width = max(ctx.shape[1] if ctx.size else 0, gen.shape[1] if gen.size else 0)
        if ctx.ndim != 2 or gen.ndim != 2 or any(a.size and a.shape[1] != width for a in (ctx, gen)):
            raise ValueError(f"logits must be [rows, vocab], one vocab: got {ctx.shape} and {gen.shape}")
        n_ctx, n_gen = (len(ctx) if ctx.size else 0), (len(gen) if gen.size else 0)
        if len(self.perf_metrics) != len(PERF_METRICS):
            raise ValueError(f"perf_metrics holds {len(PERF_METRICS)} values, got {len(self.perf_metrics)}")
        if k and (top.shape != (lps.size, k) or top_ids.shape != top.shape):
            raise ValueError(
                f"top log-probs {top.shape} and their ids {top_ids.shape} must be [{lps.size}, K]"
            )
        header = np.array(
            [
                self.num_input_tokens,
                ids.size,
                lps.size,
                len(self.text),
                len(self.finish_reason),
                len(self.abort_handle),
                self.returns,
                *self.ack,
                int(self.heartbeat),
                self.sequence_index,
                k,
                self.num_cached_tokens,
                self.batch_index,
                *self.perf_metrics,
                n_ctx,
                n_gen,
                width,
                np.array(self.cum_log_prob, _F64).view(_I64),
            ],
            dtype=_I64,
        )
        blob = b"".join(
            (
                header.tobytes(),
                ids.tobytes(),
                lps.tobytes(),
                top.tobytes() if k else b"",
                top_ids.tobytes() if k else b"",
                ctx.tobytes() if n_ctx else b"",
                gen.tobytes() if n_gen else b"",
                self.text,
                self.finish_reason,
                self.abort_handle,
            )
        )
        return np.frombuffer(blob, dtype=np.uint8).reshape(1, -1)

    @classmethod
    def from_array(cls, array: np.ndarray) -> StepOutput:
        buf = np.ascontiguousarray(array, dtype=np.uint8).reshape(-1).tobytes()
        head_bytes = HEADER * _I64.itemsize
        if len(buf) < head_bytes:
            raise MalformedStepOutput(f"step output of {len(buf)} bytes, shorter than its header")
        head = np.frombuffer(buf, _I64, HEADER)
        fields = [int(v) for v in head[:-1]]
        n_in, n_ids, n_lps, n_text, n_finish, n_id, returns, *ack = fields[:10]
        beat, index, k, n_cached, batch_index = fields[10:15]
        perf = tuple(fields[15 : 15 + len(PERF_METRICS)])
        n_ctx, n_gen, width = fields[15 + len(PERF_METRICS) :]
        cum = float(head[-1:].view(_F64)[0])
        if min(k, n_lps, n_ctx, n_gen, width) < 0:
            raise MalformedStepOutput(
                f"step output header has negative sizes ({n_lps} log-probs, K={k}, logits "
                f"{n_ctx} + {n_gen} rows of {width})"
            )
        n_top = n_lps * k
        sizes = (
            n_ids * _I32.itemsize, n_lps * _F32.itemsize, n_top * 4, n_top * 4,
            n_ctx * width * 4, n_gen * width * 4, n_text, n_finish, n_id,
        )  # fmt: skip
        if min(sizes) < 0 or head_bytes + sum(sizes) != len(buf):
            raise MalformedStepOutput(f"step output header {sizes} does not fit its {len(buf)} bytes")
        at = head_bytes
        ids = np.frombuffer(buf, _I32, n_ids, at)
        at += sizes[0]
        lps = np.frombuffer(buf, _F32, n_lps, at)
        at += sizes[1]
        top = np.frombuffer(buf, _F32, n_top, at).reshape(n_lps, k)
        at += sizes[2]
        top_ids = np.frombuffer(buf, _I32, n_top, at).reshape(n_lps, k)
        at += sizes[3]
        ctx = np.frombuffer(buf, _F32, n_ctx * width, at).reshape(n_ctx, width)
        at += sizes[4]
        gen = np.frombuffer(buf, _F32, n_gen * width, at).reshape(n_gen, width)
        at += sizes[5]
        text, at = buf[at : at + n_text], at + n_text
        finish, at = buf[at : at + n_finish], at + n_finish
        return cls(
            text, ids, finish, n_in, lps, buf[at : at + n_id], returns, tuple(ack), bool(beat),
            index, cum, top, top_ids, n_cached, batch_index, perf, ctx, gen,
        )  # fmt: skip
