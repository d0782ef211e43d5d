"""Unit tests for :mod:`taskoffload.calls`: a call's states, timer and answer, and the waiting line."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.calls import Call, CallState, CallStateError, WaitingLine
from taskoffload.errors import TaskError
from tests._trial_bridge import pytest_module


class Record:
    """What happened to calls: their give-ups and what their Deferreds fired with."""

    def __init__(self) -> None:
        self.given_up: list[tuple[int, str]] = []
        self.fired: dict[int, Any] = {}

    def give_up(self, call: Call, error: TaskError) -> None:
        """Note the give-up, and finish and answer the call as a client would."""
        self.given_up.append((call.id, error.code))
        call.finish()
        call.answer(error)

    def call(self, request_id: int = 1, timeout: float | None = None) -> Call:
        """A new call whose outcome is recorded."""
        call = Call(request_id, "add", (1, 2), {}, timeout, None, self.give_up)
        call.deferred.addBoth(lambda value: self.fired.__setitem__(request_id, value))
        return call


def test_a_call_starts_queued_and_owed() -> None:
    """A new call is queued, its caller waiting for an answer."""
    call = Record().call()
    assert call.state is CallState.QUEUED
    assert call.owed


@pytest.mark.parametrize(
    "path",
    [
        [CallState.SENT, CallState.FINISHED],
        [CallState.SENT, CallState.ABANDONED, CallState.FINISHED],
        [CallState.SENT, CallState.QUEUED, CallState.SENT, CallState.FINISHED],
        [CallState.FINISHED],
    ],
)
def test_allowed_moves(path: list[CallState]) -> None:
    """The transitions a call makes in its life are allowed."""
    call = Record().call()
    for state in path:
        call.move(state)
    assert call.state is path[-1]


@pytest.mark.parametrize(
    ("path", "refused"),
    [
        ([], CallState.ABANDONED),
        ([], CallState.QUEUED),
        ([CallState.SENT], CallState.SENT),
        ([CallState.SENT, CallState.ABANDONED], CallState.QUEUED),
        ([CallState.SENT, CallState.ABANDONED], CallState.SENT),
        ([CallState.FINISHED], CallState.QUEUED),
        ([CallState.FINISHED], CallState.FINISHED),
    ],
)
def test_refused_moves(path: list[CallState], refused: CallState) -> None:
    """A transition its state does not allow raises, and leaves the state as it was."""
    call = Record().call()
    for state in path:
        call.move(state)
    before = call.state
    with pytest.raises(CallStateError, match="cannot go from"):
        call.move(refused)
    assert call.state is before


def test_finish_says_whether_the_caller_waits() -> None:
    """finish() is true for a sent call, false for an abandoned one."""
    record = Record()
    sent, abandoned = record.call(1), record.call(2)
    sent.move(CallState.SENT)
    abandoned.move(CallState.SENT)
    abandoned.move(CallState.ABANDONED)
    assert sent.finish() is True
    assert abandoned.finish() is False


def test_answered_once_only() -> None:
    """A finished call is answered once; a second answer raises and fires nothing."""
    record = Record()
    call = record.call()
    call.finish()
    call.answer(3)
    assert record.fired == {1: 3}
    with pytest.raises(CallStateError):
        call.answer(4)
    assert record.fired == {1: 3}


@pytest.mark.parametrize("state", [CallState.QUEUED, CallState.SENT])
def test_not_answered_while_owed(state: CallState) -> None:
    """A call still queued or sent cannot be answered: it must leave those states first."""
    record = Record()
    call = record.call()
    if state is CallState.SENT:
        call.move(state)
    with pytest.raises(CallStateError, match="cannot be answered"):
        call.answer(None)
    assert record.fired == {}


def test_error_answer_fails_the_deferred() -> None:
    """An answer that is a TaskError fails the Deferred with it."""
    record = Record()
    call = record.call()
    call.finish()
    call.answer(TaskError(wire.TASK_FAILED, "boom"))
    failure = record.fired[1]
    assert isinstance(failure, Failure) and failure.value.message == "boom"


def test_timer_gives_up_with_timeout() -> None:
    """When the timeout passes first, the call gives up with a timeout error."""
    clock = Clock()
    record = Record()
    call = record.call(timeout=2)
    call.start_timer(clock)
    assert call.deadline == 2
    clock.advance(1.9)
    assert record.given_up == []
    clock.advance(0.1)
    assert record.given_up == [(1, wire.TIMEOUT)]
    assert "no reply within 2 seconds" in str(record.fired[1].value)


def test_answer_stops_the_timer() -> None:
    """An answer before the timeout cancels its timer."""
    clock = Clock()
    record = Record()
    call = record.call(timeout=2)
    call.start_timer(clock)
    call.finish()
    call.answer("ok")
    assert clock.getDelayedCalls() == []


def test_no_timer_without_timeout() -> None:
    """A call without a timeout has no deadline and no timer."""
    clock = Clock()
    call = Record().call()
    call.start_timer(clock)
    assert call.deadline is None
    assert clock.getDelayedCalls() == []


def test_cancel_gives_up_with_cancelled() -> None:
    """Cancelling the Deferred gives the call up with a cancelled error."""
    record = Record()
    call = record.call()
    call.deferred.cancel()
    assert record.given_up == [(1, wire.CANCELLED)]


def test_request_line_carries_what_is_left_of_the_timeout() -> None:
    """The request line carries the time left to the deadline, in milliseconds at least."""
    clock = Clock()
    call = Record().call(timeout=10)
    call.start_timer(clock)
    line = call.request_line(4)
    assert isinstance(line, bytes)
    assert orjson.loads(line)["timeout"] == 6
    late = call.request_line(11)
    assert isinstance(late, bytes)
    assert orjson.loads(late)["timeout"] == 0.001


def test_request_line_of_unsendable_arguments() -> None:
    """Arguments JSON cannot carry give a bad_request error instead of a line."""
    call = Call(1, "f", (object(),), {}, None, None, Record().give_up)
    error = call.request_line(0)
    assert isinstance(error, TaskError) and error.code == wire.BAD_REQUEST


# The waiting line


def test_line_is_first_in_first_out() -> None:
    """Calls leave the line in the order they joined it, still queued."""
    record = Record()
    line = WaitingLine()
    calls = [record.call(n) for n in range(1, 4)]
    for call in calls:
        line.append(call)
    assert len(line) == 3
    taken = [line.take() for _ in range(3)]
    assert taken == calls
    assert all(call.state is CallState.QUEUED for call in calls)
    assert line.take() is None
    assert len(line) == 0


def test_withdrawn_call_is_skipped() -> None:
    """A call withdrawn while waiting is finished, not counted, and skipped when reached."""
    record = Record()
    line = WaitingLine()
    first, second = record.call(1), record.call(2)
    line.append(first)
    line.append(second)
    line.withdraw(first)
    assert first.state is CallState.FINISHED
    assert len(line) == 1
    assert line.take() is second


def test_requeue_goes_to_the_head() -> None:
    """A sent call put back goes ahead of the calls waiting, queued again."""
    record = Record()
    line = WaitingLine()
    waiting, sent = record.call(1), record.call(2)
    line.append(waiting)
    sent.move(CallState.SENT)
    line.requeue(sent)
    assert sent.state is CallState.QUEUED
    assert [line.take(), line.take()] == [sent, waiting]


def test_only_queued_calls_join() -> None:
    """A call that is not queued cannot join the line."""
    call = Record().call()
    call.move(CallState.SENT)
    with pytest.raises(CallStateError):
        WaitingLine().append(call)


def test_withdraw_newest() -> None:
    """withdraw_newest finishes the newest waiting calls, newest first, skipping gone ones."""
    record = Record()
    line = WaitingLine()
    calls = [record.call(n) for n in range(1, 5)]
    for call in calls:
        line.append(call)
    line.withdraw(calls[3])
    assert line.withdraw_newest(2) == [calls[2], calls[1]]
    assert len(line) == 1
    assert line.take() is calls[0]


def test_withdraw_all() -> None:
    """withdraw_all finishes every waiting call, oldest first, and empties the line."""
    record = Record()
    line = WaitingLine()
    calls = [record.call(n) for n in range(1, 4)]
    for call in calls:
        line.append(call)
    line.withdraw(calls[1])
    assert line.withdraw_all() == [calls[0], calls[2]]
    assert all(call.state is CallState.FINISHED for call in calls)
    assert len(line) == 0
    assert line.take() is None


testSuite = pytest_module(__file__)
