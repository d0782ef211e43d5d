"""
The :class:`~taskoffload.client.ITaskPool` contract: what a caller (the gateway, a
user's code) can tell about a pool, run once on :class:`FakeTaskPool` with
``tasks`` and once on the real thing: a :class:`TaskClient` on a
``MemoryReactorClock`` whose connections ``iosim`` completes to a real
``TaskServerFactory`` serving the same functions.  Each test is a place where the
fake once behaved differently, or a behaviour both must keep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.test.iosim import ConnectionCompleter, IOPump
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.client import ITaskPool, TaskClient
from taskoffload.registry import TaskRegistry, task
from taskoffload.testing import FakeTaskPool
from taskoffload.worker import TaskServerFactory
from tests._trial_bridge import pytest_module
from tests.outcomes import error_of, outcome

PORT = 12345


class Opaque:
    """A value JSON cannot carry, with a repr that does not change between runs."""

    def __repr__(self) -> str:
        return "Opaque()"


#: What the ``result`` task returns, by name, and what the caller gets for it.
RESULTS: dict[str, tuple[Any, Any]] = {
    "tuple": ((1, (2, 3)), [1, [2, 3]]),
    "int_keys": ({1: "a"}, {"1": "a"}),
    "nan": (float("nan"), None),
}


@task(timeout=1)
def slow() -> Deferred[None]:
    """A task registered with a one-second deadline that never ends by itself."""
    return Deferred()


class Tasks:
    """The task functions both pools serve, and what the tasks saw."""

    def __init__(self) -> None:
        #: The Deferreds ``wait`` returned, not yet fired, oldest first.
        self.running: list[Deferred[Any]] = []
        #: How many ``wait`` calls were cancelled while they ran.
        self.cancelled = 0
        #: The arguments ``received`` ran with, in order.
        self.seen: list[Any] = []

    def functions(self) -> dict[str, Callable[..., Any]]:
        """Every task, by the name a worker registers it under."""
        functions = [
            self.add,
            self.echo,
            self.boom,
            self.count,
            self.received,
            self.result,
            self.report,
            self.wait,
            slow,
        ]
        return {f.__name__: f for f in functions}

    def add(self, a: int, b: int) -> int:
        return a + b

    def echo(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def boom(self, message: str = "boom") -> None:
        raise ValueError(message)

    def count(self, n: int, progress: Callable[[Any], None]) -> int:
        for i in range(n):
            progress({"done": i})
        return n

    def received(self, value: Any) -> str:
        """The argument as the task got it."""
        self.seen.append(value)
        return repr(value)

    def result(self, name: str) -> Any:
        return RESULTS[name][0] if name in RESULTS else Opaque()

    def report(self, progress: Callable[[Any], None]) -> None:
        progress((1, 2))
        progress(Opaque())

    def wait(self) -> Deferred[Any]:
        def cancelled(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancelled)
        self.running.append(d)
        return d


class Harness(Protocol):
    """A pool, and the means to let it work."""

    pool: ITaskPool

    def settle(self) -> None:
        """Let the pool answer what it can without time passing."""

    def advance(self, seconds: float) -> None:
        """Settle, let ``seconds`` pass, and settle again."""


class FakeHarness:
    """The fake pool, with a clock for its timeouts; it answers at once."""

    def __init__(
        self,
        tasks: dict[str, Callable[..., Any]],
        timeout: float | None = None,
        slots: int | None = None,
        prefetch: int = 0,
    ) -> None:
        self.clock = Clock()
        self.pool = FakeTaskPool(
            tasks, clock=self.clock, timeout=timeout, slots=slots, prefetch=prefetch
        )

    def settle(self) -> None:
        """Nothing to move: the fake has answered what it can."""

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class RealHarness:
    """A real client and worker server joined by in-memory connections."""

    def __init__(
        self,
        tasks: dict[str, Callable[..., Any]],
        timeout: float | None = None,
        slots: int | None = None,
        prefetch: int = 0,
    ) -> None:
        self.clock = MemoryReactorClock()
        server = TaskServerFactory(
            TaskRegistry.from_functions(tasks.values()),
            self.clock,
            concurrency=4,
            pool_slots=slots,
        )
        self.clock.listenTCP(PORT, server)
        self.pool = TaskClient(
            self.clock, [f"tcp:127.0.0.1:{PORT}"], timeout=timeout, prefetch=prefetch
        )
        self._completer = ConnectionCompleter(self.clock)
        self._pumps: list[IOPump] = []

    def settle(self) -> None:
        """Complete the client's connection attempts and move bytes until quiet."""
        for _ in range(100):
            while self.clock.tcpClients:
                pump = self._completer.succeedOnce()
                assert isinstance(pump, IOPump), "a connection attempt the test did not complete"
                self._pumps.append(pump)
            moved = [pump.flush() for pump in self._pumps]
            if not any(moved) and not self.clock.tcpClients:
                return
        raise AssertionError("the client and the server never went quiet")

    def advance(self, seconds: float) -> None:
        # What the pool does at once happens first: the request reaches the
        # worker, whose deadline starts then.
        self.settle()
        self.clock.advance(seconds)
        self.settle()


@pytest.fixture
def tasks() -> Tasks:
    """The tasks of one test, served by whichever pool it runs on."""
    return Tasks()


@pytest.fixture(params=["fake", "real"])
def make_harness(request: pytest.FixtureRequest, tasks: Tasks) -> Callable[..., Harness]:
    """Each contract test runs on the fake pool and on a real client and server."""
    kind: type[FakeHarness | RealHarness] = FakeHarness if request.param == "fake" else RealHarness
    return lambda **options: kind(tasks.functions(), **options)


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    """A pool of the default size and with no default timeout."""
    return make_harness()


def answer(harness: Harness, d: Deferred[Any]) -> Any:
    """Let ``harness`` answer, then give back what ``d`` fired with."""
    harness.settle()
    return outcome(d)


def error(harness: Harness, d: Deferred[Any]) -> tuple[str, str, str | None]:
    """Let ``harness`` answer, then give back the code, message and type ``d`` failed with."""
    harness.settle()
    e = error_of(d)
    return e.code, e.message, e.type


# What the pool is


def test_provides_interface(harness: Harness) -> None:
    """The pool provides ITaskPool, slots() and capacity() included."""
    assert verifyObject(ITaskPool, harness.pool)


def test_size_unknown_until_the_pool_says(harness: Harness) -> None:
    """A pool that has not said its size reports None for its slots and its capacity."""
    answer(harness, harness.pool.send_task("add", (1, 2)))
    assert (harness.pool.slots(), harness.pool.capacity()) == (None, None)


def test_size_once_the_pool_says(make_harness: Callable[..., Harness]) -> None:
    """A pool of 3 slots, prefetching 1, reports 3 slots and a capacity of 6."""
    harness = make_harness(slots=3, prefetch=1)
    answer(harness, harness.pool.send_task("add", (1, 2)))
    assert (harness.pool.slots(), harness.pool.capacity()) == (3, 6)


# Calls and their outcomes


def test_call_resolves_with_result(harness: Harness) -> None:
    """A call's Deferred fires with the task's result."""
    assert answer(harness, harness.pool.send_task("add", (2, 3))) == 5


def test_call_shorthand_passes_arguments(harness: Harness) -> None:
    """call() passes positional and keyword arguments through."""
    positional = harness.pool.call("add", 1, 2)
    keywords = harness.pool.call("echo", a=1, b=[2])
    harness.settle()
    assert outcome(positional) == 3
    assert outcome(keywords) == {"a": 1, "b": [2]}


def test_task_raises_task_failed(harness: Harness) -> None:
    """A task that raises fails the call with task_failed, its message and type."""
    d = harness.pool.send_task("boom", kwargs={"message": "no"})
    assert error(harness, d) == (wire.TASK_FAILED, "no", "ValueError")


def test_unknown_function(harness: Harness) -> None:
    """An unregistered name fails with unknown_function and the registry's message."""
    d = harness.pool.send_task("nope")
    assert error(harness, d) == (wire.UNKNOWN_FUNCTION, "no task named 'nope'", None)


def test_bad_arguments(harness: Harness) -> None:
    """Arguments that do not fit fail with bad_arguments and the registry's message."""
    d = harness.pool.send_task("add", (1,))
    message = "add(a, b): missing a required argument: 'b'"
    assert error(harness, d) == (wire.BAD_ARGUMENTS, message, None)


def test_progress_argument_is_worker_supplied(harness: Harness) -> None:
    """A caller may not pass a task's progress argument itself."""
    d = harness.pool.send_task("count", kwargs={"n": 1, "progress": None})
    message = "count: 'progress' is supplied by the worker, not the caller"
    assert error(harness, d) == (wire.BAD_ARGUMENTS, message, None)


@pytest.mark.parametrize(
    ("value", "received"),
    [((1, (2, 3)), "[1, [2, 3]]"), ({1: "a"}, "{'1': 'a'}"), (float("nan"), "None")],
)
def test_arguments_arrive_as_json(harness: Harness, value: Any, received: str) -> None:
    """A task gets its arguments as JSON carries them: tuples as lists, keys as strings."""
    assert answer(harness, harness.pool.send_task("received", (value,))) == received


def test_unencodable_arguments(harness: Harness, tasks: Tasks) -> None:
    """Arguments JSON cannot carry fail the call with bad_request, and run no task."""
    d = harness.pool.send_task("received", (Opaque(),))
    message = "the arguments cannot be sent as JSON: Object of type Opaque is not JSON serializable"
    assert error(harness, d) == (wire.BAD_REQUEST, message, None)
    assert tasks.seen == []


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_results_arrive_as_json(harness: Harness, name: str) -> None:
    """The caller gets a result as JSON carries it: tuples as lists, keys as strings."""
    assert answer(harness, harness.pool.send_task("result", (name,))) == RESULTS[name][1]


def test_unencodable_result(harness: Harness) -> None:
    """A result JSON cannot carry fails the call with task_failed, typed TypeError."""
    d = harness.pool.send_task("result", ("opaque",))
    message = (
        "the task's result is not JSON-serializable: Object of type Opaque is not JSON serializable"
    )
    assert error(harness, d) == (wire.TASK_FAILED, message, "TypeError")


def test_deferred_task_answers_when_it_fires(harness: Harness, tasks: Tasks) -> None:
    """A task that returns a Deferred is answered with what that Deferred fires with."""
    d = harness.pool.send_task("wait")
    harness.settle()
    assert not d.called
    tasks.running[0].callback((1, 2))
    assert answer(harness, d) == [1, 2]


# Progress


def test_progress_reaches_caller(harness: Harness) -> None:
    """Progress a task reports reaches on_progress, in order, before the result."""
    seen: list[Any] = []
    d = harness.pool.send_task("count", kwargs={"n": 3}, on_progress=seen.append)
    assert answer(harness, d) == 3
    assert seen == [{"done": 0}, {"done": 1}, {"done": 2}]


def test_progress_arrives_as_json(harness: Harness) -> None:
    """Progress arrives as JSON carries it, and what JSON cannot carry as its repr."""
    seen: list[Any] = []
    d = harness.pool.send_task("report", on_progress=seen.append)
    assert answer(harness, d) is None
    assert seen == [[1, 2], "Opaque()"]


def test_on_progress_error_is_logged_not_the_tasks(harness: Harness) -> None:
    """What on_progress raises is logged, and the task runs on to its result."""

    def broken(value: Any) -> None:
        raise RuntimeError("caller bug")

    with capturedLogs() as events:
        d = harness.pool.send_task("count", kwargs={"n": 2}, on_progress=broken)
        assert answer(harness, d) == 2
    logged = [formatEvent(e) for e in events if "log_failure" in e]
    assert logged == ["on_progress of 'count' raised"] * 2


# Giving up: timeouts and cancels


def test_timeout(harness: Harness, tasks: Tasks) -> None:
    """A call not answered within its timeout fails with timeout, and its task is cancelled."""
    d = harness.pool.send_task("wait", timeout=2)
    harness.advance(1.5)
    assert not d.called
    harness.advance(0.5)
    assert error(harness, d) == (wire.TIMEOUT, "no reply within 2 seconds", None)
    assert tasks.cancelled == 1


def test_default_timeout(make_harness: Callable[..., Harness]) -> None:
    """A call that gives no timeout is held to the pool's default."""
    harness = make_harness(timeout=3)
    d = harness.pool.send_task("wait")
    harness.advance(3)
    assert error(harness, d) == (wire.TIMEOUT, "no reply within 3 seconds", None)


def test_registered_timeout(harness: Harness) -> None:
    """A call that gives no timeout is held to its task's registered one."""
    d = harness.pool.send_task("slow")
    harness.advance(1)
    assert error(harness, d) == (wire.TIMEOUT, "slow did not finish within 1 s", None)


def test_cancel(harness: Harness, tasks: Tasks) -> None:
    """Cancelling a call fails it with cancelled at once, and cancels its running task."""
    d = harness.pool.send_task("wait")
    harness.settle()
    d.cancel()
    e = error_of(d)
    assert (e.code, e.message, e.type) == (wire.CANCELLED, "cancelled by the caller", None)
    harness.settle()
    assert tasks.cancelled == 1


@pytest.mark.parametrize("timeout", [0, -1, float("inf")])
def test_bad_timeout_rejected(harness: Harness, timeout: float) -> None:
    """A timeout that is not a positive finite number raises ValueError at once."""
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        harness.pool.send_task("add", (1, 2), timeout=timeout)


def test_close(harness: Harness, tasks: Tasks) -> None:
    """close() fails the call in flight with worker_lost and cancels its task; the
    Deferred it returns fires; a call made after it fails the same way at once."""
    d = harness.pool.send_task("wait")
    harness.settle()
    closed = harness.pool.close()
    harness.settle()
    e = error_of(d)
    assert (e.code, e.message) == (wire.WORKER_LOST, "client closed")
    assert outcome(closed) is None
    assert tasks.cancelled == 1
    later = error_of(harness.pool.send_task("add", (1, 2)))
    assert (later.code, later.message) == (wire.WORKER_LOST, "client closed")


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
