"""Triton adapter: the LLM step's per-step outputs -> the public outputs (TensorRT-LLM names).

Stateless. The text delta arrives already exact from the engine, which detokenizes
incrementally anyway to match stop strings on text; here it only takes its public name, so a
request's chunks concatenate to exactly the non-streamed text. One instance keeps chunk order.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import maverick_env  # noqa: E402, F401  (first: the project's site-packages)
import triton_python_backend_utils as pb_utils  # noqa: E402

RENAMES = {
    "text": "text_output",
    "token_ids": "output_token_ids",
    "finish_reason": "finish_reason",
    "num_input_tokens": "num_input_tokens",
    "num_output_tokens": "num_output_tokens",
    "log_probs": "output_log_probs",
}


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = [
                pb_utils.Tensor(public, pb_utils.get_input_tensor_by_name(request, name).as_numpy())
                for name, public in RENAMES.items()
            ]
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
