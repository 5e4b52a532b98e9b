"""The tensor-parallel ranks of one engine.

Rank 0 is the engine's own process: it schedules, samples and detokenizes, and plans each step
on the host. Ranks 1..T-1 are processes it spawns (`TensorParallelRanks`); each loads its shard
of the weights, holds its KV heads' cache, and runs every step rank 0 sends it. The tensors of a
step move through torch.distributed (NCCL on CUDA, gloo on the CPU; `TensorParallel`'s
all-reduce and all-gather inside the forward); the steps themselves go over one pipe per rank,
where an idle engine can wait without a collective timing out, and where a dead rank 0 shows as
the pipe closing (the rank exits). The rendezvous is a file in a private temporary folder, so
several engines share a host without choosing ports.

A rank that dies, or fails a step, fails the engine: rank 0's next collective raises, or its
watchdog sees the process end, and the owner's `on_failure` runs (the engine process exits, so
its client fails every request with UNAVAILABLE at once).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import pickle
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path

import torch
import torch.distributed as dist

from maverick.engine.api import DTYPES, EngineConfig
from maverick.layers.parallel import TensorParallel

log = logging.getLogger(__name__)

# A collective that waits longer than this for a rank fails (a rank stuck, not merely slow: no
# step takes minutes).
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """cuda:K+rank for device cuda:K; the CPU for every rank on the CPU."""
    device = torch.device(config.device)
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def join_group(config: EngineConfig, rank: int, store_path: str) -> TensorParallel:
    device = rank_device(config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL touches a device
    size = config.tensor_parallel_size
    store = dist.FileStore(store_path, size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    return TensorParallel(rank, size, dist.group.WORLD)


class TensorParallelRanks:
    """Rank 0's handle on ranks 1..T-1: start them, send each step, watch them, stop them."""

    def __init__(self, config: EngineConfig, on_failure: Callable[[str], None]):
        self.config = config
        self._dir = tempfile.mkdtemp(prefix="maverick-tp-")
        self.store_path = str(Path(self._dir) / "rendezvous")
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        self._conns: list[Connection] = []
        self._procs: list[mp.process.BaseProcess] = []
        for rank in range(1, config.tensor_parallel_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_rank_main,
                args=(config, rank, self.store_path, theirs),
                name=f"maverick-tp-rank-{rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        self._stopping = False
        self._on_failure = on_failure

    def send(self, message: tuple) -> None:
        """One message to every rank, pickled once."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self._conns:
            conn.send_bytes(payload)

    def wait_ready(self) -> None:
        """Every rank built its runner (after "setup"); raises if one failed."""
        for rank, conn in enumerate(self._conns, start=1):
            try:
                reply = conn.recv()
            except EOFError:
                raise RuntimeError(f"tensor-parallel rank {rank} exited while starting") from None
            if reply != "ready":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start: {reply}")
        # from now on a rank that ends is a failure of the running engine
        threading.Thread(target=self._watch, name="maverick-tp-watchdog", daemon=True).start()

    def _watch(self) -> None:
        wait([p.sentinel for p in self._procs])
        if not self._stopping:
            shutil.rmtree(self._dir, ignore_errors=True)  # on_failure may end the process at once
            self._on_failure(self.failure() or "a tensor-parallel rank stopped")

    def failure(self, wait_s: float = 0.0) -> str | None:
        """Which ranks have stopped, or None; waits up to wait_s for one to end (a collective
        that failed because a rank is dying fails before the rank is gone)."""
        # a sentinel is ready once its process has ended (is_alive() could race the other thread
        # here to reap it, and then report it alive)
        ended = set(wait([p.sentinel for p in self._procs], wait_s))
        dead = [f"rank {r}" for r, p in enumerate(self._procs, start=1) if p.sentinel in ended]
        return f"tensor-parallel {', '.join(dead)} stopped" if dead else None

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        for conn in self._conns:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
            except OSError:
                pass  # that rank is gone already
        for proc in self._procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when rank 0 dies, however it dies (a pipe only tells a rank
    that is waiting for a step)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank_main(config: EngineConfig, rank: int, store_path: str, conn: Connection) -> None:
    """Ranks 1..T-1: load the shard, build the runner rank 0 describes, run every step it sends."""
    from maverick.checkpoint import load_model
    from maverick.engine.model_runner import ModelRunner

    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is rank 0's to handle
    logging.basicConfig(level=logging.INFO, format=f"maverick tp rank {rank}: %(levelname)s %(message)s")
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    try:
        tp = join_group(config, rank, store_path)
        device = rank_device(config, rank)
        model = load_model(
            config.model_dir, dtype=DTYPES[config.dtype], device=device, experts=config.experts, tp=tp
        )
        kind, setup = pickle.loads(conn.recv_bytes())
        if kind != "setup":
            raise RuntimeError(f"expected the runner's setup first, got {kind!r}")
        runner = ModelRunner(model, **setup)
        conn.send("ready")
    except EOFError:
        return  # rank 0 went away while this rank started
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which fails the engine's start
        log.exception("rank %d failed to start", rank)
        conn.send(f"{type(e).__name__}: {e}")
        return
    try:
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message[0] == "forward":
                message[1].run(model, runner.kv_caches)
            elif message[0] == "decode":
                runner.decode_runner.run(message[1])
            elif message[0] == "stop":
                break
            else:
                raise ValueError(f"unknown message {message[0]!r}")
    except EOFError:
        pass  # rank 0 is gone
    finally:
        dist.destroy_process_group()
