"""A request between the pipeline steps (maverick/serving/request.py): the response options a
client sets survive preprocessing's tensors to the `maverick` step, and say which optional outputs
the step's updates carry."""

from __future__ import annotations

import pytest

from maverick.serving.request import from_tensors, numpy_inputs, parse_request, to_tensors
from maverick.serving.step_output import RETURN_LOG_PROBS, RETURN_NUM_INPUT_TOKENS, RETURN_NUM_OUTPUT_TOKENS
from maverick.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt):
    return Tokenizer.from_dir(tiny_ckpt)


@pytest.mark.parametrize(
    "flags, bits",
    [
        ({}, 0),
        ({"return_num_input_tokens": True}, RETURN_NUM_INPUT_TOKENS),
        (
            {"return_num_output_tokens": True, "return_log_probs": True},
            RETURN_NUM_OUTPUT_TOKENS | RETURN_LOG_PROBS,
        ),
        ({"return_num_input_tokens": False, "return_num_output_tokens": False, "return_log_probs": False}, 0),
        (
            {"return_num_input_tokens": True, "return_num_output_tokens": True, "return_log_probs": True},
            RETURN_NUM_INPUT_TOKENS | RETURN_NUM_OUTPUT_TOKENS | RETURN_LOG_PROBS,
        ),
    ],
)
def test_optional_outputs_asked_for_reach_the_step(tokenizer, flags, bits):
    req = parse_request(
        numpy_inputs({"text_input": "hi", "max_tokens": 3, "stream": True, **flags}), tokenizer
    )
    assert req.returns == bits
    back = from_tensors(to_tensors(req))
    assert back.returns == bits and back.options == req.options and back.params == req.params
    assert back.prompt.token_ids == req.prompt.token_ids
