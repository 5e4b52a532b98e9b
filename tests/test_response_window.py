"""Flow control of streamed responses (maverick/serving/response_window.py, flow_control.py): the
`maverick` step keeps at most `limit` unacknowledged responses per stream and merges what it holds
back."""

from __future__ import annotations

import subprocess
import sys

import pytest

from maverick.engine.api import RequestOutput
from maverick.serving.flow_control import FlowControlledStream
from maverick.serving.response_window import NO_ACK, AckBoard, Acknowledger, board_path


@pytest.fixture
def board():
    board = AckBoard.create(num_slots=4)
    yield board
    board.close()


def window_of(board, limit):
    """A request's flow-controlled stream, as the `maverick` step makes one."""
    return FlowControlledStream(board.window(limit=limit))


def update(ids, finished=False):
    return RequestOutput(
        "r",
        list(ids),
        "".join(f"<{i}>" for i in ids),
        finished,
        finish_reason="length" if finished else None,
        num_output_tokens=max(ids),
        logprobs=[-float(i) for i in ids],
        token_times=[float(i) for i in ids],
    )


def test_at_most_limit_unacknowledged_and_held_updates_leave_merged(board):
    window = window_of(board, 2)
    postprocessing = Acknowledger()
    sent = [window.offer(update([1])), window.offer(update([2]))]
    assert all(s is not None for s in sent)
    assert window.offer(update([3])) is None  # two in flight: held
    assert window.offer(update([4])) is None
    postprocessing(sent[0][1])  # the first response is handled
    merged, ack = window.offer(update([5]))
    assert merged.token_ids == [3, 4, 5] and merged.text == "<3><4><5>"
    assert merged.logprobs == [-3.0, -4.0, -5.0] and merged.token_times == [3.0, 4.0, 5.0]
    assert merged.num_output_tokens == 5
    assert window.offer(update([6])) is None  # responses 2 and 3 in flight
    last, _ = window.offer(update([7], finished=True))  # the last update always leaves
    assert last.token_ids == [6, 7] and last.finished and last.finish_reason == "length"
    assert ack[:2] == (board.board_id, window.window.slot)


def test_acknowledgements_cross_processes(board):
    window = window_of(board, 1)
    _, ack = window.offer(update([1]))
    assert window.offer(update([2])) is None
    code = (
        "import sys\n"
        "from maverick.serving.response_window import Acknowledger\n"
        "Acknowledger()(tuple(int(v) for v in sys.argv[1:]))\n"
    )
    subprocess.run([sys.executable, "-c", code, *map(str, ack)], check=True)
    assert window.window.in_flight() == 0
    assert window.offer(update([3])) is not None


def test_a_late_acknowledgement_of_a_previous_owner_is_ignored():
    board = AckBoard.create(num_slots=1)
    try:
        old = window_of(board, 1)
        _, old_ack = old.offer(update([1]))
        old.offer(update([2], finished=True))
        old.close()
        new = window_of(board, 1)  # the same slot, a new generation
        assert new.window.slot == old.window.slot
        new.offer(update([1]))
        Acknowledger()(old_ack)  # postprocessing handles the old request's response only now
        assert new.window.in_flight() == 1 and new.offer(update([2])) is None
    finally:
        board.close()


def test_slots_run_out_and_come_back(board):
    windows = [board.window() for _ in range(4)]
    assert board.window() is None  # uncontrolled: the caller streams every update
    windows[2].close()
    assert board.window().slot == windows[2].slot


def test_acknowledger_ignores_uncontrolled_and_vanished_boards(board):
    postprocessing = Acknowledger()
    postprocessing(NO_ACK)
    postprocessing((board.board_id + 1, 0, 1))  # no such board: its instance is gone
    assert postprocessing.boards == {}


def test_close_removes_the_board_file():
    board = AckBoard.create(num_slots=2)
    path = board_path(board.board_id)
    assert path.exists()
    board.close()
    assert not path.exists()


def test_generations_wrap_inside_an_int64():
    board = AckBoard.create(num_slots=1)
    try:
        board._generation = (1 << 30) - 2  # the next window takes the last generation
        last = window_of(board, 1)
        _, ack = last.offer(update([1], finished=True))
        last.close()
        wrapped = window_of(board, 1)
        assert last.window.generation == (1 << 30) - 1 and wrapped.window.generation == 1
        Acknowledger()(ack)  # the previous generation's acknowledgement
        assert wrapped.window.in_flight() == 0 and wrapped.offer(update([1])) is not None
    finally:
        board.close()


def _board_in_a_process(exit_at_once: bool) -> tuple[subprocess.Popen, int]:
    """A process that creates a board and then dies without closing it (killed before it could),
    or lives on until its stdin closes. Returns the process and the board's id."""
    code = (
        "import os, sys; from maverick.serving.response_window import AckBoard; "
        "b = AckBoard.create(num_slots=2); print(b.board_id, flush=True); "
        + ("os._exit(0)" if exit_at_once else "sys.stdin.read()")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    return proc, int(proc.stdout.readline())


def test_a_board_whose_owner_died_is_removed_by_the_next_one():
    alive, alive_id = _board_in_a_process(exit_at_once=False)
    dead, dead_id = _board_in_a_process(exit_at_once=True)  # (creating, it swept nothing of alive's)
    dead.wait(timeout=30)
    try:
        assert board_path(dead_id).exists() and board_path(alive_id).exists()
        board = AckBoard.create(num_slots=2)  # sweeps orphans first
        assert not board_path(dead_id).exists()  # nobody held its lock any more
        assert board_path(alive_id).exists()  # its owner still holds it
        board.close()
        assert not board_path(board.board_id).exists()
    finally:
        alive.stdin.close()
        alive.wait(timeout=30)
    # its process ended without closing the board: orphaned now, and swept by the next one
    assert board_path(alive_id).exists()
    AckBoard.create(num_slots=1).close()
    assert not board_path(alive_id).exists()


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_silent_request_sends_a_heartbeat_once_nothing_is_in_flight(board):
    clock = Clock()
    stream = FlowControlledStream(board.window(limit=2), heartbeat_s=0.5, clock=clock)
    clock.now = 0.4
    assert stream.heartbeat() is None  # not silent long enough
    clock.now = 0.5
    beat = stream.heartbeat()
    assert beat is not None and beat[:2] == (board.board_id, stream.window.slot)
    clock.now = 2.0
    assert stream.heartbeat() is None  # the last one is still in flight: postprocessing lags
    Acknowledger()(beat)
    second = stream.heartbeat()
    assert second is not None
    clock.now = 2.1
    Acknowledger()(second)
    _, ack = stream.offer(update([1]))  # a response leaves: silence starts again
    Acknowledger()(ack)
    clock.now = 2.5
    assert stream.heartbeat() is None
    clock.now = 2.6
    assert stream.heartbeat() is not None


def test_an_uncontrolled_request_beats_on_silence_alone():
    clock = Clock()
    stream = FlowControlledStream(None, heartbeat_s=0.5, clock=clock)
    clock.now = 0.6
    assert stream.heartbeat() == NO_ACK
    assert stream.heartbeat() is None  # just sent
    clock.now = 1.1
    assert stream.heartbeat() == NO_ACK
