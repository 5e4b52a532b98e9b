"""Flow control for responses streamed through the ensemble: at most a few in flight per request.

Every streamed response of the `maverick` step becomes one request to `postprocessing`, which runs
one instance without a batcher (so that it keeps each stream's order and sees cancelled requests).
When responses come faster than it serves them they queue in front of it, and each stream's tokens
reach the client late by the whole queue. So the `maverick` step keeps at most
RESPONSES_IN_FLIGHT responses per request past it: postprocessing acknowledges each response it
has handled, and while a request has that many unacknowledged, its new tokens wait and leave
merged into the next response (nothing is dropped; the last response always leaves at once; the
holding and merging are maverick/engine/stream_policy.py's, this module is the transport). A
server with time to spare acknowledges before the next engine step and streams every token;
a busy one sends fewer, larger responses instead of a growing queue.

The acknowledgements go through an AckBoard: an int64 array in a small file in shared memory
(/dev/shm), created by the `maverick` model instance (named by a random id) and written by
postprocessing. Slot s holds the last acknowledged response of the request that owns s, tagged
with the owner's generation so that a late acknowledgement of a previous owner is ignored.

The creator holds an exclusive flock on its board for as long as it lives; the kernel drops the
lock when the process dies, however it dies. A board whose lock can be taken has no owner left (its
instance was killed before it could remove the file: a server that hit its exit timeout, say), and
the next board created on the host removes it. Locks hold across PID namespaces (containers sharing
/dev/shm), where a process id would not tell whether the owner is alive.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

RESPONSES_IN_FLIGHT = 2
NUM_SLOTS = 4096  # concurrent flow-controlled requests per model instance; more go uncontrolled
_SEQ_BITS = 32
_MAX_GENERATION = (1 << 30) - 1


BOARD_PREFIX = "maverick-acks-"


def board_dir() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def board_path(board_id: int) -> Path:
    return board_dir() / f"{BOARD_PREFIX}{board_id:x}"


def remove_orphaned_boards() -> list[Path]:
    """Remove the boards no living process holds (see the module's docstring); returns them."""
    removed = []
    for path in board_dir().glob(f"{BOARD_PREFIX}*"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # removed meanwhile, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its owner lives
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)  # also drops the lock
    return removed


def pack(generation: int, seq: int) -> int:
    """A response's acknowledgement value: its request's generation and its number (from 1)."""
    return (generation << _SEQ_BITS) | seq


class AckBoard:
    """The shared array. The `maverick` side creates it and hands out slots; postprocessing opens
    it by id and writes acknowledgements."""

    def __init__(self, path: Path, board_id: int, slots: np.ndarray, lock_fd: int | None = None):
        self.path, self.board_id, self.slots = path, board_id, slots
        self._lock_fd = lock_fd  # the creator's (the owner's); None where postprocessing opened it
        self._free: deque[int] = deque(range(len(slots))) if lock_fd is not None else deque()
        self._generation = 0

    @classmethod
    def create(cls, board_id: int | None = None, num_slots: int = NUM_SLOTS) -> AckBoard:
        remove_orphaned_boards()
        board_id = secrets.randbits(62) if board_id is None else board_id  # never reused
        path = board_path(board_id)
        # Made under another name, locked, then renamed: a sweep never sees it unlocked.
        staging = path.with_name(f"staging-{path.name}")
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, num_slots * np.dtype(np.int64).itemsize)
        os.rename(staging, path)
        slots = np.memmap(path, dtype=np.int64, mode="r+", shape=(num_slots,))
        return cls(path, board_id, slots, lock_fd=fd)

    @classmethod
    def open(cls, board_id: int) -> AckBoard:
        path = board_path(board_id)
        return cls(path, board_id, np.memmap(path, dtype=np.int64, mode="r+"))

    # -- the maverick side ------------------------------------------------------------------------
    def window(self, limit: int = RESPONSES_IN_FLIGHT) -> ResponseWindow | None:
        """A flow-controlled window for one request, or None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.popleft()
        self._generation = self._generation % _MAX_GENERATION + 1  # stays in an int64 with its seq
        self.slots[slot] = pack(self._generation, 0)
        return ResponseWindow(self, slot, self._generation, limit)

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def acknowledged(self, slot: int, generation: int) -> int:
        """How many responses of this slot's current request postprocessing has handled."""
        value = int(self.slots[slot])
        return value & ((1 << _SEQ_BITS) - 1) if value >> _SEQ_BITS == generation else 0

    def close(self) -> None:
        del self.slots
        if self._lock_fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the postprocessing side ------------------------------------------------------------------
    def acknowledge(self, slot: int, value: int) -> None:
        if 0 <= slot < len(self.slots):
            self.slots[slot] = value


class ResponseWindow:
    """One request's slot on the board: how many of its streamed responses are in flight. When a
    response may leave and what waits meanwhile is stream_policy's (the caller holds updates while
    `has_room()` is false)."""

    def __init__(self, board: AckBoard, slot: int, generation: int, limit: int):
        self.board, self.slot, self.generation, self.limit = board, slot, generation, limit
        self.sent = 0

    def in_flight(self) -> int:
        return self.sent - self.board.acknowledged(self.slot, self.generation)

    def has_room(self) -> bool:
        return self.in_flight() < self.limit

    def send(self) -> tuple[int, int, int]:
        """Count one more response as sent; returns its ack (board id, slot, value) for StepOutput."""
        self.sent += 1
        return self.board.board_id, self.slot, pack(self.generation, self.sent)

    def close(self) -> None:
        self.board.release(self.slot)


NO_ACK = (-1, -1, 0)  # a response nobody acknowledges


class Acknowledger:
    """Postprocessing's side: acknowledge a response from its ack (board id, slot, value), opening
    boards as they appear (one per `maverick` instance)."""

    def __init__(self) -> None:
        self.boards: dict[int, AckBoard] = {}

    def __call__(self, ack: tuple[int, int, int]) -> None:
        board_id, slot, value = ack
        if board_id < 0:
            return
        board = self.boards.get(board_id)
        if board is None:
            try:
                board = self.boards[board_id] = AckBoard.open(board_id)
            except OSError:
                return  # its instance is gone: nobody waits for this acknowledgement
        board.acknowledge(slot, value)
