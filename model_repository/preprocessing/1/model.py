"""Triton adapter: request inputs -> prompt ids, image tiles and the request JSON (see
maverick.serving.request). A bad request fails alone with INVALID_ARG.

execute() only reads each request's inputs and hands it to a worker thread, which sends its one
response through the request's response sender: a request with large images to decode does not
hold back the small ones that arrive behind it. Heavy requests (images, or much text) have workers
of their own, so a small request never waits behind them (pixels are decoded, and text tokenized,
with the GIL released)."""

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import maverick_env  # noqa: F401  (first: puts the project's packages on the path)
import numpy as np
import triton_python_backend_utils as pb_utils

from maverick.serving.model_dir import (
    PREPROCESSING_PARAMETERS,
    context_length,
    generation_defaults,
    parameters,
    resolve_model_dir,
)
from maverick.serving.priority import yield_to_engine
from maverick.serving.request import KNOWN_INPUTS, InvalidRequest, parse_batch
from maverick.serving.request_tensors import to_tensors
from maverick.tokenizer import Tokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
HEAVY_TEXT_BYTES = 64 << 10  # prompt text (data URLs in messages included) worth a heavy worker
log = logging.getLogger("maverick.preprocessing")


class TritonPythonModel:
    def initialize(self, args):
        yield_to_engine()  # per-response work waits for the engine loop, not the reverse
        config = json.loads(args["model_config"])
        params = parameters(config, PREPROCESSING_PARAMETERS)
        model_dir = resolve_model_dir(config, args["model_repository"], PREPROCESSING_PARAMETERS)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.defaults = generation_defaults(model_dir)
        self.max_model_len = context_length(model_dir, params.get("max_model_len"))
        # threads started later inherit this thread's niceness (maverick/serving/priority.py)
        self.light = ThreadPoolExecutor(_workers(params, "light_workers"), "preprocessing-light")
        self.heavy = ThreadPoolExecutor(_workers(params, "heavy_workers"), "preprocessing-heavy")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = {}
                for name in KNOWN_INPUTS:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:  # a copy: the request's tensors go when execute() returns
                        inputs[name] = np.array(tensor.as_numpy(), copy=True)
                pool = self.heavy if _is_heavy(inputs) else self.light
                pool.submit(self._respond, sender, inputs, request.request_id())
            except Exception as e:  # noqa: BLE001 - e.g. the pools shut down while unloading
                log.exception("preprocessing could not take request %r", request.request_id())
                _send(
                    sender,
                    _error(f"preprocessing failed: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL),
                )
        return None

    def finalize(self):
        self.light.shutdown(wait=True)
        self.heavy.shutdown(wait=True)

    def _respond(self, sender, inputs, request_id):
        try:
            # a batched request (TensorRT-LLM's) is several prompts, each parsed alone
            reqs = parse_batch(inputs, self.tokenizer, self.defaults, self.max_model_len)
            # the ensemble sends the step's responses through postprocessing, which
            # acknowledges them: the step may hold a stream's tokens while it lags behind
            reqs = [
                dataclasses.replace(r, options=dataclasses.replace(r.options, flow_control=True))
                for r in reqs
            ]
            tensors = to_tensors(*reqs)
            response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()])
        except InvalidRequest as e:
            response = _error(str(e), pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            log.exception("preprocessing failed for request %r", request_id)
            response = _internal(e)
        _send(sender, response)


def _send(sender, response):
    try:
        sender.send(response, flags=FINAL)
    except Exception:  # noqa: BLE001 - the request is gone (cancelled); nothing to answer
        log.warning("a preprocessing response could not be sent", exc_info=True)


def _is_heavy(inputs):
    """Images to decode, or much text to tokenize."""
    if "images" in inputs:
        return True
    names = ("text_input", "messages", "system_prompt", "tools")
    size = sum(len(v) for name in names if name in inputs for v in inputs[name].reshape(-1))
    return size > HEAVY_TEXT_BYTES


def _internal(e: Exception):
    return _error(f"preprocessing failed: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def _workers(params, key):
    raw = params.get(key) or "2"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"preprocessing: parameter {key} must be a whole number >= 1, got {raw!r}")
    return int(raw)
