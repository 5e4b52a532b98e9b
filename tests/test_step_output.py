"""The `maverick` step's packed update (maverick/serving/step_output.py): what postprocessing
unpacks is exactly what the step packed; a truncated or inconsistent one is refused."""

from __future__ import annotations

import numpy as np
import pytest

from maverick.serving.step_output import (
    HEADER,
    RETURN_LOG_PROBS,
    RETURN_NUM_OUTPUT_TOKENS,
    MalformedStepOutput,
    StepOutput,
)


def test_round_trip_keeps_every_field():
    step = StepOutput(
        text="naïve 日本 🙂".encode(),
        token_ids=np.array([5, 0, 2**31 - 1, 4047], dtype=np.int32),
        finish_reason=b"stop",
        num_input_tokens=1234,
        log_probs=np.array([-0.25, -1e-9, -30.5], dtype=np.float32),
        abort_handle="req-é-1".encode(),
        returns=RETURN_NUM_OUTPUT_TOKENS | RETURN_LOG_PROBS,
        ack=(2**62 - 1, 4095, (7 << 32) | 3),
        num_cached_tokens=1216,
    )
    array = step.to_array()
    assert array.dtype == np.uint8 and array.shape[0] == 1
    back = StepOutput.from_array(array)
    assert back.text.decode() == "naïve 日本 🙂" and back.finish_reason == b"stop"
    assert back.token_ids.tolist() == [5, 0, 2**31 - 1, 4047] and back.token_ids.dtype == np.int32
    assert back.log_probs.tolist() == step.log_probs.tolist() and back.log_probs.dtype == np.float32
    assert back.num_input_tokens == 1234 and back.abort_handle == "req-é-1".encode()
    assert back.returns == RETURN_NUM_OUTPUT_TOKENS | RETURN_LOG_PROBS and back.ack == step.ack
    assert back.num_cached_tokens == 1216


def test_an_update_without_tokens_or_text():
    step = StepOutput(b"", np.zeros(0, np.int32), b"", 7, np.zeros(0, np.float32), b"r")
    back = StepOutput.from_array(step.to_array())
    assert (back.text, back.finish_reason, back.abort_handle, back.returns, back.ack) == (
        b"",
        b"",
        b"r",
        0,
        (-1, -1, 0),
    )
    assert back.token_ids.size == 0 and back.log_probs.size == 0


@pytest.mark.parametrize("cut", [0, 3, HEADER * 8 - 1, HEADER * 8 + 5, -1])
def test_a_truncated_update_is_refused(cut):
    array = StepOutput(
        b"hello", np.arange(3, dtype=np.int32), b"", 1, np.zeros(0, np.float32), b"r"
    ).to_array()
    with pytest.raises(MalformedStepOutput):
        StepOutput.from_array(array[:, :cut])


def test_trailing_bytes_are_refused():
    array = StepOutput(b"hi", np.zeros(0, np.int32), b"", 1, np.zeros(0, np.float32), b"r").to_array()
    with pytest.raises(MalformedStepOutput):
        StepOutput.from_array(np.concatenate([array, np.zeros((1, 1), np.uint8)], axis=1))


def test_negative_sizes_are_refused():
    header = np.zeros(HEADER, dtype="<i8")
    header[1] = -1  # token ids
    with pytest.raises(MalformedStepOutput):
        StepOutput.from_array(np.frombuffer(header.tobytes(), np.uint8)[None])


def test_a_heartbeat_round_trips_without_output():
    beat = StepOutput.from_array(StepOutput.beat(b"handle", (3, 1, 7)).to_array())
    assert beat.heartbeat and beat.abort_handle == b"handle" and beat.ack == (3, 1, 7)
    assert (beat.text, beat.finish_reason, beat.token_ids.size, beat.log_probs.size) == (b"", b"", 0, 0)
    assert not StepOutput(b"x", np.zeros(0, np.int32), b"", 1, np.zeros(0, np.float32), b"r").heartbeat


def test_top_log_probs_sequence_index_and_cumulative_round_trip():
    rng = np.random.default_rng(0)
    top = -rng.random((3, 4), dtype=np.float32)
    top_ids = rng.integers(0, 2**31 - 1, size=(3, 4), dtype=np.int32)
    step = StepOutput(
        b"abc", np.array([1, 2, 3], np.int32), b"", 9, np.array([-1, -2, -3], np.float32), b"h",
        returns=RETURN_LOG_PROBS, sequence_index=15, cum_log_prob=-123.456789012345,
        top_log_probs=top, top_log_prob_ids=top_ids,
    )  # fmt: skip
    back = StepOutput.from_array(step.to_array())
    assert back.sequence_index == 15 and back.cum_log_prob == -123.456789012345  # a float64, exactly
    assert back.top_log_probs.dtype == np.float32 and back.top_log_prob_ids.dtype == np.int32
    assert np.array_equal(back.top_log_probs, top) and np.array_equal(back.top_log_prob_ids, top_ids)
    # K survives an update without tokens ([0, K]), and is 0 when not asked
    empty = StepOutput(
        b"", np.zeros(0, np.int32), b"stop", 9, np.zeros(0, np.float32), b"h",
        top_log_probs=np.zeros((0, 4), np.float32), top_log_prob_ids=np.zeros((0, 4), np.int32),
    )  # fmt: skip
    assert StepOutput.from_array(empty.to_array()).top_log_probs.shape == (0, 4)
    plain = StepOutput.from_array(
        StepOutput(b"", np.zeros(0, np.int32), b"", 1, np.zeros(0, np.float32), b"r").to_array()
    )
    assert plain.top_log_probs.shape == (0, 0) and plain.sequence_index == 0
    with pytest.raises(MalformedStepOutput):  # K rows of a log-prob'd token cut off
        StepOutput.from_array(step.to_array()[:, : -len(b"abch") - 4])
    with pytest.raises(ValueError, match="must be"):  # a row per log-prob'd token, or none
        StepOutput(b"", np.zeros(1, np.int32), b"", 1, np.zeros(1, np.float32), b"r",
                   top_log_probs=top, top_log_prob_ids=top_ids).to_array()  # fmt: skip


def test_batch_index_perf_metrics_and_logits_round_trip():
    rng = np.random.default_rng(0)
    ctx, gen = rng.standard_normal((5, 11), np.float32), rng.standard_normal((2, 11), np.float32)
    perf = (3, 4, 3, 10**15, 10**15 + 1, 2**62, 2**63 - 1)
    step = StepOutput(
        b"ab", np.array([1, 2], np.int32), b"", 5, np.zeros(0, np.float32), b"h",
        batch_index=2, perf_metrics=perf, context_logits=ctx, generation_logits=gen,
    )  # fmt: skip
    back = StepOutput.from_array(step.to_array())
    assert back.batch_index == 2 and back.perf_metrics == perf and back.text == b"ab"
    assert np.array_equal(back.context_logits, ctx) and np.array_equal(back.generation_logits, gen)
    only_gen = StepOutput.from_array(
        StepOutput(
            b"", np.zeros(0, np.int32), b"", 1, np.zeros(0, np.float32), b"h", generation_logits=gen
        ).to_array()
    )
    assert only_gen.context_logits.shape == (0, 11) and np.array_equal(only_gen.generation_logits, gen)
    with pytest.raises(ValueError, match="one vocab"):
        StepOutput(b"", np.zeros(0, np.int32), b"", 1, np.zeros(0, np.float32), b"h",
                   context_logits=ctx, generation_logits=gen[:, :3]).to_array()  # fmt: skip
