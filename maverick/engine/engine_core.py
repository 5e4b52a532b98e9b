"""The engine in its own process: the loop an `EngineClient` talks to over a socket.

    python -m maverick.engine.engine_core FD

Why a process: in Triton's Python backend the engine thread shared one GIL with the stub's
per-response Python (building and sending every streamed response), and each lost the other's
time; here the engine has an interpreter to itself and the serving process only moves messages.

Protocol, one pickled tuple per message on a stream socket (framed by
`multiprocessing.connection.Connection`; plain pickle, tensors by value):
  client -> core: ("config", EngineConfig) first, then ("add", request_id, Prompt, SamplingParams),
                  ("abort", request_id), ("shutdown",)
  core -> client: ("ready", {"max_model_len": int, "stats": dict}) or ("failed", message) first,
                  then ("step", [RequestOutput], [(request_id, kind, message)], stats) after every
                  turn that produced something (kind: "request" = refused as invalid,
                  "overloaded" = too many waiting), and ("died", message) if the loop itself fails.
The core stops on "shutdown" or when the client's end closes (the serving process is gone): it
never outlives its parent, and SIGINT (a terminal's Ctrl-C to the whole group) is left to the
client to pass on as "shutdown".
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection

from maverick.engine.api import RequestOutput
from maverick.engine.errors import RequestError, overloaded
from maverick.engine.llm_engine import LLMEngine
from maverick.engine.stream_policy import Coalescer

log = logging.getLogger("maverick.engine_core")
COMPILE_POLL_S = 0.002  # idle but for grammars being compiled: how often to look whether one is done


_send_lock = threading.Lock()  # the loop and a tensor-parallel watchdog both report


def send(conn: Connection, message: tuple) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with _send_lock:
        conn.send_bytes(payload)


def recv(conn: Connection) -> tuple:
    return pickle.loads(conn.recv_bytes())


def run(conn: Connection, engine: LLMEngine) -> None:
    """Serve until "shutdown" (returns) or the client's end closes (EOFError, OSError).

    A guided request's grammar is compiled on a worker thread (a large grammar takes a second, and
    every stream waits on this loop); the request joins the engine once its grammar is compiled."""
    with ThreadPoolExecutor(1, "maverick-grammar-compile") as pool:
        _Loop(conn, engine, pool).serve()


class _Loop:
    def __init__(self, conn: Connection, engine: LLMEngine, pool: ThreadPoolExecutor):
        self.conn, self.engine, self.pool = conn, engine, pool
        self.coalescer = Coalescer(engine.config.stream_interval)
        self.compiling: dict[str, Future] = {}  # request id -> its make_request on the worker

    def serve(self) -> None:
        engine = self.engine
        while True:
            messages = self._receive()
            outputs: list[RequestOutput] = []
            errors: list[tuple[str, str, str]] = []
            for message in messages:
                kind = message[0]
                if kind == "add":
                    self._add(*message[1:], errors)
                elif kind == "abort":
                    if (compiling := self.compiling.pop(message[1], None)) is not None:
                        compiling.cancel()  # or, compiled already, dropped here unqueued
                    outputs += engine.abort(message[1])
                elif kind == "shutdown":
                    return
                else:
                    raise ValueError(f"unknown message {kind!r}")
            self._add_compiled(errors)
            if engine.has_unfinished():
                outputs += engine.step()
            outputs = self.coalescer.push(outputs)
            if outputs or errors:
                send(self.conn, ("step", outputs, errors, engine.stats()))

    def _receive(self) -> list[tuple]:
        """Block while idle (but for grammars being compiled: a short wait); with work, take only
        what has arrived."""
        conn = self.conn
        if self.engine.has_unfinished():
            messages = []
        elif self.compiling:
            messages = [recv(conn)] if conn.poll(COMPILE_POLL_S) else []
        else:
            messages = [recv(conn)]
        while conn.poll():
            messages.append(recv(conn))
        return messages

    def _add(self, request_id: str, prompt, params, errors: list) -> None:
        waiting = len(self.engine.scheduler.waiting) + len(self.compiling)
        if waiting >= self.engine.config.max_num_waiting:
            errors.append((request_id, "overloaded", str(overloaded(waiting))))
        elif params.guided_decoding is not None:
            make = self.engine.make_request  # validates and compiles; touches no engine state
            self.compiling[request_id] = self.pool.submit(make, request_id, prompt, params)
        else:
            try:
                self.engine.add_request(request_id, prompt, params)
            except RequestError as e:
                errors.append((request_id, "request", str(e)))

    def _add_compiled(self, errors: list) -> None:
        for request_id, done in [(r, f) for r, f in self.compiling.items() if f.done()]:
            del self.compiling[request_id]
            try:
                self.engine.add_sequences(done.result())
            except RequestError as e:
                errors.append((request_id, "request", str(e)))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="maverick engine core: %(levelname)s %(message)s")
    conn = Connection(int(argv[0]))
    try:
        kind, config = recv(conn)
        if kind != "config":
            raise ValueError(f"expected the config first, got {kind!r}")
        try:
            engine = LLMEngine(config, on_rank_failure=lambda reason: _rank_failed(conn, reason))
        except Exception as e:  # noqa: BLE001 - reported to the client, which raises it
            log.exception("engine failed to start")
            send(conn, ("failed", f"{type(e).__name__}: {e}"))
            return 1
        send(conn, ("ready", {"max_model_len": engine.max_model_len, "stats": engine.stats()}))
        try:
            run(conn, engine)
        finally:
            engine.close()
        return 0
    except (EOFError, OSError):
        return 0  # the client is gone: nothing to serve
    except BaseException as e:  # noqa: BLE001 - tell the client why, then stop
        log.exception("engine core died")
        try:
            send(conn, ("died", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        return 1


def _rank_failed(conn: Connection, reason: str) -> None:
    """A tensor-parallel rank stopped (from the watchdog thread): tell the client, and exit at once,
    as the other ranks may be blocked in a collective that will never complete."""
    log.error("%s: the engine stops", reason)
    try:
        send(conn, ("died", reason))
    except OSError:
        pass
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
