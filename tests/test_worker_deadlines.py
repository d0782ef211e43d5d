"""
Where a request's deadline starts (docs/protocol.rst, "Deadlines"): it is counted
from when the worker starts the request, so time spent waiting before that does
not count.  A ``TaskServerFactory`` on a ``Clock``; connections on ``StringTransport``.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from taskoffload.registry import TaskRegistry
from taskoffload.worker import ISyncDeadlines, TaskServerFactory, TaskServerProtocol
from tests._trial_bridge import pytest_module


class Held:
    """
    A task ``hold`` whose Deferreds the test fires, a synchronous ``quick``, and
    ``slow_start``, whose synchronous part takes 1.5 s of the clock before it
    returns a Deferred that the test fires.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.waiting: list[Deferred[Any]] = []
        self.clock = clock

    def registry(self) -> TaskRegistry:
        def hold() -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.waiting.append(d)
            return d

        def quick() -> str:
            return "quick"

        def slow_start() -> Deferred[Any]:
            assert self.clock is not None
            self.clock.advance(1.5)
            return hold()

        return TaskRegistry.from_functions([hold, quick, slow_start])


@implementer(ISyncDeadlines)
class ArmedFor:
    """Records the seconds each synchronous task was given (what SIGALRM would get)."""

    def __init__(self) -> None:
        self.armed: list[float] = []

    def arm(self, seconds: float) -> None:
        self.armed.append(seconds)

    def disarm(self) -> None:
        pass


def connect(factory: TaskServerFactory) -> tuple[TaskServerProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, TaskServerProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def send(protocol: TaskServerProtocol, **request: Any) -> None:
    protocol.dataReceived(orjson.dumps(request) + b"\n")


def replies(transport: StringTransport) -> dict[Any, dict[str, Any]]:
    """The final replies written so far, by request id."""
    return {r["id"]: r for r in map(orjson.loads, transport.value().splitlines())}


def test_time_the_synchronous_part_took_counts() -> None:
    """The deadline runs from the start of the task, its synchronous part included: a
    task that spends 1.5 s before returning a Deferred has 0.5 s of a 2 s timeout left."""
    clock = Clock()
    held = Held(clock)
    protocol, transport = connect(TaskServerFactory(held.registry(), clock))
    send(protocol, id=1, function="slow_start", timeout=2)
    clock.advance(0.4)
    assert replies(transport) == {}
    clock.advance(0.1)
    assert replies(transport)[1]["error"]["code"] == "timeout"


def test_time_queued_on_the_connection_does_not_count() -> None:
    """A request queued 10 s behind another on its connection still gets its whole 2 s
    timeout once it starts."""
    held, clock = Held(), Clock()
    protocol, transport = connect(TaskServerFactory(held.registry(), clock))
    send(protocol, id=1, function="hold")
    send(protocol, id=2, function="hold", timeout=2)
    clock.advance(10)
    assert replies(transport) == {}
    held.waiting[0].callback("first")
    assert replies(transport) == {1: {"id": 1, "result": "first"}}
    clock.advance(1.9)
    assert list(replies(transport)) == [1]
    clock.advance(0.1)
    assert replies(transport)[2]["error"]["code"] == "timeout"


def test_time_queued_does_not_shorten_a_synchronous_deadline() -> None:
    """A synchronous request queued 10 s behind another on its connection is given its
    whole 2 s timeout (the alarm that interrupts synchronous tasks)."""
    held, clock, deadlines = Held(), Clock(), ArmedFor()
    factory = TaskServerFactory(held.registry(), clock, sync_deadlines=deadlines)
    protocol, transport = connect(factory)
    send(protocol, id=1, function="hold")
    send(protocol, id=2, function="quick", timeout=2)
    clock.advance(10)
    held.waiting[0].callback("first")
    assert deadlines.armed == [2.0]
    assert replies(transport)[2] == {"id": 2, "result": "quick"}


def test_time_waiting_for_a_free_slot_does_not_count() -> None:
    """A request that waits 10 s for the worker's one slot (busy with another
    connection's task) still gets its whole 2 s timeout once it starts."""
    held, clock = Held(), Clock()
    factory = TaskServerFactory(held.registry(), clock, concurrency=1)
    first, first_transport = connect(factory)
    second, second_transport = connect(factory)
    send(first, id=1, function="hold")
    send(second, id=2, function="hold", timeout=2)
    clock.advance(10)
    assert replies(second_transport) == {}
    held.waiting[0].callback("first")
    assert replies(first_transport) == {1: {"id": 1, "result": "first"}}
    clock.advance(1.9)
    assert replies(second_transport) == {}
    clock.advance(0.1)
    assert replies(second_transport)[2]["error"]["code"] == "timeout"


def test_time_waiting_for_a_free_slot_does_not_shorten_a_synchronous_deadline() -> None:
    """A synchronous request that waits 10 s for the worker's one slot is given its whole
    2 s timeout (the alarm that interrupts synchronous tasks) once it starts."""
    held, clock, deadlines = Held(), Clock(), ArmedFor()
    factory = TaskServerFactory(held.registry(), clock, concurrency=1, sync_deadlines=deadlines)
    first, _ = connect(factory)
    second, second_transport = connect(factory)
    send(first, id=1, function="hold")
    send(second, id=2, function="quick", timeout=2)
    clock.advance(10)
    held.waiting[0].callback("first")
    assert deadlines.armed == [2.0]
    assert replies(second_transport)[2] == {"id": 2, "result": "quick"}


testSuite = pytest_module(__file__)
