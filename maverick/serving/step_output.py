"""One streamed update of the `maverick` step as a single UINT8 tensor, for postprocessing.

Every tensor of a response costs Triton an allocation and a copy at each hop (the stub's shared
memory, the response, the ensemble's request to postprocessing, postprocessing's shared memory),
per streamed response. So the step's private output is one byte string, and postprocessing,
which makes the public tensors, unpacks it.

Layout (little-endian): a header of HEADER int64 values — num_input_tokens, number of token ids,
number of log-probs, bytes of text, of finish reason and of abort handle, the optional
outputs the request asked for (`returns`, RETURN_* bits), the flow-control acknowledgement
(board id, slot, value; see response_window.py), then 1 for a heartbeat — followed by the
token ids (int32), the log-probs (float32), the text, the finish reason and the abort handle
(UTF-8). The sizes must add up to the tensor's exactly.

A heartbeat carries no output: the step sends one while a request has been silent for a while, so
that postprocessing sees a cancelled ensemble request (Triton tells only the next step) and
answers it with no response.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEADER = 11
_I64, _I32, _F32 = np.dtype("<i8"), np.dtype("<i4"), np.dtype("<f4")


class MalformedStepOutput(ValueError):
    pass


# `returns` bits: the optional public outputs a request asked for (TensorRT-LLM's return_* inputs)
RETURN_NUM_INPUT_TOKENS = 1
RETURN_NUM_OUTPUT_TOKENS = 2
RETURN_LOG_PROBS = 4


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

    @classmethod
    def beat(cls, abort_handle: bytes, ack: tuple[int, int, int]) -> StepOutput:
        """A heartbeat of the request with this handle."""
        empty = np.zeros(0, _I32)
        return cls(b"", empty, b"", 0, np.zeros(0, _F32), abort_handle, 0, ack, heartbeat=True)

    def to_array(self) -> np.ndarray:
        """[1, N] uint8, the batch-1 tensor the step sends."""
        ids = np.ascontiguousarray(self.token_ids, dtype=_I32)
        lps = np.ascontiguousarray(self.log_probs, dtype=_F32)
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
            ],
            dtype=_I64,
        )
        blob = b"".join(
            (
                header.tobytes(),
                ids.tobytes(),
                lps.tobytes(),
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
        n_in, n_ids, n_lps, n_text, n_finish, n_id, returns, *ack, beat = (
            int(v) for v in np.frombuffer(buf, _I64, HEADER)
        )
        sizes = (n_ids * _I32.itemsize, n_lps * _F32.itemsize, n_text, n_finish, n_id)
        if min(sizes) < 0 or head_bytes + sum(sizes) != len(buf):
            raise MalformedStepOutput(f"step output header {sizes} does not fit its {len(buf)} bytes")
        at = head_bytes
        ids = np.frombuffer(buf, _I32, n_ids, at)
        at += sizes[0]
        lps = np.frombuffer(buf, _F32, n_lps, at)
        at += sizes[1]
        text, at = buf[at : at + n_text], at + n_text
        finish, at = buf[at : at + n_finish], at + n_finish
        return cls(text, ids, finish, n_in, lps, buf[at : at + n_id], returns, tuple(ack), bool(beat))
