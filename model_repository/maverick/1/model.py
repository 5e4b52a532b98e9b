"""Triton adapter for the engine: lifecycle and threads only.

The engine runs in its own process (EngineClient: its own interpreter, so the engine loop never
waits for the GIL while this stub builds and sends responses); this model runs an asyncio loop on
a thread, where one coroutine per request streams the engine's outputs back through the request's
response sender. execute() only schedules those coroutines. Every request ends with exactly one FINAL flag,
also when it fails or is cancelled. The engine request is aborted (its KV blocks freed) when
Triton marks the request cancelled (a direct call), when a response cannot be delivered, or when
an `abort` request names it (how postprocessing passes on a cancelled ensemble request, and how a
client can stop a request by its id). An engine process that dies is started again
(maverick/serving/supervisor.py); meanwhile requests fail with UNAVAILABLE.
"""

import asyncio
import contextlib
import json
import threading
import uuid

import maverick_env  # noqa: F401  (first: puts the project's packages on the path)
import numpy as np
import triton_python_backend_utils as pb_utils
from maverick_metrics import EngineMetrics, instance_labels

from maverick.engine.engine_client import EngineClient
from maverick.engine.errors import EngineDeadError, EngineOverloadedError, RequestError
from maverick.serving.engine_args import Instance, engine_config
from maverick.serving.flow_control import FlowControlledStream
from maverick.serving.model_dir import project_root
from maverick.serving.priority import yield_to_engine
from maverick.serving.request import InvalidRequest, fit_max_tokens, from_tensors
from maverick.serving.response_window import NO_ACK, AckBoard
from maverick.serving.step_output import StepOutput
from maverick.serving.supervisor import SupervisedEngine

INPUTS = ("input_ids", "pixel_values", "image_tiles", "request")
# Triton's cancelled flag is only set for direct calls (the ensemble passes cancellation on through
# postprocessing's `abort`); each poll is a round trip to tritonserver, so not too often.
CANCEL_POLL_S = 0.5
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
        # which instance this is picks its GPU set (KIND_MODEL: Triton gives it no device)
        instance = Instance.from_args(args, config)
        config = engine_config(params, project_root(args["model_repository"]), instance)
        # a dead engine process is started again (Triton cannot be told the model is not ready)
        self.engine = SupervisedEngine(lambda: EngineClient(config))
        # the engine process keeps the priority it started with; this relay steps below it
        yield_to_engine()
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(
            target=self.loop.run_forever, name="maverick-requests", daemon=True
        )
        self.loop_thread.start()
        self.metrics = EngineMetrics(self.engine, instance_labels(args))
        self.acks = AckBoard.create()  # postprocessing acknowledges streamed responses here
        self.in_flight: set[asyncio.Future] = set()
        self.live: dict[str, str] = {}  # engine request id -> Triton request id (request-loop thread only)

    def execute(self, requests):
        for request in requests:
            future = asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
            self.in_flight.add(future)
            future.add_done_callback(self.in_flight.discard)
        return None

    def finalize(self):
        for future in list(self.in_flight):
            future.cancel()
        self.engine.shutdown()
        self.metrics.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(timeout=5)
        self.acks.close()

    # -- one request ---------------------------------------------------------------------------
    async def _serve(self, request):
        sender = request.get_response_sender()
        abort = pb_utils.get_input_tensor_by_name(request, "abort")
        if abort is not None:
            return self._abort(bytes(abort.as_numpy().reshape(-1)[0]).decode(errors="replace"), sender)
        try:
            tensors = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    raise InvalidRequest(f"input {name} is required (or abort)")
                tensors[name] = tensor.as_numpy()
            req = fit_max_tokens(from_tensors(tensors), self.engine.max_model_len)
        except InvalidRequest as e:
            return _send_error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
        request_id = f"{request.request_id() or 'req'}-{uuid.uuid4().hex[:12]}"
        self.live[request_id] = request.request_id()
        watcher = asyncio.ensure_future(self._watch(request, request_id))
        # through the ensemble, at most a few responses in flight past postprocessing; the rest
        # wait here, merged (maverick/serving/flow_control.py)
        flow = FlowControlledStream(
            self.acks.window() if req.options.stream and req.options.flow_control else None
        )
        text, ids, logprobs, last = [req.options.echo_text or ""], [], [], None
        returns = req.returns  # the optional public outputs asked for, once per request
        try:
            stream = self.engine.generate(request_id, req.prompt, req.params)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    self.metrics.observe(out)
                    last = out
                    if req.options.stream:
                        offered = flow.offer(out)
                        if offered is None:
                            continue  # held: this stream has enough responses in flight
                        update, ack = offered
                        response = _response(
                            request_id,
                            text[0] + update.text,
                            update.token_ids,
                            update,
                            update.logprobs or [],
                            returns,
                            ack,
                        )
                        _send(sender, response, update.finished)
                        text[0] = ""
                    else:
                        text.append(out.text)
                        ids += out.token_ids
                        logprobs += out.logprobs or []
            if not req.options.stream:
                _send(sender, _response(request_id, "".join(text), ids, last, logprobs, returns), True)
        except (RequestError, InvalidRequest) as e:
            _send_error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
        except EngineOverloadedError as e:
            _send_error(sender, str(e), pb_utils.TritonError.UNAVAILABLE)
        except EngineDeadError as e:
            _send_error(sender, str(e), pb_utils.TritonError.UNAVAILABLE)
        except _Undeliverable:
            pass  # the client is gone; aclosing() has aborted the engine request
        except Exception as e:  # noqa: BLE001 - this request fails, the model keeps serving
            _send_error(sender, f"internal error: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
        finally:
            watcher.cancel()
            self.live.pop(request_id, None)
            flow.close()

    def _abort(self, target: str, sender) -> None:
        """Stop the engine requests named by their engine id or their Triton request id."""
        for engine_id, triton_id in list(self.live.items()):
            if target in (engine_id, triton_id):
                self.engine.abort(engine_id)
        with contextlib.suppress(Exception):
            sender.send(flags=FINAL)

    async def _watch(self, request, request_id):
        """Abort the engine request once Triton marks the request cancelled (client gone)."""
        while not request.is_cancelled():
            await asyncio.sleep(CANCEL_POLL_S)
        self.engine.abort(request_id)


class _Undeliverable(Exception):
    """A response could not be sent: the request was cancelled or its client disconnected."""


def _response(request_id, text, token_ids, out, logprobs, returns, ack=NO_ACK):
    finish = (out.finish_reason or "") if out is not None and out.finished else ""
    error = out.error if out is not None else None
    if error:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(error, pb_utils.TritonError.INTERNAL))
    step = StepOutput(
        text=text.encode(),
        token_ids=np.asarray(token_ids, dtype=np.int32),
        finish_reason=finish.encode(),
        num_input_tokens=out.num_prompt_tokens if out else 0,
        log_probs=np.asarray([lp for lp in logprobs if lp is not None], dtype=np.float32),
        llm_request_id=request_id.encode(),
        returns=returns,
        ack=ack,
    )
    return pb_utils.InferenceResponse([pb_utils.Tensor("step", step.to_array())])


def _send(sender, response, final: bool):
    try:
        sender.send(response, flags=FINAL if final else 0)
    except Exception as e:  # noqa: BLE001 - e.g. the request was cancelled meanwhile
        raise _Undeliverable(str(e)) from None


def _send_error(sender, message, code):
    with contextlib.suppress(Exception):
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
