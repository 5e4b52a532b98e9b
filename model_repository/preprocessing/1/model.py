"""Triton adapter: request inputs -> prompt ids, image tiles and the request JSON (see
maverick.serving.request). A bad request fails alone with INVALID_ARG."""

import dataclasses
import json

import maverick_env  # noqa: F401  (first: puts the project's packages on the path)
import triton_python_backend_utils as pb_utils

from maverick.serving.model_dir import generation_defaults, resolve_model_dir
from maverick.serving.priority import yield_to_engine
from maverick.serving.request import KNOWN_INPUTS, InvalidRequest, parse_request, to_tensors
from maverick.tokenizer import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        yield_to_engine()  # per-response work waits for the engine loop, not the reverse
        config = json.loads(args["model_config"])
        model_dir = resolve_model_dir(config, args["model_repository"])
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.defaults = generation_defaults(model_dir)

    def execute(self, requests):
        responses = []
        for request in requests:
            inputs = {}
            for name in KNOWN_INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            try:
                req = parse_request(inputs, self.tokenizer, self.defaults)
                # the ensemble sends the step's responses through postprocessing, which
                # acknowledges them: the step may hold a stream's tokens while it lags behind
                req = dataclasses.replace(req, options=dataclasses.replace(req.options, flow_control=True))
                tensors = to_tensors(req)
            except InvalidRequest as e:
                error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()]))
        return responses
