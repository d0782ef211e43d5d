"""
Tests for :mod:`taskoffload.testing`.

The contract tests run one set of behaviours against :class:`FakeTaskPool` (with
``tasks``) and against the real thing: a :class:`TaskClient` on a
``MemoryReactorClock`` whose connections ``iosim`` completes to a real
``TaskServerFactory`` serving the same functions.  The rest cover the fake's
scripted mode, which has no real counterpart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import AlreadyCalledError, Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter, IOPump
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.client import ITaskPool, TaskClient, TaskError
from taskoffload.registry import TaskRegistry
from taskoffload.testing import FakeCall, FakeTaskPool
from taskoffload.worker import TaskServerFactory

PORT = 12345


def echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs


def add(a: int, b: int) -> int:
    return a + b


def boom(message: str = "boom") -> None:
    raise ValueError(message)


def count(n: int, progress: Callable[[Any], None]) -> int:
    for i in range(n):
        progress({"done": i})
    return n


TASKS: dict[str, Callable[..., Any]] = {"echo": echo, "add": add, "boom": boom, "count": count}


def outcome(d: Deferred[Any]) -> Any:
    """The result a fired Deferred holds, or its ``Failure``; fails if unfired."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen, "the Deferred has not fired"
    return seen[0]


def error_of(d: Deferred[Any]) -> TaskError:
    """The :class:`TaskError` a fired Deferred failed with."""
    failure = outcome(d)
    assert isinstance(failure, Failure), f"expected a TaskError, got result {failure!r}"
    assert isinstance(failure.value, TaskError), failure
    return failure.value


class FakeHarness:
    """The fake pool, which answers at once."""

    def __init__(self) -> None:
        self.pool = FakeTaskPool(tasks=TASKS)

    def settle(self) -> None:
        """Nothing to move: the fake has answered already."""


class RealHarness:
    """A real client and worker server joined by in-memory connections."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        server = TaskServerFactory(TaskRegistry.from_functions(TASKS.values()), self.reactor)
        self.reactor.listenTCP(PORT, server)
        self.pool = TaskClient(self.reactor, [f"tcp:127.0.0.1:{PORT}"])
        self._completer = ConnectionCompleter(self.reactor)
        self._pumps: list[IOPump] = []

    def settle(self) -> None:
        """Complete the client's connection attempts and move bytes until quiet."""
        for _ in range(100):
            while self.reactor.tcpClients:
                self._pumps.append(self._completer.succeedOnce())
            moved = [pump.flush() for pump in self._pumps]
            if not any(moved) and not self.reactor.tcpClients:
                return
        raise AssertionError("the client and the server never went quiet")


@pytest.fixture(params=["fake", "real"])
def harness(request: pytest.FixtureRequest) -> FakeHarness | RealHarness:
    """Each contract test runs on the fake pool and on a real client and server."""
    if request.param == "fake":
        return FakeHarness()
    return RealHarness()


def run(harness: FakeHarness | RealHarness, d: Deferred[Any]) -> Deferred[Any]:
    """Let ``harness`` answer, then give back ``d``."""
    harness.settle()
    return d


# The contract


def test_provides_interface(harness: FakeHarness | RealHarness) -> None:
    """The pool provides ITaskPool."""
    assert verifyObject(ITaskPool, harness.pool)


def test_call_resolves_with_result(harness: FakeHarness | RealHarness) -> None:
    """A call's Deferred fires with the task's result."""
    d = harness.pool.send_task("add", (2, 3))
    assert outcome(run(harness, d)) == 5


def test_call_shorthand_passes_arguments(harness: FakeHarness | RealHarness) -> None:
    """call() passes positional and keyword arguments through."""
    positional = harness.pool.call("add", 1, 2)
    keywords = harness.pool.call("echo", a=1, b=[2])
    harness.settle()
    assert outcome(positional) == 3
    assert outcome(keywords) == {"a": 1, "b": [2]}


def test_task_raises_task_failed(harness: FakeHarness | RealHarness) -> None:
    """A task that raises fails the call with task_failed, its message and type."""
    error = error_of(run(harness, harness.pool.send_task("boom", kwargs={"message": "no"})))
    assert (error.code, error.message, error.type) == (wire.TASK_FAILED, "no", "ValueError")


def test_unknown_function(harness: FakeHarness | RealHarness) -> None:
    """An unregistered name fails with unknown_function."""
    error = error_of(run(harness, harness.pool.send_task("nope")))
    assert error.code == wire.UNKNOWN_FUNCTION


def test_bad_arguments(harness: FakeHarness | RealHarness) -> None:
    """Arguments that do not fit the task fail with bad_arguments."""
    error = error_of(run(harness, harness.pool.send_task("add", (1,))))
    assert error.code == wire.BAD_ARGUMENTS


def test_progress_reaches_caller(harness: FakeHarness | RealHarness) -> None:
    """Progress a task reports reaches on_progress, in order, before the result."""
    seen: list[Any] = []
    d = harness.pool.send_task("count", kwargs={"n": 3}, on_progress=seen.append)
    assert outcome(run(harness, d)) == 3
    assert seen == [{"done": 0}, {"done": 1}, {"done": 2}]


@pytest.mark.parametrize("timeout", [0, -1, float("inf")])
def test_bad_timeout_rejected(harness: FakeHarness | RealHarness, timeout: float) -> None:
    """A timeout that is not a positive finite number raises ValueError at once."""
    with pytest.raises(ValueError):
        harness.pool.send_task("add", (1, 2), timeout=timeout)


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


def test_tasks_mode_progress_is_worker_supplied() -> None:
    """With tasks, a caller may not pass the progress argument itself."""
    pool = FakeTaskPool(tasks=TASKS)
    error = error_of(pool.send_task("count", kwargs={"n": 1, "progress": None}))
    assert error.code == wire.BAD_ARGUMENTS
