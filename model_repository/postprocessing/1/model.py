"""Triton adapter: the LLM step's per-step outputs -> the public outputs (TensorRT-LLM names).

The `maverick` step sends each update as one packed UINT8 tensor (maverick/serving/step_output.py:
one tensor per response is what is cheap to pass through the ensemble); here it becomes the public
tensors. The text delta arrives already exact from the engine, which detokenizes incrementally
anyway to match stop strings on text, so a request's chunks concatenate to exactly the
non-streamed text. One instance keeps chunk order.

Flow control: each response is acknowledged to the `maverick` step that sent it (its update
names the slot), which keeps at most a few responses per stream in flight past this model
and merges the rest (maverick/serving/response_window.py): one instance without a batcher is the
ensemble's narrowest point, and this keeps a queue from building up in front of it.

Cancellation: Triton's ensemble checks for a cancelled request only between steps, so the running
`maverick` step never learns that its client left; the next postprocessing request it triggers
arrives here cancelled, though. That request carries the engine request's secret abort handle,
and this model tells `maverick` to abort it, which frees its KV blocks within one engine step.
A silent request (non-streamed, or waiting for its first token) sends heartbeats for this: a
heartbeat is answered with the FINAL flag and no response, which is why this model is decoupled
(a non-decoupled one owes every request a response, and the client would get each one).

Every request ends with exactly one FINAL: a bug fails that request with INTERNAL, logged.
"""

import contextlib
import traceback

import maverick_env  # noqa: F401  (first: puts the project's packages on the path)
import numpy as np
import triton_python_backend_utils as pb_utils

from maverick.serving.priority import yield_to_engine
from maverick.serving.response_window import Acknowledger
from maverick.serving.step_output import (
    PERF_METRICS,
    RETURN_BATCH_INDEX,
    RETURN_LOG_PROBS,
    RETURN_NUM_INPUT_TOKENS,
    RETURN_NUM_OUTPUT_TOKENS,
    RETURN_PERF_METRICS,
    RETURN_SEQUENCE_INDEX,
    STREAMED,
    MalformedStepOutput,
    StepOutput,
)

# TensorRT-LLM's perf metrics: the engine's, then its speculative-decoding ones (none here: 0)
_PERF_DTYPES = dict(zip(PERF_METRICS, [np.int32] * 3 + [np.int64] * 4, strict=True))
_NO_DRAFTS = {
    "acceptance_rate": np.zeros((1, 1), np.float32),
    "total_accepted_draft_tokens": np.zeros((1, 1), np.int32),
    "total_draft_tokens": np.zeros((1, 1), np.int32),
}

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        yield_to_engine()  # per-response work waits for the engine loop, not the reverse
        self.acknowledge = Acknowledger()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            step = None
            try:
                step = StepOutput.from_array(pb_utils.get_input_tensor_by_name(request, "step").as_numpy())
                response = self._handle(request, step)
            except MalformedStepOutput as e:
                response = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                )
            except Exception as e:  # noqa: BLE001 - a bug meets one request: it fails, the model serves on
                response = _internal_error(request, e)
                if step is not None and not step.finish_reason:
                    with contextlib.suppress(Exception):  # its client gets an error: stop its tokens too
                        _abort(step.abort_handle)
            with contextlib.suppress(Exception):  # the client may be gone
                if response is None:
                    sender.send(flags=FINAL)
                else:
                    sender.send(response, flags=FINAL)
        return None

    def _handle(self, request, step: StepOutput):
        """The public response to one `step`, or None for a heartbeat."""
        # handled: the maverick step may send this stream's next response
        self.acknowledge(step.ack)
        if request.is_cancelled() and not step.finish_reason:
            # Answer normally all the same: an error here would leave the ensemble waiting for
            # the decoupled step's final response forever (it counts the request in flight).
            _abort(step.abort_handle)
        if step.heartbeat:
            return None
        outputs = {  # TensorRT-LLM's names, and its shapes: [beams] text, the rest [1, ...]
            "text_output": np.array([step.text], dtype=object),
            "output_token_ids": step.token_ids.reshape(1, -1),
        }
        # The rest only where it says something or was asked for: each tensor costs every
        # streamed response a copy at each hop (the ensemble omits an output a step left out).
        if step.finish_reason:
            outputs["finish_reason"] = np.array([[step.finish_reason]], dtype=object)
        if step.returns & RETURN_NUM_INPUT_TOKENS:
            outputs["num_input_tokens"] = np.array([[step.num_input_tokens]], dtype=np.int32)
            outputs["num_cached_tokens"] = np.array([[step.num_cached_tokens]], dtype=np.int32)
        if step.returns & RETURN_NUM_OUTPUT_TOKENS:
            outputs["num_output_tokens"] = np.array([[step.token_ids.size]], dtype=np.int32)
        if step.returns & RETURN_LOG_PROBS:  # [1, beams, tokens] and [1, beams]
            outputs["output_log_probs"] = step.log_probs.reshape(1, 1, -1)
            outputs["cum_log_probs"] = np.array([[step.cum_log_prob]], dtype=np.float32)
        if step.top_log_probs.shape[1]:  # top_log_probs = K > 0: [1, tokens, K]
            outputs["output_top_log_probs"] = step.top_log_probs[None]
            outputs["output_top_log_prob_ids"] = step.top_log_prob_ids[None]
        if step.returns & RETURN_SEQUENCE_INDEX:  # num_return_sequences > 1: which choice
            outputs["sequence_index"] = np.array([[step.sequence_index]], dtype=np.int32)
        if step.returns & RETURN_BATCH_INDEX:  # a batched request: which prompt
            outputs["batch_index"] = np.array([[step.batch_index]], dtype=np.int32)
        if step.returns & RETURN_PERF_METRICS:
            for (name, dtype), value in zip(_PERF_DTYPES.items(), step.perf_metrics, strict=True):
                outputs[name] = np.array([[value]], dtype=dtype)
            outputs.update(_NO_DRAFTS)
        if step.context_logits.size:  # [1, prompt, vocab], in the choice's first response
            outputs["context_logits"] = step.context_logits[None]
        if step.generation_logits.size:  # TensorRT-LLM's layouts: streamed [1, tokens, beams, vocab]
            gen = step.generation_logits  # [tokens, vocab]; whole [1, beams, tokens, vocab]
            outputs["generation_logits"] = gen[None, :, None] if step.returns & STREAMED else gen[None, None]
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])


def _abort(abort_handle: bytes) -> None:
    """Ask the decoupled `maverick` model to stop the engine request (BLS; it answers one FINAL,
    or an error if the request has ended meanwhile)."""
    abort = pb_utils.Tensor("abort", np.array([[abort_handle]], dtype=object))
    request = pb_utils.InferenceRequest(model_name="maverick", inputs=[abort], requested_output_names=[])
    for _ in request.exec(decoupled=True):
        pass


def _internal_error(request, e: Exception):
    with contextlib.suppress(Exception):
        detail = "".join(traceback.format_exception(e)).rstrip()
        pb_utils.Logger.log_error(f"postprocessing: request {request.request_id()!r}: {detail}")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(f"internal error: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
    )
