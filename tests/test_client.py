"""
Unit tests for :mod:`taskoffload.client`: a ``MemoryReactorClock`` records each
connection attempt, and the tests play the worker by building the protocol,
attaching a ``StringTransport`` and feeding it reply lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.client import (
    ITaskPool,
    PoolAddress,
    TaskClient,
    TaskError,
)
from taskoffload.targets import DUPLICATE_RETRIES
from tests._trial_bridge import pytest_module

ADDRESS = "tcp:127.0.0.1:12345"


@implementer(ITCPTransport)
class TCPStringTransport(StringTransport):
    """A ``StringTransport`` that records ``setTcpNoDelay``."""

    no_delay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        pass


class Worker:
    """The worker's end of one client connection."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def received(self) -> list[dict[str, Any]]:
        """Every message the client wrote after its session line, decoded."""
        lines = [orjson.loads(line) for line in self.transport.value().splitlines()]
        assert lines[0] == {"session": {"reject_when_busy": True}}
        return lines[1:]

    def reply(self, message: dict[str, Any]) -> None:
        """Send one reply line to the client."""
        self.protocol.dataReceived(orjson.dumps(message) + b"\n")

    def answer(self, result: Any = None) -> None:
        """Send a result for the last request the client wrote."""
        request_id = [m for m in self.received() if "function" in m][-1]["id"]
        self.reply({"id": request_id, "result": result})

    def drop(self, reason: Exception | None = None) -> None:
        """The connection goes away."""
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    @property
    def closing(self) -> bool:
        """The client asked to close the connection."""
        return bool(self.transport.disconnecting)


class Pool:
    """A client over a memory reactor, and the means to play its workers."""

    def __init__(self, addresses: Sequence[str] = (ADDRESS,), **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        #: Whether the workers' acknowledgements say the pool tells why a worker
        #: ended (tests/test_lost_inquiry.py); here they do not: losses fail at once.
        self.deaths = False
        self.client = TaskClient(self.reactor, list(addresses), **options)

    @property
    def attempts(self) -> list[str]:
        """``host:port`` of every TCP connection attempt so far, in order."""
        return [f"{host}:{port}" for host, port, *_ in self.reactor.tcpClients]

    def accept(
        self,
        index: int = -1,
        retry: Sequence[str] = (),
        worker: int | None = None,
        slots: int | None = None,
        concurrency: int | None = None,
    ) -> Worker:
        """
        Let connection attempt ``index`` succeed.  The worker's acknowledgement
        names ``retry`` as its idempotent tasks, ``worker`` as its pid (by
        default, a different one for each attempt) and its ``concurrency``.
        """
        if worker is None:
            worker = 1 + index % len(self.reactor.tcpClients)
        host, port, factory, *_ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = TCPStringTransport()
        # The endpoint hands the connected protocol over at once.
        protocol.makeConnection(transport)
        # The worker acknowledges the session line once it has accepted.
        ack = wire.SessionAck(
            worker=worker,
            retry=tuple(retry),
            slots=slots,
            concurrency=concurrency,
            deaths=self.deaths,
        )
        protocol.dataReceived(wire.encode_session_ack(ack))
        return Worker(protocol, transport)

    def refuse(self, index: int = -1) -> None:
        """Let connection attempt ``index`` be refused."""
        factory = self.reactor.tcpClients[index][2]
        assert isinstance(factory, ClientFactory)
        connector = self.reactor.connectors[index]
        factory.clientConnectionFailed(connector, Failure(error.ConnectionRefusedError()))


class Outcome:
    """What a Deferred fired with, caught as it fires."""

    def __init__(self, deferred: Deferred[Any]) -> None:
        self.fired = False
        self.value: Any = None
        deferred.addBoth(self._fire)

    def _fire(self, value: Any) -> None:
        self.fired = True
        self.value = value

    @property
    def result(self) -> Any:
        """The result; fails the test if there is none."""
        assert self.fired, "the Deferred has not fired"
        assert not isinstance(self.value, Failure), self.value
        return self.value

    @property
    def error(self) -> TaskError:
        """The :class:`TaskError`; fails the test if there is none."""
        assert self.fired, "the Deferred has not fired"
        assert isinstance(self.value, Failure), f"fired with {self.value!r}"
        assert isinstance(self.value.value, TaskError), self.value
        return self.value.value


# Results, errors, progress


def test_result() -> None:
    """A call writes one request line and fires with the result of its reply."""
    pool = Pool()
    outcome = Outcome(pool.client.call("add", 1, 2, carry=True))
    worker = pool.accept()
    assert worker.received() == [
        {"id": 1, "function": "add", "args": [1, 2], "kwargs": {"carry": True}}
    ]
    assert not outcome.fired
    worker.reply({"id": 1, "result": 3})
    assert outcome.result == 3


def test_keyword_arguments() -> None:
    """A call with keywords only sends them as the ``args`` object."""
    pool = Pool()
    pool.client.call("send_mail", to="a@example.org")
    worker = pool.accept()
    assert worker.received() == [
        {"id": 1, "function": "send_mail", "args": {"to": "a@example.org"}}
    ]


def test_request_ids_increase() -> None:
    """Each call gets the next integer id, from 1."""
    pool = Pool()
    pool.client.call("noop")
    pool.client.call("noop")
    ids = [pool.accept(i).received()[0]["id"] for i in range(2)]
    assert ids == [1, 2]


def test_error_reply() -> None:
    """An error reply fails the call with a TaskError carrying its code, message and type."""
    pool = Pool()
    outcome = Outcome(pool.client.call("send_mail"))
    worker = pool.accept()
    worker.reply(
        {
            "id": 1,
            "error": {"code": "task_failed", "message": "SMTP 550", "type": "SMTPError"},
        }
    )
    error = outcome.error
    assert (error.code, error.message, error.type) == ("task_failed", "SMTP 550", "SMTPError")
    assert str(error) == "task_failed (SMTPError): SMTP 550"


def test_error_without_type() -> None:
    """An error reply without a type gives a TaskError whose type is None."""
    pool = Pool()
    outcome = Outcome(pool.client.call("nope"))
    pool.accept().reply({"id": 1, "error": {"code": "unknown_function", "message": "no nope"}})
    assert outcome.error.type is None
    assert str(outcome.error) == "unknown_function: no nope"


def test_idless_error_answers_request_in_flight() -> None:
    """An error with a null id (the worker could not read the request) answers the call."""
    pool = Pool()
    outcome = Outcome(pool.client.call("big"))
    pool.accept().reply({"id": None, "error": {"code": "bad_request", "message": "too long"}})
    assert outcome.error.code == wire.BAD_REQUEST


def test_progress() -> None:
    """Progress messages go to on_progress, in order, before the result."""
    pool = Pool()
    seen: list[Any] = []
    outcome = Outcome(pool.client.send_task("count", on_progress=seen.append))
    worker = pool.accept()
    worker.reply({"id": 1, "progress": {"done": 1}})
    worker.reply({"id": 1, "progress": {"done": 2}})
    assert seen == [{"done": 1}, {"done": 2}]
    assert not outcome.fired
    worker.reply({"id": 1, "result": "ok"})
    assert outcome.result == "ok"


def test_progress_without_callback() -> None:
    """Progress for a call without on_progress is dropped and the call still completes."""
    pool = Pool()
    outcome = Outcome(pool.client.call("count"))
    worker = pool.accept()
    worker.reply({"id": 1, "progress": 50})
    worker.answer("ok")
    assert outcome.result == "ok"


def test_progress_callback_error_is_logged() -> None:
    """An exception from on_progress is logged and does not disturb the call."""
    pool = Pool()

    def broken(value: Any) -> None:
        raise RuntimeError("oops")

    outcome = Outcome(pool.client.send_task("count", on_progress=broken))
    worker = pool.accept()
    with capturedLogs() as events:
        worker.reply({"id": 1, "progress": 1})
    assert any(e.get("log_failure") is not None for e in events)
    worker.answer(7)
    assert outcome.result == 7


def test_unserializable_arguments() -> None:
    """Arguments JSON cannot carry fail the call with bad_request, and nothing is sent."""
    pool = Pool()
    first = Outcome(pool.client.call("noop"))
    worker = pool.accept()
    worker.answer()
    assert first.fired
    outcome = Outcome(pool.client.call("noop", object()))
    assert outcome.error.code == wire.BAD_REQUEST
    later = Outcome(pool.client.call("noop"))
    assert [m["id"] for m in worker.received()] == [1, 3]
    worker.answer("fine")
    assert later.result == "fine"


def test_provides_itaskpool() -> None:
    """TaskClient provides ITaskPool."""
    assert verifyObject(ITaskPool, Pool().client)


# Connections


def test_tcp_nodelay() -> None:
    """TCP connections have TCP_NODELAY set."""
    pool = Pool()
    pool.client.call("noop")
    worker = pool.accept()
    assert isinstance(worker.transport, TCPStringTransport)
    assert worker.transport.no_delay


def test_unix_address() -> None:
    """A unix: address connects to that socket path."""
    reactor = MemoryReactorClock()
    client = TaskClient(reactor, ["unix:/run/pool.sock"], connect_timeout=3)
    client.call("noop")
    assert [(path, timeout) for path, _, timeout, _ in reactor.unixClients] == [
        ("/run/pool.sock", 3)
    ]


def test_connection_reused() -> None:
    """A call after the previous one finished reuses its connection."""
    pool = Pool()
    first = Outcome(pool.client.call("noop"))
    worker = pool.accept()
    worker.answer(1)
    second = Outcome(pool.client.call("noop"))
    assert len(pool.attempts) == 1
    assert [m["id"] for m in worker.received()] == [1, 2]
    worker.answer(2)
    assert (first.result, second.result) == (1, 2)


def test_one_request_per_connection() -> None:
    """Two calls at once go over two connections."""
    pool = Pool()
    first = Outcome(pool.client.call("noop"))
    second = Outcome(pool.client.call("noop"))
    assert len(pool.attempts) == 2
    one, two = pool.accept(0), pool.accept(1)
    assert len(one.received()) == len(two.received()) == 1
    one.answer("a")
    two.answer("b")
    assert {first.result, second.result} == {"a", "b"}


def test_most_recently_used_first() -> None:
    """An idle connection is taken most recently used first."""
    pool = Pool()
    pool.client.call("noop")
    pool.client.call("noop")
    one, two = pool.accept(0), pool.accept(1)
    one.answer()
    two.answer()
    pool.client.call("noop")
    assert len(two.received()) == 2
    assert len(one.received()) == 1


def test_max_connections_queue() -> None:
    """Beyond max_connections, calls wait and are sent in call order as connections free up."""
    pool = Pool(max_connections=1)
    outcomes = [Outcome(pool.client.call("noop", n)) for n in range(3)]
    assert len(pool.attempts) == 1
    worker = pool.accept()
    for n in range(3):
        assert [m["args"] for m in worker.received()] == [[k] for k in range(n + 1)]
        worker.answer(n)
    assert [o.result for o in outcomes] == [0, 1, 2]
    assert len(pool.attempts) == 1


def test_connection_counts_while_connecting() -> None:
    """Connections still being opened count toward max_connections."""
    pool = Pool(max_connections=2)
    for _ in range(5):
        pool.client.call("noop")
    assert len(pool.attempts) == 2


def test_idle_close() -> None:
    """A connection idle for idle_timeout seconds is closed, and the next call opens a new one."""
    pool = Pool(idle_timeout=2.0)
    pool.client.call("noop")
    worker = pool.accept()
    worker.answer()
    pool.reactor.advance(1.9)
    assert not worker.closing
    pool.reactor.advance(0.1)
    assert worker.closing
    worker.drop()
    pool.client.call("noop")
    assert len(pool.attempts) == 2


def test_idle_time_restarts_on_use() -> None:
    """Using a connection restarts its idle time."""
    pool = Pool(idle_timeout=2.0)
    pool.client.call("noop")
    worker = pool.accept()
    worker.answer()
    pool.reactor.advance(1.5)
    pool.client.call("noop")
    worker.answer()
    pool.reactor.advance(1.5)
    assert not worker.closing
    pool.reactor.advance(0.5)
    assert worker.closing


def test_idle_close_oldest_first() -> None:
    """Each idle connection closes idle_timeout after it became idle, not before."""
    pool = Pool(idle_timeout=2.0)
    pool.client.call("noop")
    pool.client.call("noop")
    one, two = pool.accept(0), pool.accept(1)
    one.answer()
    pool.reactor.advance(1.0)
    two.answer()
    pool.reactor.advance(1.0)
    assert (one.closing, two.closing) == (True, False)
    pool.reactor.advance(1.0)
    assert two.closing


def test_busy_connection_not_closed_when_idle_time_passes() -> None:
    """A connection with a request in flight is not closed by the idle timer."""
    pool = Pool(idle_timeout=2.0)
    outcome = Outcome(pool.client.call("slow"))
    worker = pool.accept()
    pool.reactor.advance(10)
    assert not worker.closing
    worker.answer("done")
    assert outcome.result == "done"


# Deadlines and cancellation


def test_timeout() -> None:
    """A call with no reply by its timeout fails with timeout and sends a cancel."""
    pool = Pool()
    outcome = Outcome(pool.client.send_task("slow", timeout=5))
    worker = pool.accept()
    assert worker.received()[0]["timeout"] == 5
    pool.reactor.advance(4.9)
    assert not outcome.fired
    pool.reactor.advance(0.1)
    assert outcome.error.code == wire.TIMEOUT
    assert worker.received()[-1] == {"cancel": 1}


def test_timed_out_connection_busy_until_final_reply() -> None:
    """After a timeout the connection is reused only once the worker's final reply arrives."""
    pool = Pool()
    outcome = Outcome(pool.client.send_task("slow", timeout=5))
    worker = pool.accept()
    pool.reactor.advance(5)
    assert outcome.error.code == wire.TIMEOUT
    pool.client.call("noop")
    assert len(pool.attempts) == 2
    pool.accept(1).answer()
    worker.reply({"id": 1, "error": {"code": "cancelled", "message": "cancelled"}})
    assert outcome.error.code == wire.TIMEOUT
    third = Outcome(pool.client.call("noop"))
    assert len(pool.attempts) == 2
    assert worker.received()[-1]["id"] == 3
    worker.answer("late but fine")
    assert third.result == "late but fine"


def test_default_timeout() -> None:
    """The client's timeout applies to calls that give none."""
    pool = Pool(timeout=3)
    outcome = Outcome(pool.client.call("slow"))
    worker = pool.accept()
    assert worker.received()[0]["timeout"] == 3
    pool.reactor.advance(3)
    assert outcome.error.code == wire.TIMEOUT


def test_timeout_counts_time_waiting() -> None:
    """A request that waited for a connection carries only what is left of its timeout."""
    pool = Pool()
    pool.client.send_task("slow", timeout=10)
    pool.reactor.advance(4)
    assert pool.accept().received()[0]["timeout"] == 6


def test_timeout_while_waiting() -> None:
    """A call that times out before it is sent fails with timeout and is never sent."""
    pool = Pool(max_connections=1)
    pool.client.call("slow")
    waiting = Outcome(pool.client.send_task("noop", timeout=1))
    worker = pool.accept()
    pool.reactor.advance(1)
    assert waiting.error.code == wire.TIMEOUT
    worker.answer()
    assert [m["id"] for m in worker.received()] == [1]


def test_no_timeout_error_after_result() -> None:
    """A result before the timeout stops the timer."""
    pool = Pool()
    outcome = Outcome(pool.client.send_task("quick", timeout=1))
    worker = pool.accept()
    worker.answer("ok")
    pool.reactor.advance(5)
    assert outcome.result == "ok"
    assert len(worker.received()) == 1


def test_cancel_after_send() -> None:
    """Cancelling a sent call fails it with cancelled at once and sends a cancel."""
    pool = Pool()
    deferred = pool.client.call("slow")
    outcome = Outcome(deferred)
    worker = pool.accept()
    deferred.cancel()
    assert outcome.error.code == wire.CANCELLED
    assert worker.received()[-1] == {"cancel": 1}
    pool.client.call("noop")
    assert len(pool.attempts) == 2, "the cancelled call's connection is still busy"
    pool.accept(1).answer()
    worker.reply({"id": 1, "error": {"code": "cancelled", "message": "cancelled"}})
    pool.client.call("noop")
    assert len(pool.attempts) == 2
    assert worker.received()[-1]["id"] == 3


def test_cancel_while_connecting() -> None:
    """Cancelling a call before it is sent fails it with cancelled and never sends it."""
    pool = Pool()
    deferred = pool.client.call("slow")
    outcome = Outcome(deferred)
    deferred.cancel()
    assert outcome.error.code == wire.CANCELLED
    worker = pool.accept()
    assert worker.received() == []
    # Nothing is left for it: it is closed rather than left holding a worker.
    assert worker.closing
    pool.client.call("noop")
    assert pool.accept().received()[0]["id"] == 2


def test_cancel_while_queued() -> None:
    """Cancelling a call waiting for a connection removes it from the line."""
    pool = Pool(max_connections=1)
    pool.client.call("first")
    deferred = pool.client.call("second")
    third = Outcome(pool.client.call("third"))
    outcome = Outcome(deferred)
    deferred.cancel()
    assert outcome.error.code == wire.CANCELLED
    worker = pool.accept()
    worker.answer()
    assert [m["function"] for m in worker.received()] == ["first", "third"]
    worker.answer("3")
    assert third.result == "3"


# Connection loss and connection failures


def test_connection_lost() -> None:
    """A lost connection fails its call with worker_lost; a call on another connection goes on."""
    pool = Pool()
    lost = Outcome(pool.client.call("crash"))
    fine = Outcome(pool.client.call("noop"))
    one, two = pool.accept(0), pool.accept(1)
    one.drop(ConnectionLost("gone"))
    assert lost.error.code == wire.WORKER_LOST
    assert "127.0.0.1:12345" in lost.error.message
    assert not fine.fired
    two.answer("ok")
    assert fine.result == "ok"


def test_lost_connection_not_reused() -> None:
    """After an idle connection is lost, the next call opens a new one."""
    pool = Pool()
    pool.client.call("noop")
    worker = pool.accept()
    worker.answer()
    worker.drop()
    pool.client.call("noop")
    assert len(pool.attempts) == 2


def test_lost_connection_frees_its_slot() -> None:
    """A lost connection makes room for a waiting call under max_connections."""
    pool = Pool(max_connections=1)
    pool.client.call("crash")
    waiting = Outcome(pool.client.call("noop"))
    pool.accept().drop()
    assert len(pool.attempts) == 2
    pool.accept(1).answer("ok")
    assert waiting.result == "ok"


def test_connect_failure() -> None:
    """A refused connection fails the call waiting for it with worker_lost."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    pool.refuse()
    assert outcome.error.code == wire.WORKER_LOST
    assert outcome.error.message.startswith("could not connect to tcp:127.0.0.1:12345: ")


def test_backoff_after_refused() -> None:
    """For a second after a refused connection, calls fail without a new attempt."""
    pool = Pool()
    pool.client.call("noop")
    pool.refuse()
    soon = Outcome(pool.client.call("noop"))
    assert soon.error.code == wire.WORKER_LOST
    assert len(pool.attempts) == 1
    pool.reactor.advance(1)
    later = Outcome(pool.client.call("noop"))
    assert len(pool.attempts) == 2
    pool.accept().answer("ok")
    assert later.result == "ok"


def test_bad_reply() -> None:
    """A reply that is not JSON drops the connection and fails its call with worker_lost."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    worker = pool.accept()
    with capturedLogs() as events:
        worker.protocol.dataReceived(b"not json\n")
    assert outcome.error.code == wire.WORKER_LOST
    assert worker.closing
    assert any("bad reply" in e.get("log_format", "") for e in events)
    worker.drop()
    pool.client.call("noop")
    assert len(pool.attempts) == 2


def test_reply_for_other_request() -> None:
    """A reply to a request not in flight on the connection is a bad reply."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    worker = pool.accept()
    worker.reply({"id": 99, "result": 1})
    assert outcome.error.code == wire.WORKER_LOST
    assert worker.closing


def test_oversize_reply() -> None:
    """A reply longer than max_message drops the connection with worker_lost."""
    pool = Pool(max_message=100)
    outcome = Outcome(pool.client.call("big"))
    worker = pool.accept()
    worker.reply({"id": 1, "result": "x" * 200})
    assert outcome.error.code == wire.WORKER_LOST
    assert "longer than" in outcome.error.message
    assert worker.closing


# Several addresses


def test_new_connections_go_round_robin() -> None:
    """With equal load, new connections go to each address in turn."""
    pool = Pool(["tcp:a:1", "tcp:b:2"])
    for _ in range(4):
        pool.client.call("noop")
    assert pool.attempts == ["a:1", "b:2", "a:1", "b:2"]


def test_least_outstanding_address() -> None:
    """A new connection goes to the address with the fewest requests in flight."""
    pool = Pool(["tcp:a:1", "tcp:b:2"])
    pool.client.call("slow")
    pool.client.call("quick")
    pool.accept(0)
    b = pool.accept(1)
    b.answer()
    b.drop()
    # a has one request in flight, b none: b wins although a is next in turn.
    pool.client.call("noop")
    assert pool.attempts[-1] == "b:2"


def test_failover_on_refused() -> None:
    """A call whose connection is refused is sent to another address instead."""
    pool = Pool(["tcp:a:1", "tcp:b:2"])
    outcome = Outcome(pool.client.call("noop"))
    assert pool.attempts == ["a:1"]
    pool.refuse(0)
    assert not outcome.fired
    assert pool.attempts == ["a:1", "b:2"]
    pool.accept(1).answer("from b")
    assert outcome.result == "from b"


def test_refused_address_skipped_for_a_while() -> None:
    """An address that refused is skipped for a second, then tried again."""
    pool = Pool(["tcp:a:1", "tcp:b:2"])
    pool.client.call("noop")
    pool.refuse(0)
    pool.accept(1)
    pool.client.call("noop")
    assert pool.attempts[-1] == "b:2"
    pool.reactor.advance(1)
    pool.client.call("noop")
    assert pool.attempts[-1] == "a:1"


def test_all_addresses_refused() -> None:
    """A call fails with worker_lost only when every address refused, naming each."""
    pool = Pool(["tcp:a:1", "tcp:b:2"])
    outcome = Outcome(pool.client.call("noop"))
    pool.refuse(0)
    assert not outcome.fired
    pool.refuse(1)
    assert outcome.error.code == wire.WORKER_LOST
    assert "could not connect to tcp:a:1" in outcome.error.message
    assert "could not connect to tcp:b:2" in outcome.error.message


# Closing


def test_close() -> None:
    """close() fails calls in flight, closes every connection, and fires when all are gone."""
    pool = Pool()
    pool.client.call("noop")
    in_flight = Outcome(pool.client.call("slow"))
    idle, busy = pool.accept(0), pool.accept(1)
    idle.answer()
    closed = Outcome(pool.client.close())
    assert in_flight.error.code == wire.WORKER_LOST
    assert in_flight.error.message == "client closed"
    assert idle.closing
    assert busy.closing
    assert not closed.fired
    idle.drop()
    assert not closed.fired
    busy.drop()
    assert closed.fired


def test_close_fails_waiting_calls() -> None:
    """close() fails calls still waiting for a connection."""
    pool = Pool(max_connections=1)
    pool.client.call("slow")
    waiting = Outcome(pool.client.call("noop"))
    worker = pool.accept()
    pool.client.close()
    assert waiting.error.message == "client closed"
    worker.drop()
    assert [m["function"] for m in worker.received()] == ["slow"]


def test_call_after_close() -> None:
    """A call after close() fails with worker_lost and opens no connection."""
    pool = Pool()
    pool.client.close()
    outcome = Outcome(pool.client.call("noop"))
    assert outcome.error.code == wire.WORKER_LOST
    assert pool.attempts == []


def test_close_with_nothing_open() -> None:
    """close() on a client with no connections fires at once."""
    assert Outcome(Pool().client.close()).fired


def test_close_cancels_connection_attempts() -> None:
    """close() abandons connection attempts under way and fires without waiting for them."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    closed = Outcome(pool.client.close())
    assert closed.fired
    assert outcome.error.message == "client closed"


# Addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:12345", PoolAddress("tcp", host="127.0.0.1", port=12345)),
        ("example.org:80", PoolAddress("tcp", host="example.org", port=80)),
        ("tcp:[::1]:8000", PoolAddress("tcp", host="::1", port=8000)),
        ("unix:/run/pool.sock", PoolAddress("unix", path="/run/pool.sock")),
    ],
)
def test_parse_address(text: str, expected: PoolAddress) -> None:
    """Pool addresses are read in the tcp:, HOST:PORT and unix: forms."""
    assert PoolAddress.parse(text) == expected


def test_address_round_trips() -> None:
    """An address prints in the tcp:/unix: form that parses back to it."""
    for text in ("tcp:h:1", "tcp:[::1]:2", "unix:/x"):
        assert str(PoolAddress.parse(text)) == text


@pytest.mark.parametrize("text", ["", "tcp:", "host", "tcp:host:port", "h:0", "h:70000", "unix:"])
def test_bad_address(text: str) -> None:
    """A malformed address is refused with ValueError when the client is made."""
    with pytest.raises(ValueError, match="is not a pool address"):
        TaskClient(MemoryReactorClock(), [text])


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf")])
def test_bad_timeout(timeout: float) -> None:
    """A timeout that is not a positive, finite number of seconds is refused."""
    client = Pool().client
    with pytest.raises(ValueError, match="timeout"):
        client.send_task("noop", timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        TaskClient(MemoryReactorClock(), [ADDRESS], timeout=timeout)


def test_worker_busy_reply_resends_on_another_connection() -> None:
    """An ``overloaded``/WorkerBusy reply closes that connection and resends the call."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    first = pool.accept()
    first.reply({"id": 1, "error": {"code": "overloaded", "message": "busy", "type": "WorkerBusy"}})
    assert first.closing
    assert not outcome.fired
    second = pool.accept()
    assert second.received() == [{"id": 1, "function": "noop", "args": {}}]
    second.reply({"id": 1, "result": "done"})
    assert outcome.result == "done"


def test_gateway_overloaded_is_an_error() -> None:
    """An ``overloaded`` reply without the WorkerBusy type reaches the caller."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    worker = pool.accept()
    worker.reply({"id": 1, "error": {"code": "overloaded", "message": "full"}})
    assert outcome.error.code == "overloaded"


def test_no_request_before_the_worker_accepts() -> None:
    """A connection carries no request until the worker acknowledges its session."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    host, port, factory, *_ = pool.reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = TCPStringTransport()
    protocol.makeConnection(transport)
    assert transport.value() == b'{"session":{"reject_when_busy":true}}\n'
    protocol.dataReceived(b'{"session": {"worker": 7}}\n')
    assert b'"function":"noop"' in transport.value()
    protocol.dataReceived(b'{"id": 1, "result": null}\n')
    assert outcome.fired and outcome.result is None


def test_goodbye_resends_the_unanswered_request() -> None:
    """A goodbye from a stopping worker sends the unanswered request on a new connection."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    first = pool.accept()
    first.reply({"goodbye": "worker stopping"})
    assert first.closing
    assert not outcome.fired
    second = pool.accept()
    assert second.received() == [{"id": 1, "function": "noop", "args": {}}]
    second.reply({"id": 1, "result": 5})
    assert outcome.result == 5


def test_lost_before_accept_is_not_worker_lost() -> None:
    """A connection reset while still queued at the pool costs the call nothing."""
    pool = Pool(addresses=[ADDRESS, "tcp:127.0.0.1:2"])
    outcome = Outcome(pool.client.call("noop"))
    host, port, factory, *_ = pool.reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    protocol.makeConnection(TCPStringTransport())
    protocol.connectionLost(Failure(ConnectionLost()))
    assert not outcome.fired
    other = pool.accept()
    other.reply({"id": 1, "result": "ok"})
    assert outcome.result == "ok"


# Retry of idempotent tasks


def test_idempotent_call_resent_after_connection_loss() -> None:
    """A lost idempotent call is sent again, ahead of waiting calls, and its result delivered."""
    pool = Pool(max_connections=1)
    outcome = Outcome(pool.client.call("idem", 1))
    waiting = Outcome(pool.client.call("other"))
    first = pool.accept(retry=["idem"])
    first.drop(ConnectionLost("killed"))
    assert not outcome.fired
    second = pool.accept()
    assert second.received() == [{"id": 1, "function": "idem", "args": [1]}]
    second.answer("once")
    assert outcome.result == "once"
    assert second.received()[-1]["function"] == "other"
    second.answer("next")
    assert waiting.result == "next"


def test_idempotent_call_lost_twice() -> None:
    """An idempotent call whose second connection is lost too fails with worker_lost."""
    pool = Pool()
    outcome = Outcome(pool.client.call("idem"))
    pool.accept(retry=["idem"]).drop(ConnectionLost("killed"))
    pool.accept(retry=["idem"]).drop(ConnectionLost("killed again"))
    assert outcome.error.code == wire.WORKER_LOST
    assert "killed again" in outcome.error.message
    assert len(pool.attempts) == 2


def test_other_call_not_resent() -> None:
    """A call whose task the ack does not list fails with worker_lost at once, never resent."""
    pool = Pool()
    outcome = Outcome(pool.client.call("plain"))
    pool.accept(retry=["idem"]).drop(ConnectionLost("killed"))
    assert outcome.error.code == wire.WORKER_LOST
    assert len(pool.attempts) == 1


def test_retry_skips_idle_connections_to_the_lost_worker() -> None:
    """The second attempt goes to another worker: idle connections to the lost one are closed."""
    pool = Pool()
    pool.client.call("noop")
    pool.client.call("noop")
    outcome = Outcome(pool.client.call("idem"))
    lost_idle = pool.accept(0, worker=7, concurrency=2)
    other = pool.accept(1, worker=9)
    lost_busy = pool.accept(2, worker=7, retry=["idem"], concurrency=2)
    other.answer()
    lost_idle.answer()
    lost_busy.drop(ConnectionLost("killed"))
    assert lost_idle.closing
    assert other.received()[-1] == {"id": 3, "function": "idem", "args": {}}
    assert len(pool.attempts) == 3
    other.answer("ok")
    assert outcome.result == "ok"


def test_retry_set_learned_from_latest_ack() -> None:
    """Whether a task is retried follows the latest session acknowledgement from its pool."""
    pool = Pool()
    first = Outcome(pool.client.call("idem"))
    pool.accept().drop(ConnectionLost())
    assert first.error.code == wire.WORKER_LOST
    second = Outcome(pool.client.call("idem"))
    pool.accept(retry=["idem"]).drop(ConnectionLost())
    assert not second.fired
    retrying = pool.accept(retry=["idem"])
    retrying.answer("ok")
    assert second.result == "ok"
    retrying.drop()
    third = Outcome(pool.client.call("idem"))
    pool.accept(retry=[]).drop(ConnectionLost())
    assert third.error.code == wire.WORKER_LOST
    assert len(pool.attempts) == 4


def test_retry_set_is_per_address() -> None:
    """A task listed by one pool's ack is not retried on another pool that does not list it."""
    pool = Pool(addresses=[ADDRESS, "tcp:127.0.0.1:2"])
    pool.client.call("noop")
    pool.client.call("noop")
    listing, other = pool.accept(0, retry=["idem"]), pool.accept(1)
    listing.answer()
    other.answer()
    outcome = Outcome(pool.client.call("idem"))
    assert other.received()[-1]["function"] == "idem"
    other.drop(ConnectionLost())
    assert outcome.error.code == wire.WORKER_LOST


def test_retry_keeps_the_deadline() -> None:
    """The second attempt carries what is left of the timeout, which still ends the call."""
    pool = Pool()
    outcome = Outcome(pool.client.send_task("idem", timeout=10))
    first = pool.accept(retry=["idem"])
    pool.reactor.advance(4)
    first.drop(ConnectionLost())
    pool.reactor.advance(2)
    second = pool.accept()
    assert second.received()[0]["timeout"] == 4
    pool.reactor.advance(4)
    assert outcome.error.code == wire.TIMEOUT
    assert second.received()[-1] == {"cancel": 1}


def test_timed_out_call_not_resent() -> None:
    """An idempotent call that timed out is not sent again when its connection is lost."""
    pool = Pool()
    outcome = Outcome(pool.client.send_task("idem", timeout=5))
    worker = pool.accept(retry=["idem"])
    pool.reactor.advance(5)
    worker.drop(ConnectionLost())
    assert outcome.error.code == wire.TIMEOUT
    assert len(pool.attempts) == 1


def test_cancelled_call_not_resent() -> None:
    """An idempotent call that was cancelled is not sent again when its connection is lost."""
    pool = Pool()
    deferred = pool.client.call("idem")
    outcome = Outcome(deferred)
    worker = pool.accept(retry=["idem"])
    deferred.cancel()
    worker.drop(ConnectionLost())
    assert outcome.error.code == wire.CANCELLED
    assert len(pool.attempts) == 1


def test_bad_reply_resends_idempotent_call() -> None:
    """A bad reply drops the connection and sends an idempotent call once more."""
    pool = Pool()
    outcome = Outcome(pool.client.call("idem"))
    first = pool.accept(retry=["idem"])
    with capturedLogs():
        first.protocol.dataReceived(b"not json\n")
    assert first.closing
    assert not outcome.fired
    second = pool.accept()
    first.drop()
    second.answer("ok")
    assert outcome.result == "ok"
    assert len(pool.attempts) == 2


def test_close_does_not_resend() -> None:
    """Closing the client fails an idempotent call in flight with worker_lost, unsent again."""
    pool = Pool()
    outcome = Outcome(pool.client.call("idem"))
    worker = pool.accept(retry=["idem"])
    pool.client.close()
    worker.drop()
    assert outcome.error.code == wire.WORKER_LOST
    assert outcome.error.message == "client closed"
    assert len(pool.attempts) == 1


def test_lost_connection_drops_idle_ones_to_the_same_worker() -> None:
    """When one connection to a worker is lost, its idle connections are closed too."""
    pool = Pool()
    first = Outcome(pool.client.call("noop"))
    second = Outcome(pool.client.call("noop"))
    a = pool.accept(0, worker=7, concurrency=2)
    b = pool.accept(1, worker=7, concurrency=2)
    a.reply({"id": 1, "result": None})
    b.reply({"id": 2, "result": None})
    assert first.fired and second.fired
    a.drop(ConnectionLost())
    assert b.closing


def test_connection_to_a_worker_already_held_is_replaced() -> None:
    """A connection that lands on a worker already serving this client is closed for a new try."""
    pool = Pool()
    first = Outcome(pool.client.call("noop"))
    second = Outcome(pool.client.call("noop"))
    a = pool.accept(0, worker=7, slots=2)
    duplicate = pool.accept(1, worker=7, slots=2)
    assert duplicate.closing
    assert not [m for m in duplicate.received() if "function" in m]
    b = pool.accept(2, worker=8, slots=2)
    a.answer()
    b.answer()
    assert first.fired and second.fired
    assert len(pool.reactor.tcpClients) == 3


def test_connection_to_a_worker_already_held_is_kept_after_retries() -> None:
    """After DUPLICATE_RETRIES such connections in a row, the next one is used all the same."""
    pool = Pool()
    outcomes = [Outcome(pool.client.call("noop")) for _ in range(2)]
    first = pool.accept(0, worker=7, slots=2)
    for index in range(1, 1 + DUPLICATE_RETRIES):
        assert pool.accept(index, worker=7, slots=2).closing
    kept = pool.accept(1 + DUPLICATE_RETRIES, worker=7, slots=2)
    assert not kept.closing
    first.answer()
    kept.answer()
    assert all(outcome.fired for outcome in outcomes)


def test_connections_capped_before_the_pool_says_its_size() -> None:
    """Until a pool has said how many slots it has, at most 16 connects are under way."""
    pool = Pool()
    for _ in range(40):
        pool.client.call("noop")
    assert len(pool.reactor.tcpClients) == 16


def test_connections_capped_at_the_pool_slots() -> None:
    """Once the pool says it has N slots, the client holds at most N connections to it,
    and the calls beyond wait for one to free."""
    pool = Pool()
    outcomes = [Outcome(pool.client.call("noop")) for _ in range(40)]
    workers = [pool.accept(0, slots=4)]
    assert len(pool.reactor.tcpClients) == 16  # the first attempts were already under way
    workers += [pool.accept(i, slots=4) for i in range(1, 16)]
    # 16 accepted: more than 4 is what the attempts before the ack cost; no new ones.
    assert len(pool.reactor.tcpClients) == 16
    for n, worker in enumerate(workers):
        worker.answer(n)
    pool.reactor.advance(0)  # the turns that take the replies beyond one turn's share
    assert len(pool.reactor.tcpClients) == 16
    assert sum(o.fired for o in outcomes) == 16


def test_slots_cap_connections_from_the_start() -> None:
    """With the size known, a burst opens no more connections than the pool's slots."""
    pool = Pool()
    first = Outcome(pool.client.call("noop"))
    pool.accept(0, slots=3).answer(None)
    assert first.fired
    burst = [Outcome(pool.client.call("noop")) for _ in range(10)]
    # One idle connection is reused; two more are opened: three in all.
    assert len(pool.reactor.tcpClients) == 3
    assert not any(o.fired for o in burst)


def test_learning_the_pool_size_opens_the_connections_waiting_calls_need() -> None:
    """When the first acknowledgement says the pool is larger, more connections open
    at once for the calls still waiting."""
    pool = Pool()
    for _ in range(40):
        pool.client.call("noop")
    assert len(pool.reactor.tcpClients) == 16
    pool.accept(0, slots=100)
    # 1 call went out on it; 15 attempts are under way for the other 39: 24 more.
    assert len(pool.reactor.tcpClients) == 16 + 24


def test_client_answers_the_challenge_with_its_secret() -> None:
    """A client with the pool's secret answers its challenge, then sends its session."""
    reactor = MemoryReactorClock()
    client = TaskClient(reactor, [ADDRESS], secret=b"s3cret")
    outcome = Outcome(client.call("noop"))
    host, port, factory, *_ = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = TCPStringTransport()
    protocol.makeConnection(transport)
    assert transport.value() == b""  # waits for the challenge
    protocol.dataReceived(b'{"challenge": "abcd"}\n')
    auth, session = (orjson.loads(line) for line in transport.value().splitlines())
    assert auth == {"auth": wire.auth_digest(b"s3cret", "abcd")}
    assert session == {"session": {"reject_when_busy": True}}
    protocol.dataReceived(b'{"session": {"worker": 3}}\n')
    protocol.dataReceived(b'{"id": 1, "result": "ok"}\n')
    assert outcome.result == "ok"


def test_client_without_secret_says_why_it_cannot_connect() -> None:
    """A client without a secret, challenged by a pool, fails its call naming the secret."""
    pool = Pool()
    outcome = Outcome(pool.client.call("noop"))
    host, port, factory, *_ = pool.reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = TCPStringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"challenge": "abcd"}\n')
    protocol.connectionLost(Failure(ConnectionDone()))
    assert outcome.error.code == "worker_lost"
    assert "shared secret" in outcome.error.message


# Prefetch


def prefetching_pool(slots: int = 1, retry: Sequence[str] = ()) -> tuple[Pool, Worker, Outcome]:
    """A prefetching client whose pool said it has ``slots``; one call is running."""
    pool = Pool(prefetch=1)
    first = Outcome(pool.client.call("noop"))
    worker = pool.accept(0, slots=slots, retry=retry)
    return pool, worker, first


def requests(worker: Worker) -> list[int]:
    """The ids of the requests the client wrote on a connection."""
    return [m["id"] for m in worker.received() if "function" in m]


def test_prefetch_sends_one_waiting_call_ahead() -> None:
    """With prefetch, a call that finds every connection busy goes ahead on one, once."""
    pool, worker, first = prefetching_pool()
    second = Outcome(pool.client.call("noop"))
    third = Outcome(pool.client.call("noop"))
    assert requests(worker) == [1, 2]
    assert len(pool.reactor.tcpClients) == 1
    worker.reply({"id": 1, "result": "a"})
    # The second now runs at the worker without being sent again; the third goes ahead.
    assert first.result == "a"
    assert requests(worker) == [1, 2, 3]
    worker.reply({"id": 2, "result": "b"})
    worker.reply({"id": 3, "result": "c"})
    assert (second.result, third.result) == ("b", "c")
    assert pool.client.capacity() == 2


def test_no_prefetch_by_default() -> None:
    """Without prefetch, a call waits in the client until a connection is free."""
    pool = Pool()
    Outcome(pool.client.call("noop"))
    worker = pool.accept(0, slots=1)
    second = Outcome(pool.client.call("noop"))
    assert requests(worker) == [1]
    assert pool.client.capacity() == 1
    worker.answer()
    assert requests(worker) == [1, 2]
    worker.answer("b")
    assert second.result == "b"


def test_prefetched_call_lost_with_its_worker() -> None:
    """A call sent ahead fails with worker_lost with the call before it: it may have started."""
    pool, worker, first = prefetching_pool()
    second = Outcome(pool.client.call("noop"))
    worker.drop(ConnectionLost("killed"))
    assert first.error.code == wire.WORKER_LOST
    assert second.error.code == wire.WORKER_LOST
    assert len(pool.reactor.tcpClients) == 1


def test_prefetched_idempotent_call_sent_again() -> None:
    """An idempotent call sent ahead is sent once more when its worker is lost."""
    pool, worker, first = prefetching_pool(retry=["idem"])
    second = Outcome(pool.client.call("idem"))
    assert requests(worker) == [1, 2]
    worker.drop(ConnectionLost("killed"))
    assert first.error.code == wire.WORKER_LOST
    assert not second.fired
    other = pool.accept(1, slots=1, retry=["idem"])
    assert requests(other) == [2]
    other.answer("again")
    assert second.result == "again"


def test_prefetched_call_cancelled_before_it_ran() -> None:
    """Cancelling a call sent ahead sends a cancel; its answer may come before the call ahead's."""
    pool, worker, first = prefetching_pool()
    second_deferred = pool.client.call("noop")
    second = Outcome(second_deferred)
    second_deferred.cancel()
    assert second.error.code == wire.CANCELLED
    assert worker.received()[-1] == {"cancel": 2}
    worker.reply({"id": 2, "error": {"code": "cancelled", "message": "cancelled before it ran"}})
    assert not worker.closing
    third = Outcome(pool.client.call("noop"))
    assert requests(worker) == [1, 2, 3]
    worker.reply({"id": 1, "result": "a"})
    worker.reply({"id": 3, "result": "c"})
    assert (first.result, third.result) == ("a", "c")


def test_prefetched_call_handed_back_is_sent_again() -> None:
    """A call sent ahead that the worker hands back unrun goes out again, and is answered once."""
    pool, worker, first = prefetching_pool()
    second = Outcome(pool.client.call("noop"))
    worker.reply(
        {
            "id": 2,
            "error": {"code": "overloaded", "message": "busy", "type": wire.WORKER_BUSY},
        }
    )
    assert not second.fired
    worker.reply({"id": 1, "result": "a"})
    assert first.result == "a"
    assert requests(worker) == [1, 2, 2]
    worker.reply({"id": 2, "result": "b"})
    assert second.result == "b"


def test_goodbye_resends_the_prefetched_call() -> None:
    """A worker's goodbye means neither request on the connection ran: both go out again."""
    pool, worker, first = prefetching_pool()
    second = Outcome(pool.client.call("noop"))
    worker.protocol.dataReceived(wire.encode_goodbye(wire.Goodbye(reason="worker stopping")))
    assert worker.closing
    other = pool.accept(1, slots=1)
    assert requests(other) == [1, 2]
    other.reply({"id": 1, "result": "a"})
    other.reply({"id": 2, "result": "b"})
    assert (first.result, second.result) == ("a", "b")


def test_prefetch_depth_fills_connections_in_turn() -> None:
    """With prefetch=2, waiting calls go ahead one per busy connection before a second each."""
    pool = Pool(prefetch=2)
    first = [Outcome(pool.client.call("noop")) for _ in range(2)]
    workers = [pool.accept(0, slots=2), pool.accept(1, slots=2)]
    later = [Outcome(pool.client.call("noop")) for _ in range(5)]
    assert [requests(w) for w in workers] == [[1, 3, 5], [2, 4, 6]]
    assert pool.client.capacity() == 6
    # Lost with its worker: the running call and both sent ahead of it.
    workers[0].drop(ConnectionLost("killed"))
    assert [o.error.code for o in (first[0], later[0], later[2])] == [wire.WORKER_LOST] * 3
    assert not later[4].fired
    workers[1].reply({"id": 2, "result": "b"})
    assert first[1].result == "b"
    # The waiting call goes to the connection opened in the lost one's place,
    # not ahead on the busy one.
    assert requests(workers[1]) == [2, 4, 6]
    assert requests(pool.accept(2, slots=2)) == [7]


def test_prefetch_must_not_be_negative() -> None:
    """A negative prefetch is refused."""
    with pytest.raises(ValueError, match="prefetch"):
        TaskClient(MemoryReactorClock(), [ADDRESS], prefetch=-1)


# Bad replies and what they take with them


def test_bad_line_on_an_idle_connection_drops_it() -> None:
    """Garbage from a worker with nothing in flight closes that connection; calls go on."""
    pool = Pool()
    first = Outcome(pool.client.call("noop"))
    worker = pool.accept()
    worker.answer("one")
    assert first.result == "one"
    with capturedLogs():
        worker.protocol.dataReceived(b"not json\n")
    assert worker.closing
    worker.drop()
    second = Outcome(pool.client.call("noop"))
    assert len(pool.attempts) == 2
    pool.accept().answer("two")
    assert second.result == "two"


def test_bad_reply_fails_the_prefetched_call_with_worker_lost() -> None:
    """A bad reply fails the running call and the one sent ahead, both with worker_lost."""
    pool, worker, first = prefetching_pool()
    second = Outcome(pool.client.call("noop"))
    with capturedLogs():
        worker.protocol.dataReceived(b"not json\n")
    for outcome in (first, second):
        assert outcome.error.code == wire.WORKER_LOST
        assert outcome.error.message.startswith(f"bad reply from {ADDRESS}: ")
    assert worker.closing


def test_bad_reply_retry_skips_idle_connections_to_that_worker() -> None:
    """An idempotent call resent after a bad reply goes to another worker, not to an idle
    connection of the worker that sent it."""
    pool = Pool()
    pool.client.call("noop")
    pool.client.call("noop")
    outcome = Outcome(pool.client.call("idem"))
    same_idle = pool.accept(0, worker=7, concurrency=2)
    other = pool.accept(1, worker=9)
    bad = pool.accept(2, worker=7, retry=["idem"], concurrency=2)
    other.answer()
    same_idle.answer()
    with capturedLogs():
        bad.protocol.dataReceived(b"not json\n")
    assert same_idle.closing
    assert other.received()[-1] == {"id": 3, "function": "idem", "args": {}}
    other.answer("ok")
    assert outcome.result == "ok"


def test_every_idempotent_call_sent_ahead_is_sent_again() -> None:
    """With prefetch=2, both idempotent calls sent ahead on a lost connection go out again."""
    pool = Pool(prefetch=2)
    first = Outcome(pool.client.call("noop"))
    worker = pool.accept(0, slots=1, retry=["idem"])
    ahead = [Outcome(pool.client.call("idem")) for _ in range(2)]
    assert requests(worker) == [1, 2, 3]
    worker.drop(ConnectionLost("killed"))
    assert first.error.code == wire.WORKER_LOST
    again = pool.accept(1, slots=1)
    assert requests(again) == [2, 3]
    again.reply({"id": 2, "result": "a"})
    again.reply({"id": 3, "result": "b"})
    assert [o.result for o in ahead] == ["a", "b"]


def test_call_cancelled_in_flight_is_not_sent_again_after_goodbye() -> None:
    """A call its caller cancelled is not sent out again when the worker then says goodbye."""
    pool = Pool()
    deferred = pool.client.call("noop")
    outcome = Outcome(deferred)
    worker = pool.accept()
    deferred.cancel()
    assert outcome.error.code == wire.CANCELLED
    worker.protocol.dataReceived(wire.encode_goodbye(wire.Goodbye(reason="worker stopping")))
    assert worker.closing
    assert len(pool.attempts) == 1


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
