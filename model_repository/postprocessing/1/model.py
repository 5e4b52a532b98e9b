"""Triton adapter: the LLM step's per-step outputs -> the public outputs (TensorRT-LLM names).

The text delta arrives already exact from the engine, which detokenizes
incrementally anyway to match stop strings on text; here it only takes its public name (and type:
the `maverick` step sends strings as UTF-8 bytes, which are cheap for it to send), so a request's
chunks concatenate to exactly the non-streamed text. One instance keeps chunk order.

Flow control: each response is acknowledged to the `maverick` step that sent it (its `ack`
tensor names the slot), which keeps at most a few responses per stream in flight past this model
and merges the rest (maverick/serving/response_window.py): one instance without a batcher is the
ensemble's narrowest point, and this keeps a queue from building up in front of it.

Cancellation: Triton's ensemble checks for a cancelled request only between steps, so the running
`maverick` step never learns that its client left; the next postprocessing request it triggers
arrives here cancelled, though. That request names the engine request (`llm_request_id`), and
this model tells `maverick` to abort it, which frees its KV blocks within one engine step.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import maverick_env  # noqa: E402, F401  (first: the project's site-packages)
import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from maverick.serving.response_window import Acknowledger  # noqa: E402

RENAMES = {  # maverick's output -> the public one (TensorRT-LLM's names)
    "token_ids": "output_token_ids",
    "num_input_tokens": "num_input_tokens",
    "num_output_tokens": "num_output_tokens",
    "log_probs": "output_log_probs",
}
STRINGS = {"text_utf8": "text_output", "finish_reason_utf8": "finish_reason"}  # UTF-8 bytes -> TYPE_STRING


class TritonPythonModel:
    def initialize(self, args):
        self.acknowledge = Acknowledger()

    def execute(self, requests):
        responses = []
        for request in requests:
            # handled: the maverick step may send this stream's next response
            self.acknowledge(pb_utils.get_input_tensor_by_name(request, "ack").as_numpy())
            if request.is_cancelled():
                # Answer normally all the same: an error here would leave the ensemble waiting for
                # the decoupled step's final response forever (it counts the request in flight).
                _abort(_string(request, "llm_request_id_utf8"))
            tensors = [
                pb_utils.Tensor(public, pb_utils.get_input_tensor_by_name(request, name).as_numpy())
                for name, public in RENAMES.items()
            ]
            tensors += [
                pb_utils.Tensor(public, np.array([[_string(request, name)]], dtype=object))
                for name, public in STRINGS.items()
            ]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses


def _string(request, name: str) -> bytes:
    return pb_utils.get_input_tensor_by_name(request, name).as_numpy().tobytes()


def _abort(llm_request_id: bytes) -> None:
    """Ask the decoupled `maverick` model to stop the engine request (BLS; it answers one FINAL)."""
    abort = pb_utils.Tensor("abort", np.array([[llm_request_id]], dtype=object))
    request = pb_utils.InferenceRequest(model_name="maverick", inputs=[abort], requested_output_names=[])
    for _ in request.exec(decoupled=True):
        pass
