"""Locust users that speak the server's real protocols, and the load shape.

    locust -f loadtest/locustfile.py --headless --workload-file W.json --records R.jsonl \\
        --host http://localhost:8000 --grpc-url localhost:8001 [--levels 1,2,4 --level-time 30] \\
        GrpcStreamUser HttpStreamUser

(`python -m loadtest` builds the workload, runs this, and reports.)

- GrpcStreamUser: tritonclient.grpc, one client and one bidirectional stream per user, every
  request on that stream; a stream the server broke is reopened for the next request.
- HttpStreamUser: POST /v2/models/ensemble/generate_stream, server-sent events; an error event
  after the 200 fails the request like an error status does.

Every request is reported to Locust as one request (its whole latency; a failure carries the
server's message) and written, with its LLM timings, as one JSON line to --records: TTFT (first
response with output tokens − send), end-to-end latency (last response − send), output and input
tokens (as the server counts them), and the load level when it was sent. The report computes
everything from these raw values.

Arrivals: a closed loop (each user sends its next request when the last one has come back), or
with --rate an open Poisson process of that many requests/s shared by the users (they are the pool
that sends them: an arrival finding every user busy goes out late, and its lateness is recorded).

Load shape: --levels 1,2,4,... holds each number of users for --level-time seconds (all users of
a level start at once); without --levels, --users for --run-time (Locust's own options).
"""

from __future__ import annotations

import base64
import itertools
import json
import sys
import time
import uuid
from pathlib import Path

import gevent
import grpc.experimental.gevent as grpc_gevent
import numpy as np
import requests
from gevent.queue import Empty, Queue
from locust import LoadTestShape, User, events, task

# Locust has monkey-patched the standard library by now (importing it does). gRPC's own threads
# must also yield to gevent, and that has to be set up before the first channel exists.
grpc_gevent.init_gevent()

import tritonclient.grpc as grpcclient  # noqa: E402  (after init_gevent)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Locust puts only loadtest/ on the path
from client.llm import MODEL, grpc_inputs  # noqa: E402
from loadtest import sse  # noqa: E402
from loadtest import workload as wl  # noqa: E402
from loadtest.sse import ServerError  # noqa: E402


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--workload-file", required=True, help="written by loadtest.workload")
    parser.add_argument("--records", required=True, help="JSON lines, one per request (appended)")
    parser.add_argument("--grpc-url", default="localhost:8001")
    parser.add_argument("--levels", default="", help="numbers of users to hold in turn, e.g. 1,2,4,8")
    parser.add_argument("--level-time", type=float, default=30.0, help="seconds per level")
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="seconds at the start of a level not measured"
    )
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second")
    parser.add_argument("--request-timeout", type=float, default=600.0)


class _Run:
    """What every user shares in this process: the workload, the records file, the current level."""

    def __init__(self, opts):
        self.opts = opts
        self.workload = wl.load(opts.workload_file)
        self.next_index = itertools.count()
        self.records = open(opts.records, "a")  # noqa: SIM115 - closed when Locust quits
        self.t0 = time.perf_counter()
        self.level: int | None = None
        self.level_start = 0.0
        rng = np.random.default_rng(self.workload["spec"]["seed"])
        self._gaps = (rng.exponential(1.0 / opts.rate) for _ in itertools.count()) if opts.rate > 0 else None
        self._next_arrival: float | None = None

    def next_request(self) -> dict:
        requests_ = self.workload["requests"]
        request = requests_[next(self.next_index) % len(requests_)]
        return {"fields": wl.request_fields(self.workload, request), "max_tokens": request["max_tokens"]}

    def reserve_arrival(self) -> float:
        """The next Poisson arrival (perf_counter time), taken by the user that asks first."""
        now = time.perf_counter()
        self._next_arrival = (self._next_arrival or now) + next(self._gaps)
        return self._next_arrival

    def set_level(self, level: int) -> None:
        self.level, self.level_start = level, time.perf_counter()
        self.write({"type": "level", "level": level, "t": self.level_start - self.t0, "wall": time.time()})

    def write(self, record: dict) -> None:
        if not self.records.closed:  # a user Locust could not stop in time may finish after quitting
            self.records.write(json.dumps(record) + "\n")
            self.records.flush()


RUN: _Run | None = None


@events.init.add_listener
def _init(environment, **_kwargs):
    global RUN
    if environment.parsed_options is not None:
        RUN = _Run(environment.parsed_options)


@events.quitting.add_listener
def _quitting(environment, **_kwargs):
    if RUN is not None:
        RUN.records.close()


class _LLMUser(User):
    abstract = True
    protocol = ""

    def on_start(self):
        self._due: float | None = None

    def wait_time(self):
        if RUN.opts.rate <= 0:
            return 0.0  # closed loop
        self._due = RUN.reserve_arrival()
        return max(0.0, self._due - time.perf_counter())

    def responses(self, fields: dict, request_id: str):
        """Yield (arrival time, output tokens, input tokens) per response; raise ServerError."""
        raise NotImplementedError

    @task
    def generate(self):
        if RUN.opts.rate > 0 and self._due is None:
            return  # right after spawning: the wait that follows reserves this user's first arrival
        request = RUN.next_request()
        level, since_level = RUN.level, time.perf_counter() - RUN.level_start
        start = time.perf_counter()
        first = end = None
        tokens = input_tokens = num_responses = 0
        error = None
        try:
            for t, n_out, n_in in self.responses(request["fields"], uuid.uuid4().hex):
                num_responses += 1
                tokens += n_out
                input_tokens = n_in or input_tokens
                if first is None and n_out:
                    first = t
                end = t
            if tokens != request["max_tokens"]:
                error = f"{tokens} output tokens for max_tokens={request['max_tokens']} with ignore_eos"
        except gevent.GreenletExit:
            raise  # Locust stopping this user: the request is neither a success nor a failure
        except ServerError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 - a broken connection, a timeout: the request failed
            error = f"{type(e).__name__}: {e}"
        end = end if error is None else time.perf_counter()
        latency = end - start
        events.request.fire(
            request_type=self.protocol,
            name="ensemble stream",
            response_time=latency * 1000.0,
            response_length=tokens,
            exception=ServerError(error) if error else None,
            context={},
        )
        RUN.write(
            {
                "type": "request",
                "protocol": self.protocol,
                "level": level,
                "warmup": since_level < RUN.opts.warmup,
                "t_send": start - RUN.t0,
                "late": (start - self._due) if self._due is not None else 0.0,
                "ok": error is None,
                "error": error,
                "ttft": (first - start) if first is not None and error is None else None,
                "latency": latency,
                "output_tokens": tokens,
                "input_tokens": input_tokens,
                "responses": num_responses,
                "max_tokens": request["max_tokens"],
            }
        )


class GrpcStreamUser(_LLMUser):
    protocol = "grpc"

    def on_start(self):
        super().on_start()
        self.client = grpcclient.InferenceServerClient(RUN.opts.grpc_url)
        self.queue: Queue = Queue()
        self._open_stream()

    def _open_stream(self):
        self.broken = False
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error):
        # A per-request error carries no gRPC status; one with a status ends the stream itself.
        if error is not None and error.status() is not None:
            self.broken = True
        self.queue.put((result, error, time.perf_counter()))

    def on_stop(self):
        self.client.stop_stream(cancel_requests=True)
        self.client.close()

    def responses(self, fields, request_id):
        if self.broken:
            self.client.stop_stream(cancel_requests=True)
            self._open_stream()
        inputs = grpc_inputs(fields)
        self.client.async_stream_infer(MODEL, inputs, request_id=request_id, enable_empty_final_response=True)
        while True:
            try:
                result, error, t = self.queue.get(timeout=RUN.opts.request_timeout)
            except Empty:
                raise ServerError(f"no response in {RUN.opts.request_timeout:.0f} s") from None
            if error is not None:
                raise ServerError(error.message())
            if result.get_response().id != request_id:
                continue  # a late response of an earlier request that failed on this stream
            n_out = result.as_numpy("num_output_tokens")
            if n_out is not None:
                n_in = result.as_numpy("num_input_tokens")
                yield t, int(n_out.reshape(-1)[0]), int(n_in.reshape(-1)[0]) if n_in is not None else 0
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return


class HttpStreamUser(_LLMUser):
    protocol = "http"

    def on_start(self):
        super().on_start()
        self.session = requests.Session()
        self.url = f"{self.host.rstrip('/')}/v2/models/{MODEL}/generate_stream"

    def on_stop(self):
        self.session.close()

    def responses(self, fields, request_id):
        body = dict(fields)
        if "images" in body:  # JSON carries bytes as base64, which the server accepts
            body["images"] = [base64.b64encode(b).decode() for b in body["images"]]
        with self.session.post(self.url, json=body, stream=True, timeout=RUN.opts.request_timeout) as resp:
            if resp.status_code != 200:  # an early error: one SSE event (or plain JSON) with the message
                raise ServerError(f"HTTP {resp.status_code}: {sse.error_text(resp.content)}")
            # chunk_size=None: each chunk as it arrives (Triton sends one SSE event per chunk)
            for event in sse.events(resp.iter_content(chunk_size=None)):
                t = time.perf_counter()
                yield t, int(event.get("num_output_tokens", 0)), int(event.get("num_input_tokens", 0))


class LevelShape(LoadTestShape):
    """--levels held for --level-time each, or Locust's --users for --run-time."""

    use_common_options = True

    def tick(self):
        opts = self.runner.environment.parsed_options
        if opts.levels:
            levels = [int(x) for x in opts.levels.split(",")]
            hold = opts.level_time
        else:
            levels, hold = [opts.num_users or 1], opts.run_time or opts.level_time
        stage = int(self.get_run_time() // hold)
        if stage >= len(levels):
            return None
        if RUN.level != levels[stage]:
            RUN.set_level(levels[stage])
        return levels[stage], levels[stage]  # every user of a level starts at once
