"""Triton adapter for the engine: lifecycle and threads only.

The engine runs in its own process (EngineClient: its own interpreter, so the engine loop never
waits for the GIL while this stub builds and sends responses); this model runs an asyncio loop on
a thread, where one coroutine per request streams the engine's outputs back through the request's
response sender. execute() only schedules those coroutines. Every request ends with exactly one
FINAL flag, also when it fails, is cancelled, or meets a bug (INTERNAL, logged with its request id).

The engine request is aborted (its KV blocks freed) when Triton marks the request cancelled (a
direct call), when a response cannot be delivered, or when an `abort` request names its abort
handle: a secret made per request and given only to the request's own responses (the `step`
output), which is how postprocessing passes on a cancelled ensemble request. Triton tells only
postprocessing that an ensemble request was cancelled, so a flow-controlled request (the
ensemble's) that has been silent for HEARTBEAT_S sends postprocessing a heartbeat: a non-streamed
request, or one still waiting for its first token, stops within about a second of its client
leaving. An engine process that dies is started again (maverick/serving/supervisor.py);
meanwhile requests fail with UNAVAILABLE.
"""

import asyncio
import contextlib
import dataclasses
import json
import secrets
import threading
import traceback
import uuid

import maverick_env  # noqa: F401  (first: puts the project's packages on the path)
import numpy as np
import triton_python_backend_utils as pb_utils
from maverick_metrics import EngineMetrics, instance_labels

from maverick.engine.api import RequestOutput
from maverick.engine.engine_client import EngineClient
from maverick.engine.errors import EngineDeadError, EngineOverloadedError, RequestError
from maverick.serving.batch_streams import merge_streams
from maverick.serving.engine_args import Instance, engine_config
from maverick.serving.flow_control import FlowControlledStream
from maverick.serving.model_dir import project_root
from maverick.serving.priority import yield_to_engine
from maverick.serving.request import InvalidRequest, fit_max_tokens
from maverick.serving.request_tensors import from_tensors
from maverick.serving.response_window import NO_ACK, AckBoard
from maverick.serving.step_output import RETURN_PERF_METRICS, StepOutput
from maverick.serving.supervisor import SupervisedEngine

INPUTS = ("input_ids", "pixel_values", "image_tiles", "request")
# Each request's watcher wakes this often: it sends heartbeats (maverick/serving/flow_control.py)
# and, every CANCEL_POLL_TICKS wake-ups, asks Triton whether the request was cancelled (each poll
# is a round trip to tritonserver, so not too often; set for direct calls only).
WATCH_S = 0.25
CANCEL_POLL_TICKS = 2
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
        # abort handle -> its engine request ids (a batched request's several; request-loop thread only)
        self.handles: dict[str, list[str]] = {}

    def execute(self, requests):
        for request in requests:
            try:
                future = asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
            except Exception as e:  # noqa: BLE001 - e.g. the loop stopped (unloading): this request fails
                _Reply(request).fail(e)
                continue
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
        reply = _Reply(request)
        try:
            abort = pb_utils.get_input_tensor_by_name(request, "abort")
            if abort is not None:
                self._abort(request, abort, reply)
            else:
                await self._generate(request, reply)
        except asyncio.CancelledError:
            reply.error("the model is unloading", pb_utils.TritonError.UNAVAILABLE)
            raise
        except Exception as e:  # noqa: BLE001 - a bug meets one request: it fails, the model serves on
            reply.fail(e)
        finally:
            reply.end()

    async def _generate(self, request, reply):
        try:
            tensors = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is None:
                    raise InvalidRequest(f"input {name} is required (or abort)")
                tensors[name] = tensor.as_numpy()
            reqs = [fit_max_tokens(r, self.engine.max_model_len) for r in from_tensors(tensors)]
        except InvalidRequest as e:
            return reply.error(str(e), pb_utils.TritonError.INVALID_ARG)
        # a batched request (TensorRT-LLM's: k prompts in one) is k engine requests, one stream
        base = f"{reply.triton_id or 'req'}-{uuid.uuid4().hex[:12]}"
        request_ids = [base] if len(reqs) == 1 else [f"{base}-{b}" for b in range(len(reqs))]
        batch_of = {rid: b for b, rid in enumerate(request_ids)}
        handle = secrets.token_urlsafe(24)
        self.handles[handle] = request_ids
        options = reqs[0].options  # stream and flow control: the same for every prompt of a batch
        # through the ensemble, at most a few responses in flight past postprocessing; the rest
        # wait here, merged (maverick/serving/flow_control.py); and heartbeats while silent
        flow = FlowControlledStream(self.acks.window() if options.flow_control else None)
        watcher = asyncio.ensure_future(
            self._watch(request, request_ids, reply, handle, flow if options.flow_control else None)
        )
        # each (prompt, choice)'s first response carries its echo; the last response of all the FINAL
        unsent_echo = {(b, i) for b, r in enumerate(reqs) if r.options.echo_text for i in range(r.params.n)}
        gathered: dict[tuple[int, int], _Gathered] = {}
        unfinished = sum(r.params.n for r in reqs)
        shapes = [
            _Shape(handle.encode(), r.returns, r.params.top_logprobs, r.options.batch_index) for r in reqs
        ]
        try:
            pairs = zip(request_ids, reqs, strict=True)
            streams = [self.engine.generate(rid, r.prompt, r.params) for rid, r in pairs]
            async with contextlib.aclosing(merge_streams(streams)) as outputs:
                async for out in outputs:
                    self.metrics.observe(out)
                    if out.error:
                        return reply.error(out.error, pb_utils.TritonError.INTERNAL)  # aborts the rest
                    key = batch_of[out.request_id], out.index
                    if options.stream:
                        offered = flow.offer(out)
                        if offered is None:
                            continue  # held: this stream has enough responses in flight
                        update, ack = offered
                    else:
                        gathered.setdefault(key, _Gathered()).add(out)
                        if not out.finished:
                            continue
                        update, ack = gathered.pop(key).whole(), NO_ACK
                    unfinished -= update.finished
                    prefix = reqs[key[0]].options.echo_text if key in unsent_echo else ""
                    unsent_echo.discard(key)
                    reply.send(shapes[key[0]].response(update, prefix, ack), unfinished == 0)
        except (RequestError, InvalidRequest) as e:
            reply.error(str(e), pb_utils.TritonError.INVALID_ARG)
        except EngineOverloadedError as e:
            reply.error(str(e), pb_utils.TritonError.UNAVAILABLE)
        except EngineDeadError as e:
            reply.error(str(e), pb_utils.TritonError.UNAVAILABLE)
        except _Undeliverable:
            reply.finish()  # the client is gone; aclosing() has aborted the engine request
        finally:
            watcher.cancel()
            self.handles.pop(handle, None)
            flow.close()

    def _abort(self, request, tensor, reply) -> None:
        """Stop the engine request whose abort handle this is; an empty or unknown one is refused.
        Only the handle counts: Triton request ids are the client's to choose (or empty)."""
        if any(pb_utils.get_input_tensor_by_name(request, name) is not None for name in INPUTS):
            return reply.error(
                "a request carries either abort or the generate inputs", pb_utils.TritonError.INVALID_ARG
            )
        values = tensor.as_numpy().reshape(-1)
        if values.size != 1:
            return reply.error(
                f"abort must hold one handle, got {values.size}", pb_utils.TritonError.INVALID_ARG
            )
        handle = bytes(values[0]).decode(errors="replace")
        if not handle:
            return reply.error(
                "abort is empty: it takes a running request's abort handle", pb_utils.TritonError.INVALID_ARG
            )
        request_ids = self.handles.get(handle)
        if request_ids is None:
            return reply.error("no running request has this abort handle", pb_utils.TritonError.NOT_FOUND)
        for request_id in request_ids:
            self.engine.abort(request_id)
        reply.finish()

    async def _watch(self, request, request_ids, reply, handle, flow):
        """Abort the engine request once Triton marks the request cancelled (a direct call whose
        client left); send the heartbeats of a flow-controlled one (`flow`; the ensemble's)."""
        try:
            tick = 0
            while True:
                await asyncio.sleep(WATCH_S)
                if reply.closed:
                    return  # answered; the request's coroutine is winding up
                tick += 1
                if flow is not None and (ack := flow.heartbeat()) is not None:
                    beat = StepOutput.beat(handle.encode(), ack)
                    reply.send(pb_utils.InferenceResponse([pb_utils.Tensor("step", beat.to_array())]), False)
                if tick % CANCEL_POLL_TICKS == 0 and request.is_cancelled():
                    break
        except _Undeliverable:
            pass
        except Exception as e:  # noqa: BLE001 - the request itself goes on; say why it cannot be stopped
            reply.log(f"watching the request failed: {type(e).__name__}: {e}")
            return
        for request_id in request_ids:
            self.engine.abort(request_id)


class _Undeliverable(Exception):
    """A response could not be sent: the request was cancelled or its client disconnected."""


class _Gathered:
    """One choice's updates of a non-streamed request, gathered for its one response (lists grown in
    place: merging updates pairwise would copy the answer so far at every token)."""

    def __init__(self):
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_token_ids: list[list[int]] = []
        self.top_logprobs: list[list[float]] = []
        self.token_times: list[float] = []
        self.generation_logits: list[np.ndarray] = []
        self.context_logits: np.ndarray | None = None
        self.last: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        self.top_token_ids += out.top_token_ids or []
        self.top_logprobs += out.top_logprobs or []
        self.token_times += out.token_times
        if out.generation_logits is not None:
            self.generation_logits.append(out.generation_logits)
        if out.context_logits is not None:
            self.context_logits = out.context_logits
        self.last = out

    def whole(self) -> RequestOutput:
        """The choice's answer as one update (state from its last)."""
        return dataclasses.replace(
            self.last,
            text="".join(self.text),
            token_ids=self.token_ids,
            logprobs=self.logprobs,
            top_token_ids=self.top_token_ids,
            top_logprobs=self.top_logprobs,
            token_times=self.token_times,
            context_logits=self.context_logits,
            generation_logits=np.concatenate(self.generation_logits) if self.generation_logits else None,
        )


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What every `step` of one request carries besides its update."""

    handle: bytes  # the abort handle
    returns: int  # the optional public outputs asked for (step_output.RETURN_*)
    top_logprobs: int  # K: top log-probs per token
    batch_index: int = 0  # the prompt's place in a batched request

    def response(self, out: RequestOutput, prefix: str = "", ack=NO_ACK):
        k = self.top_logprobs
        top = {}
        if self.returns & RETURN_PERF_METRICS:
            top["perf_metrics"] = _perf_metrics(out)
        if out.context_logits is not None:
            top["context_logits"] = out.context_logits
        if out.generation_logits is not None:
            top["generation_logits"] = out.generation_logits
        if k:  # [m, K]: one row per token of this update
            top["top_log_probs"] = np.asarray(out.top_logprobs or [], dtype=np.float32).reshape(-1, k)
            top["top_log_prob_ids"] = np.asarray(out.top_token_ids or [], dtype=np.int32).reshape(-1, k)
        step = StepOutput(
            text=(prefix + out.text).encode(),
            token_ids=np.asarray(out.token_ids, dtype=np.int32),
            finish_reason=(out.finish_reason or "").encode() if out.finished else b"",
            num_input_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            log_probs=np.asarray(out.logprobs or [], dtype=np.float32),
            abort_handle=self.handle,
            returns=self.returns,
            ack=ack,
            sequence_index=out.index,
            cum_log_prob=out.cumulative_logprob or 0.0,
            batch_index=self.batch_index,
            **top,
        )
        return pb_utils.InferenceResponse([pb_utils.Tensor("step", step.to_array())])


def _perf_metrics(out: RequestOutput) -> tuple[int, ...]:
    """step_output.PERF_METRICS of a choice's update: its KV blocks (TensorRT-LLM counts the
    allocated ones, reused not included, as its total) and its times in ns of CLOCK_MONOTONIC
    (the engine's time.monotonic(); 0 where not reached yet)."""

    def ns(t: float | None) -> int:
        return 0 if t is None else round(t * 1e9)

    return (
        out.num_new_blocks,
        out.num_reused_blocks,
        out.num_new_blocks,
        ns(out.arrival_time),
        ns(out.first_scheduled_time),
        ns(out.first_token_time),
        ns(out.last_token_time),
    )


class _Reply:
    """One request's response sender, which sends exactly one FINAL whatever happens."""

    def __init__(self, request):
        self.sender = request.get_response_sender()
        self.triton_id = request.request_id()
        self.closed = False

    def send(self, response, final: bool) -> None:
        try:
            self.sender.send(response, flags=FINAL if final else 0)
        except Exception as e:  # noqa: BLE001 - e.g. the request was cancelled meanwhile
            raise _Undeliverable(str(e)) from None
        self.closed = self.closed or final

    def error(self, message: str, code) -> None:
        self._final(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)))

    def finish(self) -> None:
        """The FINAL flag without a response (an abort's answer)."""
        self._final(None)

    def fail(self, e: BaseException) -> None:
        """A bug: logged with its traceback, and the request fails with INTERNAL."""
        self.log(f"internal error: {''.join(traceback.format_exception(e)).rstrip()}")
        self.error(f"internal error: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)

    def end(self) -> None:
        """Safety net: a request whose handling ended without a FINAL fails rather than hangs."""
        if not self.closed:
            self.log("ended without a final response")
            self.error("internal error: the request ended without an answer", pb_utils.TritonError.INTERNAL)

    def log(self, message: str) -> None:
        with contextlib.suppress(Exception):
            pb_utils.Logger.log_error(f"maverick: request {self.triton_id!r}: {message}")

    def _final(self, response) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):  # the client may be gone; the FINAL is owed all the same
            if response is None:
                self.sender.send(flags=FINAL)
            else:
                self.sender.send(response, flags=FINAL)
