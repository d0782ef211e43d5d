"""
Tests for :mod:`taskoffload.testing`: the fake's scripted mode, which has no real
counterpart, and its own options.  What the fake must do as the real client does
is in ``tests/test_pool_contract.py``, run on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import AlreadyCalledError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.client import ITaskPool
from taskoffload.testing import FakeCall, FakeTaskPool
from tests._trial_bridge import pytest_module
from tests.outcomes import error_of, outcome


def count(n: int, progress: Callable[[Any], None]) -> int:
    for i in range(n):
        progress({"done": i})
    return n


# The fake's scripted mode


def test_scripted_records_call() -> None:
    """A scripted call is recorded with its arguments and left unanswered."""
    pool = FakeTaskPool()
    progress = [].append
    d = pool.send_task("f", [1], {"k": "v"}, timeout=2.5, on_progress=progress)
    [call] = pool.calls
    assert (call.function, call.args, call.kwargs, call.timeout) == ("f", (1,), {"k": "v"}, 2.5)
    assert call.on_progress is progress
    assert call.deferred is d
    assert not d.called
    assert pool.pending == [call]


def test_scripted_succeed() -> None:
    """succeed() fires the caller's Deferred with the value."""
    pool = FakeTaskPool()
    d = pool.call("f")
    pool.calls[0].succeed({"x": 1})
    assert outcome(d) == {"x": 1}
    assert pool.pending == []


def test_scripted_fail() -> None:
    """fail() fails the caller's Deferred with a TaskError of that code, message and type."""
    pool = FakeTaskPool()
    d = pool.call("f")
    pool.calls[0].fail(wire.TASK_FAILED, "bad", "KeyError")
    error = error_of(d)
    assert (error.code, error.message, error.type) == (wire.TASK_FAILED, "bad", "KeyError")


def test_scripted_fail_unknown_code() -> None:
    """fail() refuses a code the wire format does not define."""
    pool = FakeTaskPool()
    pool.call("f")
    with pytest.raises(ValueError):
        pool.calls[0].fail("oops", "typo")


def test_scripted_progress() -> None:
    """progress() reaches on_progress until the call is answered, then is dropped."""
    pool = FakeTaskPool()
    seen: list[Any] = []
    pool.send_task("f", on_progress=seen.append)
    call = pool.calls[0]
    call.progress(1)
    call.progress(2)
    call.succeed()
    call.progress(3)
    assert seen == [1, 2]
    assert call.progress_sent == [1, 2]


def test_scripted_progress_without_callback() -> None:
    """progress() on a call without on_progress is recorded and harmless."""
    pool = FakeTaskPool()
    pool.call("f")
    pool.calls[0].progress("half")
    assert pool.calls[0].progress_sent == ["half"]


def test_cancel_fails_with_cancelled() -> None:
    """Cancelling the Deferred fails it with TaskError cancelled and marks the call."""
    pool = FakeTaskPool()
    d = pool.call("f")
    d.cancel()
    call = pool.calls[0]
    assert call.cancelled
    assert error_of(d).code == wire.CANCELLED
    assert pool.pending == []


def test_answer_after_cancel_ignored() -> None:
    """A late answer to a cancelled call is ignored, like a worker's late reply."""
    pool = FakeTaskPool()
    d = pool.call("f")
    d.cancel()
    call = pool.calls[0]
    call.succeed(1)
    call.fail(wire.TASK_FAILED, "late")
    assert error_of(d).code == wire.CANCELLED


def test_cancel_after_answer_is_noop() -> None:
    """Cancelling an answered call changes nothing."""
    pool = FakeTaskPool()
    d = pool.call("f")
    call = pool.calls[0]
    call.succeed(7)
    d.cancel()
    assert not call.cancelled
    assert outcome(d) == 7


def test_second_answer_raises() -> None:
    """Answering a call twice is a test bug, and raises AlreadyCalledError."""
    pool = FakeTaskPool()
    d = pool.call("f")
    call = pool.calls[0]
    call.succeed(1)
    with pytest.raises(AlreadyCalledError):
        call.succeed(2)
    assert outcome(d) == 1


def test_tasks_mode_records_calls() -> None:
    """With tasks, calls are still recorded, already answered."""
    pool = FakeTaskPool(tasks={"echo": lambda **kw: kw})
    d = pool.call("echo", a=1)
    assert outcome(d) == {"a": 1}
    [call] = pool.calls
    assert isinstance(call, FakeCall)
    assert call.answered
    assert call.kwargs == {"a": 1}


def test_tasks_mode_records_progress() -> None:
    """With tasks, the progress a task reports is recorded on its call."""
    pool = FakeTaskPool(tasks={"count": count})
    assert outcome(pool.call("count", n=2)) == 2
    assert pool.calls[0].progress_sent == [{"done": 0}, {"done": 1}]


# What the scripted mode shares with the real client


def test_scripted_provides_interface() -> None:
    """A scripted pool provides ITaskPool, slots() and capacity() included."""
    assert verifyObject(ITaskPool, FakeTaskPool())


def test_scripted_records_arguments_as_a_worker_receives_them() -> None:
    """A scripted call records its arguments as they arrive through JSON."""
    pool = FakeTaskPool()
    pool.send_task("f", [(1, 2)], {"k": {1: "a"}})
    [call] = pool.calls
    assert (call.args, call.kwargs) == (([1, 2],), {"k": {"1": "a"}})


def test_scripted_unencodable_arguments() -> None:
    """A scripted call whose arguments JSON cannot carry is recorded, failed with bad_request."""
    pool = FakeTaskPool()
    d = pool.call("f", object())
    error = error_of(d)
    assert error.code == wire.BAD_REQUEST
    assert error.message.startswith("the arguments cannot be sent as JSON: ")
    assert [call.function for call in pool.calls] == ["f"]
    assert pool.pending == []


def test_scripted_result_through_json() -> None:
    """succeed() delivers its value through JSON; one JSON cannot carry fails with task_failed."""
    pool = FakeTaskPool()
    carried, refused = pool.call("f"), pool.call("f")
    pool.calls[0].succeed((1, {2: 3}))
    pool.calls[1].succeed(object())
    assert outcome(carried) == [1, {"2": 3}]
    error = error_of(refused)
    assert (error.code, error.type) == (wire.TASK_FAILED, "TypeError")


def test_scripted_progress_through_json() -> None:
    """progress() delivers its value through JSON, and records it as delivered."""
    pool = FakeTaskPool()
    seen: list[Any] = []
    pool.send_task("f", on_progress=seen.append)
    pool.calls[0].progress((1, 2))
    assert seen == [[1, 2]]
    assert pool.calls[0].progress_sent == [[1, 2]]


def test_scripted_on_progress_error_is_logged() -> None:
    """What on_progress raises is logged, not raised to the test reporting progress."""

    def broken(value: Any) -> None:
        raise RuntimeError("caller bug")

    pool = FakeTaskPool()
    pool.send_task("f", on_progress=broken)
    with capturedLogs() as events:
        pool.calls[0].progress(1)
    assert [formatEvent(e) for e in events if "log_failure" in e] == ["on_progress of 'f' raised"]


def test_scripted_timeout() -> None:
    """With a clock, an unanswered call fails with timeout when its timeout passes."""
    clock = Clock()
    pool = FakeTaskPool(clock=clock)
    d = pool.send_task("f", timeout=2)
    clock.advance(1.5)
    assert not d.called
    clock.advance(0.5)
    error = error_of(d)
    assert (error.code, error.message) == (wire.TIMEOUT, "no reply within 2 seconds")
    [call] = pool.calls
    assert (call.timed_out, call.cancelled, call.answered) == (True, False, True)


def test_scripted_default_timeout() -> None:
    """With a clock, a call that gives no timeout is held to the pool's default."""
    clock = Clock()
    pool = FakeTaskPool(clock=clock, timeout=3)
    d = pool.call("f")
    clock.advance(3)
    assert error_of(d).code == wire.TIMEOUT
    assert pool.calls[0].timeout is None


def test_answer_after_timeout_ignored() -> None:
    """A late answer to a timed-out call is ignored, like a worker's late reply."""
    clock = Clock()
    pool = FakeTaskPool(clock=clock)
    d = pool.send_task("f", timeout=1)
    clock.advance(1)
    pool.calls[0].succeed(1)
    pool.calls[0].fail(wire.TASK_FAILED, "late")
    assert error_of(d).code == wire.TIMEOUT


def test_answer_stops_the_timeout() -> None:
    """A call answered in time leaves no timer behind on the clock."""
    clock = Clock()
    pool = FakeTaskPool(clock=clock)
    d = pool.send_task("f", timeout=1)
    pool.calls[0].succeed("in time")
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert outcome(d) == "in time"


def test_size_defaults_to_unknown() -> None:
    """A pool given no slots says neither slots nor capacity, as a client not yet connected."""
    pool = FakeTaskPool()
    assert (pool.slots(), pool.capacity()) == (None, None)


def test_capacity_without_prefetch_is_the_slots() -> None:
    """Without prefetch, the capacity is the slots."""
    assert FakeTaskPool(slots=4).capacity() == 4


@pytest.mark.parametrize(
    "options", [{"timeout": 0}, {"timeout": float("inf")}, {"slots": 0}, {"prefetch": -1}]
)
def test_bad_options(options: dict[str, Any]) -> None:
    """An out-of-range timeout, slots or prefetch raises ValueError, as the real client's."""
    with pytest.raises(ValueError):
        FakeTaskPool(**options)


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
