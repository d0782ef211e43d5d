"""
Unit tests for :mod:`taskoffload.worker`: a ``TaskServerFactory`` over small test
tasks and a ``Clock``, each connection a protocol on a ``StringTransport`` that the
tests write request lines into and read reply lines from.  (The acceptor's tests
are in ``test_acceptor.py``, the runner's in ``test_running.py``.)
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.registry import TaskRegistry, load_tasks, task
from taskoffload.settings import WorkerSettings
from taskoffload.worker import (
    RESERVATION_SECONDS,
    DeadlineExceeded,
    ISyncDeadlines,
    TaskServerFactory,
    TaskServerProtocol,
)
from tests._trial_bridge import pytest_module
from tests.fake_deadlines import RecordingDeadlines


class Tasks:
    """
    The tasks a test server runs.  Deferred-returning tasks leave their Deferreds
    in :attr:`waiting`, for the test to fire; cancelling one records its label.
    """

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []
        self.cancelled: list[str] = []
        self.ran: list[str] = []

    def _deferred(self, label: str) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(label))
        self.waiting.append(d)
        return d

    def registry(self) -> TaskRegistry:
        """A registry of one task of each kind."""

        def add(a: int, b: int) -> int:
            self.ran.append("add")
            return a + b

        def wait(label: str = "wait") -> Deferred[Any]:
            self.ran.append(label)
            return self._deferred(label)

        async def double(x: int) -> int:
            return 2 * x

        async def double_later(x: int) -> int:
            value = await self._deferred("double_later")
            return 2 * x + value

        def count(n: int, progress: Any) -> int:
            for i in range(n):
                progress({"done": i})
            return n

        def boom(message: str = "boom") -> None:
            raise ValueError(message)

        @task(timeout=5)
        def slow() -> Deferred[Any]:
            return self._deferred("slow")

        return TaskRegistry.from_functions([add, wait, double, double_later, count, boom, slow])


class Connection:
    """One client's connection to the task server."""

    def __init__(self, factory: TaskServerFactory) -> None:
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, TaskServerProtocol)
        self.protocol = protocol
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)

    def send(self, message: dict[str, Any] | bytes) -> None:
        """Write one line: a message as JSON, or raw bytes as they are."""
        line = message if isinstance(message, bytes) else orjson.dumps(message)
        self.protocol.dataReceived(line + b"\n")

    def call(self, function: str, request_id: Any = 1, **fields: Any) -> None:
        """Send a request for ``function``."""
        self.send({"id": request_id, "function": function, **fields})

    def replies(self) -> list[dict[str, Any]]:
        """Every reply line the server wrote so far, decoded."""
        return [orjson.loads(line) for line in self.transport.value().splitlines()]

    def drop(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class Server:
    """A task server factory on a fake clock, recording capacity changes."""

    def __init__(self, concurrency: int = 1, max_message: int = wire.DEFAULT_MAX_MESSAGE):
        self.tasks = Tasks()
        self.clock = Clock()
        self.capacity: list[bool] = []
        self.factory = TaskServerFactory(
            self.tasks.registry(),
            self.clock,
            WorkerSettings(concurrency=concurrency, max_message=max_message),
            capacity_changed=self.capacity.append,
        )

    def connect(self) -> Connection:
        """Open a new connection."""
        return Connection(self.factory)


def fired(d: Deferred[Any]) -> bool:
    """Whether ``d`` has fired (with a result, not a failure)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert not any(isinstance(r, Failure) for r in results), results
    return bool(results)


@pytest.fixture
def server() -> Server:
    return Server()


def error_of(reply: dict[str, Any]) -> tuple[Any, str]:
    """``(id, code)`` of an error reply."""
    return reply["id"], reply["error"]["code"]


# Replies


def test_result(server: Server) -> None:
    """A request for a synchronous task is answered with its result."""
    connection = server.connect()
    connection.call("add", 7, args={"a": 1, "b": 2})
    assert connection.replies() == [{"id": 7, "result": 3}]


def test_positional_arguments(server: Server) -> None:
    """Arguments given as a list bind positionally."""
    connection = server.connect()
    connection.call("add", args=[40, 2])
    assert connection.replies() == [{"id": 1, "result": 42}]


@pytest.mark.parametrize("request_id", ["job-1", 7, 2.5])
def test_id_echoed(server: Server, request_id: Any) -> None:
    """The reply carries the request's id, string or number, unchanged."""
    connection = server.connect()
    connection.call("add", request_id, args=[1, 1])
    assert connection.replies() == [{"id": request_id, "result": 2}]


def test_absent_id_is_null(server: Server) -> None:
    """A request without an id is answered with ``"id": null``."""
    connection = server.connect()
    connection.send({"function": "add", "args": [1, 1]})
    assert connection.replies() == [{"id": None, "result": 2}]


@pytest.mark.parametrize(
    ("line", "request_id"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"add"', None),
        (b'{"id": 3}', 3),
        (b'{"id": 3, "function": "add", "args": 5}', 3),
        (b'{"id": 3, "function": "add", "colour": "red"}', 3),
        (b'{"id": 3, "function": "add", "timeout": -1}', 3),
        (b"", None),
        (b"   ", None),
        (b'{"id": "\xff\xfe", "function": "add"}', None),
        (b"\xff\xfe", None),
    ],
    ids=[
        "bad-json",
        "array",
        "string",
        "missing-function",
        "bad-args",
        "unknown-field",
        "bad-timeout",
        "empty",
        "blank",
        "invalid-utf8-in-string",
        "invalid-utf8",
    ],
)
def test_bad_request(server: Server, line: bytes, request_id: Any) -> None:
    """A line that is not a valid request gets bad_request; the connection serves on."""
    connection = server.connect()
    connection.send(line)
    connection.call("add", 9, args=[1, 2])
    reply, result = connection.replies()
    assert error_of(reply) == (request_id, wire.BAD_REQUEST)
    assert reply["error"]["message"]
    assert result == {"id": 9, "result": 3}
    assert not connection.transport.disconnecting


def test_crlf_line(server: Server) -> None:
    """A request ending in CR LF is served like one ending in LF."""
    connection = server.connect()
    connection.protocol.dataReceived(b'{"id": 1, "function": "add", "args": [1, 2]}\r\n')
    assert connection.replies() == [{"id": 1, "result": 3}]


def test_batch_rejected(server: Server) -> None:
    """A batch request sent to a worker gets bad_request: only the gateway serves batches."""
    connection = server.connect()
    connection.call("add", 4, batch=[[1, 2]])
    [reply] = connection.replies()
    assert error_of(reply) == (4, wire.BAD_REQUEST)
    assert "gateway" in reply["error"]["message"]
    assert server.tasks.ran == []


def test_unknown_function(server: Server) -> None:
    """A request for a name that is not registered gets unknown_function."""
    connection = server.connect()
    connection.call("os.system", 5, args=["true"])
    [reply] = connection.replies()
    assert error_of(reply) == (5, wire.UNKNOWN_FUNCTION)
    assert "os.system" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("function", "args"),
    [
        ("add", {"a": 1}),
        ("add", [1, 2, 3]),
        ("add", {"a": 1, "b": 2, "c": 3}),
        ("count", {"n": 1, "progress": "mine"}),
    ],
    ids=["missing", "too-many", "unexpected-keyword", "caller-progress"],
)
def test_bad_arguments(server: Server, function: str, args: Any) -> None:
    """Arguments that do not fit the signature get bad_arguments; the task does not run."""
    connection = server.connect()
    connection.call(function, 6, args=args)
    [reply] = connection.replies()
    assert error_of(reply) == (6, wire.BAD_ARGUMENTS)
    assert function in reply["error"]["message"]
    assert server.tasks.ran == []


def test_task_failed(server: Server) -> None:
    """A task that raises gets task_failed with its type and message, and is logged."""
    connection = server.connect()
    with capturedLogs() as events:
        connection.call("boom", 8, args={"message": "disk on fire"})
    assert connection.replies() == [
        {
            "id": 8,
            "error": {"code": "task_failed", "message": "disk on fire", "type": "ValueError"},
        }
    ]
    [logged] = [e for e in events if e.get("log_failure") is not None]
    assert logged["log_level"] == LogLevel.warn
    assert logged["function"] == "boom"
    assert logged["log_failure"].check(ValueError)


def test_failed_deferred(server: Server) -> None:
    """A task whose Deferred fails gets task_failed with the error's type."""
    connection = server.connect()
    connection.call("wait", 2)
    with capturedLogs():
        server.tasks.waiting[0].errback(KeyError("missing"))
    [reply] = connection.replies()
    assert error_of(reply) == (2, wire.TASK_FAILED)
    assert reply["error"]["type"] == "KeyError"


def test_progress(server: Server) -> None:
    """A task with a progress parameter sends progress messages, then its result."""
    connection = server.connect()
    connection.call("count", "c", args={"n": 3})
    assert connection.replies() == [
        {"id": "c", "progress": {"done": 0}},
        {"id": "c", "progress": {"done": 1}},
        {"id": "c", "progress": {"done": 2}},
        {"id": "c", "result": 3},
    ]


def test_async_task(server: Server) -> None:
    """An ``async def`` task is answered with the value it returns."""
    connection = server.connect()
    connection.call("double", args=[21])
    assert connection.replies() == [{"id": 1, "result": 42}]


def test_async_task_awaiting(server: Server) -> None:
    """An ``async def`` task that awaits is answered once what it awaits fires."""
    connection = server.connect()
    connection.call("double_later", args=[20])
    assert connection.replies() == []
    server.tasks.waiting[0].callback(2)
    assert connection.replies() == [{"id": 1, "result": 42}]


def test_deferred_task(server: Server) -> None:
    """A task returning a Deferred is answered only when the Deferred fires."""
    connection = server.connect()
    connection.call("wait", 3)
    assert connection.replies() == []
    server.tasks.waiting[0].callback({"done": True})
    assert connection.replies() == [{"id": 3, "result": {"done": True}}]


def test_requests_run_in_order(server: Server) -> None:
    """Requests on one connection run in order: the second waits for the first."""
    connection = server.connect()
    connection.call("wait", 1, args={"label": "first"})
    connection.call("wait", 2, args={"label": "second"})
    assert server.tasks.ran == ["first"]
    server.tasks.waiting[0].callback("one")
    assert server.tasks.ran == ["first", "second"]
    server.tasks.waiting[1].callback("two")
    assert connection.replies() == [{"id": 1, "result": "one"}, {"id": 2, "result": "two"}]


def test_idless_replies_in_request_order(server: Server) -> None:
    """Replies to requests without ids come back in the order they were sent."""
    connection = server.connect()
    connection.send({"function": "wait"})
    connection.send({"function": "add", "args": [1, 2]})
    server.tasks.waiting[0].callback("first")
    assert connection.replies() == [{"id": None, "result": "first"}, {"id": None, "result": 3}]


# Cancelling and deadlines


def test_cancel_running(server: Server) -> None:
    """Cancelling a running task cancels its Deferred and answers ``cancelled``."""
    connection = server.connect()
    connection.call("wait", "w")
    connection.send({"cancel": "w"})
    assert connection.replies() == [
        {"id": "w", "error": {"code": "cancelled", "message": "cancelled while it ran"}}
    ]
    assert server.tasks.cancelled == ["wait"]


def test_cancel_running_async(server: Server) -> None:
    """Cancelling an ``async def`` task cancels what it awaits and answers ``cancelled``."""
    connection = server.connect()
    connection.call("double_later", 4, args=[1])
    connection.send({"cancel": 4})
    [reply] = connection.replies()
    assert error_of(reply) == (4, wire.CANCELLED)
    assert server.tasks.cancelled == ["double_later"]


def test_cancel_queued(server: Server) -> None:
    """Cancelling a queued request answers cancelled at once; it never runs."""
    connection = server.connect()
    connection.call("wait", 1, args={"label": "first"})
    connection.call("wait", 2, args={"label": "second"})
    connection.send({"cancel": 2})
    assert connection.replies() == [
        {"id": 2, "error": {"code": "cancelled", "message": "cancelled before it ran"}}
    ]
    server.tasks.waiting[0].callback("done")
    assert connection.replies()[1:] == [{"id": 1, "result": "done"}]
    assert server.tasks.ran == ["first"]
    assert server.tasks.cancelled == []


def test_cancel_unknown(server: Server) -> None:
    """Cancelling an id that is not in flight writes nothing and disturbs nothing."""
    connection = server.connect()
    connection.call("wait", 1)
    connection.send({"cancel": 99})
    assert connection.replies() == []
    server.tasks.waiting[0].callback("ok")
    assert connection.replies() == [{"id": 1, "result": "ok"}]


def test_cancel_answered(server: Server) -> None:
    """Cancelling a request already answered writes nothing more."""
    connection = server.connect()
    connection.call("add", 1, args=[1, 2])
    connection.send({"cancel": 1})
    assert connection.replies() == [{"id": 1, "result": 3}]


def test_request_timeout(server: Server) -> None:
    """A request's ``timeout`` cancels its task when it passes and answers ``timeout``."""
    connection = server.connect()
    connection.call("wait", 5, timeout=2.5)
    server.clock.advance(2.4)
    assert connection.replies() == []
    server.clock.advance(0.1)
    [reply] = connection.replies()
    assert error_of(reply) == (5, wire.TIMEOUT)
    assert "2.5" in reply["error"]["message"]
    assert server.tasks.cancelled == ["wait"]


def test_task_timeout(server: Server) -> None:
    """A task's ``@task(timeout=...)`` applies to requests that give none."""
    connection = server.connect()
    connection.call("slow", 6)
    server.clock.advance(4.9)
    assert connection.replies() == []
    server.clock.advance(0.1)
    [reply] = connection.replies()
    assert error_of(reply) == (6, wire.TIMEOUT)
    assert server.tasks.cancelled == ["slow"]


def test_request_timeout_overrides_task_timeout(server: Server) -> None:
    """A request's own ``timeout`` wins over the task's default."""
    connection = server.connect()
    connection.call("slow", 6, timeout=1)
    server.clock.advance(1)
    [reply] = connection.replies()
    assert error_of(reply) == (6, wire.TIMEOUT)


def test_finished_before_timeout(server: Server) -> None:
    """A task done in time gets its result, and nothing more at the deadline."""
    connection = server.connect()
    connection.call("wait", 5, timeout=2)
    server.tasks.waiting[0].callback("quick")
    server.clock.advance(10)
    assert connection.replies() == [{"id": 5, "result": "quick"}]
    assert server.clock.getDelayedCalls() == []


def test_next_request_after_timeout(server: Server) -> None:
    """After a request times out, the next one on the connection runs."""
    connection = server.connect()
    connection.call("wait", 1, timeout=1)
    connection.call("add", 2, args=[1, 2])
    server.clock.advance(1)
    assert [r["id"] for r in connection.replies()] == [1, 2]
    assert connection.replies()[1] == {"id": 2, "result": 3}


# Connection limits and loss


def test_oversize_line() -> None:
    """A line over max_message gets bad_request, then the connection closes."""
    server = Server(max_message=64)
    connection = server.connect()
    connection.protocol.dataReceived(b'{"function": "add", "args": [' + b"1," * 64)
    connection.send({"id": 1, "function": "add", "args": [1, 2]})
    [reply] = connection.replies()
    assert error_of(reply) == (None, wire.BAD_REQUEST)
    assert "64" in reply["error"]["message"]
    assert connection.transport.disconnecting
    assert server.tasks.ran == []


def test_oversize_line_with_delimiter() -> None:
    """An over-long line that arrives whole, delimiter included, is rejected the same way."""
    server = Server(max_message=64)
    connection = server.connect()
    connection.call("add", 1, args={"a": "x" * 100, "b": ""})
    [reply] = connection.replies()
    assert error_of(reply) == (None, wire.BAD_REQUEST)
    assert connection.transport.disconnecting


def test_line_at_limit() -> None:
    """A line of exactly ``max_message`` bytes is served."""
    line = orjson.dumps({"id": 1, "function": "add", "args": [1, 2]})
    server = Server(max_message=len(line))
    connection = server.connect()
    connection.send(line)
    assert connection.replies() == [{"id": 1, "result": 3}]


def test_connection_lost_cancels_running(server: Server) -> None:
    """A lost connection cancels its running task; queued ones never run."""
    connection = server.connect()
    connection.call("wait", 1, args={"label": "first"})
    connection.call("wait", 2, args={"label": "second"})
    connection.drop()
    assert server.tasks.cancelled == ["first"]
    assert server.tasks.ran == ["first"]
    assert connection.replies() == []


def test_concurrency_is_a_hard_bound(server: Server) -> None:
    """With concurrency 1, a second connection's task waits until the first finishes."""
    first, second = server.connect(), server.connect()
    first.call("wait", 1, args={"label": "first"})
    second.call("wait", 2, args={"label": "second"})
    assert server.tasks.ran == ["first"]
    server.tasks.waiting[0].callback("a")
    assert server.tasks.ran == ["first", "second"]
    server.tasks.waiting[1].callback("b")
    assert first.replies() == [{"id": 1, "result": "a"}]
    assert second.replies() == [{"id": 2, "result": "b"}]


def test_cancel_waiting_for_slot(server: Server) -> None:
    """A request waiting for a free slot can be cancelled; it never runs."""
    first, second = server.connect(), server.connect()
    first.call("wait", 1, args={"label": "first"})
    second.call("wait", 2, args={"label": "second"})
    second.send({"cancel": 2})
    [reply] = second.replies()
    assert error_of(reply) == (2, wire.CANCELLED)
    server.tasks.waiting[0].callback("a")
    assert server.tasks.ran == ["first"]


def test_reject_when_busy() -> None:
    """With reject_when_busy, a request meeting full slots gets overloaded, unrun."""
    server = Server()
    busy, asking = server.connect(), server.connect()
    asking.send({"session": {"reject_when_busy": True}})
    busy.call("wait", 1)
    asking.call("add", 2, args=[1, 2])
    [reply] = [r for r in asking.replies() if "id" in r]
    assert error_of(reply) == (2, wire.OVERLOADED)
    assert reply["error"]["type"] == wire.WORKER_BUSY
    assert server.tasks.ran == ["wait"]


def test_reject_when_busy_served_when_free() -> None:
    """A connection that asked for rejection is served normally while a slot is free."""
    server = Server()
    connection = server.connect()
    connection.send({"session": {"reject_when_busy": True}})
    connection.call("add", 2, args=[1, 2])
    assert [r for r in connection.replies() if "id" in r] == [{"id": 2, "result": 3}]


# Capacity


def test_new_connection_reserves_capacity(server: Server) -> None:
    """A new connection takes the capacity until its request is answered."""
    connection = server.connect()
    assert not server.factory.has_capacity
    assert server.capacity == [False]
    connection.call("wait")
    assert server.capacity == [False]
    server.tasks.waiting[0].callback(None)
    assert server.factory.has_capacity
    assert server.capacity == [False, True]


def test_sync_request_frees_capacity(server: Server) -> None:
    """A request answered at once gives the capacity back at once."""
    connection = server.connect()
    connection.call("add", args=[1, 2])
    assert server.factory.has_capacity
    assert server.capacity == [False, True]


def test_reservation_expires(server: Server) -> None:
    """A connection that sends nothing holds its reservation for FIRST_BYTE_SECONDS only."""
    from taskoffload.worker import FIRST_BYTE_SECONDS

    server.connect()
    server.clock.advance(FIRST_BYTE_SECONDS / 2)
    assert not server.factory.has_capacity
    server.clock.advance(FIRST_BYTE_SECONDS / 2)
    assert server.factory.has_capacity
    assert server.capacity == [False, True]


def test_session_line_holds_the_reservation_for_the_first_request(server: Server) -> None:
    """After a TaskClient's session line, the slot is held up to RESERVATION_SECONDS."""
    connection = server.connect()
    connection.send({"session": {"reject_when_busy": True}})
    server.clock.advance(RESERVATION_SECONDS - 0.01)
    assert not server.factory.has_capacity
    server.clock.advance(0.01)
    assert server.factory.has_capacity


def test_silent_connection_closed_after_idle_timeout() -> None:
    """A connection that never sends a whole line is closed after idle_timeout."""
    clock = Clock()
    factory = TaskServerFactory(TaskRegistry.from_functions([]), clock, idle_timeout=5.0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    clock.advance(5.0)
    assert orjson.loads(transport.value())["error"]["code"] == "bad_request"
    assert transport.disconnecting


def test_idle_connection_gives_capacity_back(server: Server) -> None:
    """A connection that was served and stays open does not hold capacity."""
    connection = server.connect()
    connection.call("add", args=[1, 2])
    server.clock.advance(RESERVATION_SECONDS)
    assert server.factory.has_capacity
    assert server.capacity == [False, True]
    assert server.clock.getDelayedCalls() == []


def test_closed_connection_gives_capacity_back(server: Server) -> None:
    """A connection closed before its first request gives its reservation back."""
    connection = server.connect()
    connection.drop()
    assert server.factory.has_capacity
    assert server.capacity == [False, True]
    assert server.clock.getDelayedCalls() == []


def test_capacity_with_concurrency_two() -> None:
    """With concurrency 2, capacity runs out at the second busy connection."""
    server = Server(concurrency=2)
    first = server.connect()
    assert server.factory.has_capacity
    server.connect()
    assert not server.factory.has_capacity
    assert server.capacity == [False]
    first.call("add", args=[1, 2])
    assert server.capacity == [False, True]


def test_drain_waits_for_running_tasks(server: Server) -> None:
    """``drain()`` fires only once every running task has finished."""
    connection = server.connect()
    connection.call("wait")
    drained = server.factory.drain()
    assert not fired(drained)
    server.tasks.waiting[0].callback(None)
    assert fired(drained)


def test_drain_waits_for_reservation(server: Server) -> None:
    """``drain()`` waits for a new connection's first request, up to its reservation."""
    server.connect()
    drained = server.factory.drain()
    assert not fired(drained)
    server.clock.advance(RESERVATION_SECONDS)
    assert fired(drained)


def test_drain_when_idle(server: Server) -> None:
    """``drain()`` fires at once when nothing runs."""
    connection = server.connect()
    connection.call("add", args=[1, 2])
    assert fired(server.factory.drain())


def test_close_all(server: Server) -> None:
    """``close_all()`` closes every connection and fires once they are all gone."""
    connections = [server.connect(), server.connect()]
    closed = server.factory.close_all()
    assert all(c.transport.disconnecting for c in connections)
    connections[0].drop()
    assert not fired(closed)
    connections[1].drop()
    assert fired(closed)


def test_close_all_without_connections(server: Server) -> None:
    """``close_all()`` with no connection fires at once."""
    assert fired(server.factory.close_all())


def test_session_ack_names_retryable_tasks() -> None:
    """The session acknowledgement names the worker and its ``retry=True`` tasks."""
    from taskoffload.registry import TaskRegistry, task

    @task(retry=True)
    def idempotent() -> None: ...

    @task
    def once() -> None: ...

    factory = TaskServerFactory(
        TaskRegistry.from_functions([idempotent, once]), Clock(), worker_id=42
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"session": {"reject_when_busy": true}}\n')
    ack = orjson.loads(transport.value())["session"]
    assert [t["name"] for t in ack.pop("tasks")] == ["idempotent", "once"]
    assert ack == {"worker": 42, "retry": ["idempotent"], "concurrency": 1}


def test_unfinished_line_times_out() -> None:
    """A line left unfinished for ``idle_timeout`` gets ``bad_request`` and a close."""
    clock = Clock()
    factory = TaskServerFactory(TaskRegistry.from_functions([]), clock, idle_timeout=5.0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"function": "no')
    clock.advance(2.0)
    protocol.dataReceived(b"o")  # trickling does not restart the clock
    clock.advance(3.0)
    [reply] = [orjson.loads(line) for line in transport.value().splitlines()]
    assert reply["error"]["code"] == "bad_request"
    assert "no newline within 5 s" in reply["error"]["message"]
    assert transport.disconnecting


def test_finished_line_stops_the_idle_clock() -> None:
    """A line finished in time leaves the connection open, however long it then idles."""
    clock = Clock()
    factory = TaskServerFactory(TaskRegistry.from_functions([]), clock, idle_timeout=5.0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"function": "nope"}')
    clock.advance(4.0)
    protocol.dataReceived(b"\n")
    clock.advance(60.0)
    assert not transport.disconnecting
    assert orjson.loads(transport.value())["error"]["code"] == "unknown_function"


def test_after_task_called_per_final_reply() -> None:
    """The after-task hook runs once per task, after its reply is written."""
    seen: list[bytes] = []

    @task
    def quick() -> int:
        return 1

    transport = StringTransport()
    factory = TaskServerFactory(
        TaskRegistry.from_functions([quick]),
        Clock(),
        after_task=lambda: seen.append(transport.value()),
    )
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"id": 1, "function": "quick"}\n{"id": 2, "function": "quick"}\n')
    assert len(seen) == 2
    assert b'"id":1' in seen[0] and b'"id":2' in seen[1]


def test_sync_deadline_armed_around_the_task() -> None:
    """A task with a timeout runs between arm(timeout) and disarm."""
    deadlines = RecordingDeadlines()
    verifyObject(ISyncDeadlines, deadlines)
    seen: list[Any] = []

    @task
    def quick() -> int:
        seen.append(list(deadlines.calls))
        return 1

    factory = TaskServerFactory(
        TaskRegistry.from_functions([quick]), Clock(), sync_deadlines=deadlines
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"id": 1, "function": "quick", "timeout": 2}\n')
    protocol.dataReceived(b'{"id": 2, "function": "quick"}\n')
    assert seen == [[("arm", 2.0)], [("arm", 2.0), "disarm"]]
    assert deadlines.calls == [("arm", 2.0), "disarm"]


def test_deadline_exceeded_is_a_timeout_reply() -> None:
    """A synchronous task interrupted at its deadline is answered ``timeout``."""

    @task
    def stuck() -> None:
        raise DeadlineExceeded("the task ran past its deadline")

    factory = TaskServerFactory(
        TaskRegistry.from_functions([stuck]),
        Clock(),
        task_timeout=3.0,
        sync_deadlines=RecordingDeadlines(),
    )
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"id": 1, "function": "stuck"}\n')
    reply = orjson.loads(transport.value())
    assert reply["error"]["code"] == "timeout"
    assert "3.0 s" in reply["error"]["message"]


def test_begin_stop_says_goodbye_when_each_connection_is_done() -> None:
    """On stop, an idle connection gets a goodbye at once; a busy one after its reply;
    a request arriving meanwhile on an idle connection is not run."""
    ran: list[str] = []
    release: Deferred[None] = Deferred()

    @task
    def slow() -> Deferred[None]:
        ran.append("slow")
        return release

    @task
    def quick() -> None:
        ran.append("quick")

    factory = TaskServerFactory(TaskRegistry.from_functions([slow, quick]), Clock())
    idle, busy = (factory.buildProtocol(None) for _ in range(2))
    idle_transport, busy_transport = StringTransport(), StringTransport()
    idle.makeConnection(idle_transport)
    busy.makeConnection(busy_transport)
    busy.dataReceived(b'{"id": 1, "function": "slow"}\n')
    factory.begin_stop()
    assert orjson.loads(idle_transport.value()) == {"goodbye": "worker stopping"}
    assert idle_transport.disconnecting
    idle.dataReceived(b'{"id": 2, "function": "quick"}\n')
    assert not busy_transport.disconnecting
    release.callback(None)
    lines = [orjson.loads(line) for line in busy_transport.value().splitlines()]
    assert lines == [{"id": 1, "result": None}, {"goodbye": "worker stopping"}]
    assert busy_transport.disconnecting
    assert ran == ["slow"]


def _secret_factory(ran: list[str] | None = None) -> TaskServerFactory:
    """A server with one task, ``ping``, guarded by the secret ``s3cret``."""

    @task
    def ping() -> str:
        if ran is not None:
            ran.append("ping")
        return "pong"

    return TaskServerFactory(TaskRegistry.from_functions([ping]), Clock(), secret=b"s3cret")


def _secret_connection(factory: TaskServerFactory) -> tuple[TaskServerProtocol, StringTransport]:
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, TaskServerProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _secret_server() -> tuple[TaskServerProtocol, StringTransport]:
    return _secret_connection(_secret_factory())


def test_secret_right_answer_then_requests_run() -> None:
    """With a secret, the worker challenges first; the right answer unlocks requests."""
    protocol, transport = _secret_server()
    challenge = orjson.loads(transport.value())["challenge"]
    transport.clear()
    digest = wire.auth_digest(b"s3cret", challenge)
    protocol.dataReceived(orjson.dumps({"auth": digest}) + b'\n{"id": 1, "function": "ping"}\n')
    assert orjson.loads(transport.value()) == {"id": 1, "result": "pong"}
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "first",
    [b'{"auth": "0000"}', b'{"id": 1, "function": "ping"}', b"not json"],
    ids=["wrong-answer", "request-first", "garbage-first"],
)
def test_secret_wrong_or_missing_answer_is_unauthorized(first: bytes) -> None:
    """A wrong answer, or anything before the answer, gets ``unauthorized`` and a close;
    nothing runs."""
    protocol, transport = _secret_server()
    transport.clear()
    protocol.dataReceived(first + b"\n" + b'{"id": 2, "function": "ping"}\n')
    [reply] = [orjson.loads(line) for line in transport.value().splitlines()]
    assert reply["error"]["code"] == "unauthorized"
    assert transport.disconnecting


def test_secret_challenge_is_new_on_every_connection() -> None:
    """Each connection to one server is challenged with a nonce of its own."""
    factory = _secret_factory()
    nonces = []
    for _ in range(3):
        _, transport = _secret_connection(factory)
        nonces.append(orjson.loads(transport.value())["challenge"])
    assert len(set(nonces)) == 3, nonces


def test_secret_answer_replayed_on_another_connection_is_unauthorized() -> None:
    """The answer recorded from one connection, replayed on another, gets ``unauthorized``
    and a close; the request after it does not run."""
    ran: list[str] = []
    factory = _secret_factory(ran)
    first, first_transport = _secret_connection(factory)
    nonce = orjson.loads(first_transport.value())["challenge"]
    recorded = orjson.dumps({"auth": wire.auth_digest(b"s3cret", nonce)}) + b"\n"
    first.dataReceived(recorded + b'{"id": 1, "function": "ping"}\n')
    assert ran == ["ping"]
    second, second_transport = _secret_connection(factory)
    second_transport.clear()
    second.dataReceived(recorded + b'{"id": 2, "function": "ping"}\n')
    [reply] = [orjson.loads(line) for line in second_transport.value().splitlines()]
    assert error_of(reply) == (None, wire.UNAUTHORIZED)
    assert second_transport.disconnecting
    assert ran == ["ping"]


# Only registered names run


@pytest.fixture
def examples_server() -> TaskServerFactory:
    """A server for the built-in example tasks (``noop``, ``echo``, ...)."""
    return TaskServerFactory(load_tasks(["taskoffload.examples"]), Clock())


@pytest.mark.parametrize(
    ("function", "args"),
    [
        ("eval", ["1 + 1"]),
        ("exec", ["import os"]),
        ("open", ["/dev/null"]),
        ("print", ["hello"]),
        ("getattr", [[], "__class__"]),
        ("__import__", ["os"]),
        ("compile", ["1", "<wire>", "eval"]),
        ("len", [[1, 2]]),
        ("noop.__globals__", []),
        ("echo.__code__", []),
        ("noop.__call__", []),
        ("echo.__wrapped__", []),
        ("os.system", ["exit 0"]),
        ("builtins.eval", ["1 + 1"]),
        ("taskoffload.examples.noop", []),
        ("smtplib.SMTP", []),
        ("__builtins__", []),
        ("TASKS", []),
    ],
)
def test_unregistered_name_is_unknown_function(
    examples_server: TaskServerFactory, function: str, args: list[Any]
) -> None:
    """A builtin, an attribute path or a module path is not a task: unknown_function."""
    connection = Connection(examples_server)
    connection.call(function, 5, args=args)
    [reply] = connection.replies()
    assert error_of(reply) == (5, wire.UNKNOWN_FUNCTION)
    assert reply["error"]["message"] == f"no task named {function!r}"


def test_registered_example_runs_beside_unknown_names(examples_server: TaskServerFactory) -> None:
    """On the server that refuses builtins, after an unknown name on the same
    connection, the registered ``echo`` is served."""
    connection = Connection(examples_server)
    connection.call("eval", 1, args=["1"])
    connection.call("echo", 2, args={"a": 1})
    [refused, served] = connection.replies()
    assert refused["error"]["code"] == "unknown_function"
    assert served == {"id": 2, "result": {"a": 1}}


def test_type_error_inside_task_is_task_failed() -> None:
    """A TypeError raised inside a task's body is task_failed, not bad_arguments."""

    @task
    def mistyped(x: int) -> Any:
        return x + "1"  # type: ignore[operator]  # the bug the task has on purpose

    factory = TaskServerFactory(TaskRegistry.from_functions([mistyped]), Clock())
    connection = Connection(factory)
    with capturedLogs():
        connection.call("mistyped", 3, args=[1])
    [reply] = connection.replies()
    assert error_of(reply) == (3, wire.TASK_FAILED)
    assert reply["error"]["type"] == "TypeError"
    assert "unsupported operand" in reply["error"]["message"]


def test_type_error_from_deferred_task_is_task_failed(server: Server) -> None:
    """A Deferred task failing with TypeError is task_failed, not bad_arguments."""
    connection = server.connect()
    connection.call("wait", 4)
    with capturedLogs():
        server.tasks.waiting[0].errback(TypeError("bad operand"))
    [reply] = connection.replies()
    assert reply == {
        "id": 4,
        "error": {"code": "task_failed", "message": "bad operand", "type": "TypeError"},
    }


@pytest.mark.parametrize(
    ("first", "message"),
    [
        (b'{"auth": "0000"}', "wrong or missing answer to the challenge"),
        (b'{"id": 1, "function": "ping"}', "wrong or missing answer to the challenge"),
        (b"not json", "answer the challenge first"),
    ],
    ids=["wrong-answer", "request-first", "garbage-first"],
)
def test_secret_refusal_says_why(first: bytes, message: str) -> None:
    """The ``unauthorized`` reply tells the client what was wrong with its first line."""
    protocol, transport = _secret_server()
    transport.clear()
    protocol.dataReceived(first + b"\n")
    assert orjson.loads(transport.value()) == {
        "id": None,
        "error": {"code": "unauthorized", "message": message},
    }


def test_busy_and_batch_replies_say_why() -> None:
    """The overloaded and batch refusals carry their documented messages."""
    server = Server()
    busy, asking = server.connect(), server.connect()
    asking.send({"session": {"reject_when_busy": True}})
    busy.call("wait", 1)
    asking.call("add", 2, args=[1, 2])
    [busy_reply] = [r for r in asking.replies() if "id" in r]
    assert busy_reply["error"]["message"] == "this worker is busy; send the request to another"
    batching = Server().connect()
    batching.call("add", 3, batch=[[1, 2]])
    [batch_reply] = batching.replies()
    assert batch_reply["error"]["message"] == "batches are served by the gateway, not by a worker"


def test_late_session_line_is_acknowledged(server: Server) -> None:
    """A session line sent after the first-byte reservation lapsed still gets its ack."""
    connection = server.connect()
    server.clock.advance(RESERVATION_SECONDS)
    connection.send({"session": {"reject_when_busy": True}})
    [reply] = connection.replies()
    assert reply["session"].pop("tasks")
    assert reply == {"session": {"worker": None, "concurrency": 1}}
    connection.call("add", 1, args=[1, 2])
    assert connection.replies()[1:] == [{"id": 1, "result": 3}]


def test_session_request_gives_the_reservation_back_at_once(server: Server) -> None:
    """A TaskClient's first request ends the slot held for it, not RESERVATION_SECONDS later."""
    connection = server.connect()
    connection.send({"session": {"reject_when_busy": True}})
    assert not server.factory.has_capacity
    connection.call("add", 1, args=[1, 2])
    assert server.factory.has_capacity
    assert server.capacity == [False, True]


# trial finds no TestCase here: it runs this module through pytest instead.


# What the factory is built from


def test_keyword_overrides_replace_fields_of_the_settings() -> None:
    """Settings given as keywords replace those fields of ``settings`` and keep the rest."""
    base = WorkerSettings(concurrency=3, idle_timeout=7.0)
    factory = TaskServerFactory(TaskRegistry.from_functions([]), Clock(), base, worker_id=9)
    assert factory.settings == WorkerSettings(concurrency=3, idle_timeout=7.0, worker_id=9)


def test_task_timeout_setting_holds_tasks_that_give_none() -> None:
    """The settings' ``task_timeout`` is the deadline of a request and task that give none."""
    tasks, clock = Tasks(), Clock()
    factory = TaskServerFactory(tasks.registry(), clock, WorkerSettings(task_timeout=4.0))
    connection = Connection(factory)
    connection.call("wait", 3)
    clock.advance(3.9)
    assert connection.replies() == []
    clock.advance(0.1)
    [reply] = connection.replies()
    assert error_of(reply) == (3, wire.TIMEOUT)
    assert "4.0 s" in reply["error"]["message"]


def test_old_import_path_still_names_the_moved_classes() -> None:
    """``taskoffload.worker`` still exports the acceptor and the deadline seam."""
    from taskoffload import acceptor, running, worker

    assert worker.SharedSocketAcceptor is acceptor.SharedSocketAcceptor
    assert (worker.DeadlineExceeded, worker.ISyncDeadlines) == (
        running.DeadlineExceeded,
        running.ISyncDeadlines,
    )


testSuite = pytest_module(__file__)
