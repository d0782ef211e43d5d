"""
Unit tests for :mod:`taskoffload.sending`: a sender over a ``MemoryReactorClock``,
whose connection attempts the tests complete by hand.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, capturedLogs
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.calls import Call, CallState
from taskoffload.errors import TaskError
from taskoffload.sending import Sender
from taskoffload.targets import PoolAddress, Targets
from tests._trial_bridge import pytest_module


class Bench:
    """A sender to one address, and the answers its calls get, in order."""

    def __init__(self, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        targets = Targets(self.reactor, [PoolAddress.parse("tcp:127.0.0.1:1")])
        settings: dict[str, Any] = {
            "idle_timeout": 2.0,
            "max_connections": 10,
            "max_message": 1000,
            "connect_timeout": 5.0,
            "secret": None,
            "prefetch": 0,
        }
        settings.update(options)
        self.sender = Sender(self.reactor, targets, Logger(), **settings)
        self.answers: list[tuple[int, Any]] = []

    def submit(self, request_id: int) -> Call:
        """Make and submit a call with that id."""
        call = Call(request_id, "f", (), {}, None, None, self.sender.give_up)
        call.deferred.addBoth(self._answered, request_id)
        self.sender.submit(call)
        return call

    def _answered(self, value: Any, request_id: int) -> None:
        outcome = value.value.message if isinstance(value, Failure) else value
        self.answers.append((request_id, outcome))

    def accept(self, index: int = -1) -> StringTransport:
        """Complete connection attempt ``index``; the worker accepts it."""
        return self.accept_with_protocol(index)[1]

    def accept_with_protocol(self, index: int = -1) -> tuple[Any, StringTransport]:
        """Complete connection attempt ``index``: the protocol the worker writes to,
        and the transport it reads from."""
        host, port, factory, *_ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.encode_session_ack(wire.SessionAck(worker=1 + index)))
        return protocol, transport


def written(transport: StringTransport) -> list[Any]:
    """The lines the client wrote after its session line, decoded."""
    return [orjson.loads(line) for line in transport.value().splitlines()][1:]


def test_give_up_a_sent_call() -> None:
    """Giving up a sent call abandons it, writes a cancel and answers it, once."""
    bench = Bench()
    call = bench.submit(1)
    transport = bench.accept()
    bench.sender.give_up(call, TaskError(wire.TIMEOUT, "late"))
    bench.sender.give_up(call, TaskError(wire.CANCELLED, "again"))
    assert call.state is CallState.ABANDONED
    assert written(transport)[-1] == {"cancel": 1}
    assert bench.answers == [(1, "late")]


def test_give_up_a_waiting_call() -> None:
    """Giving up a waiting call takes it out of line: it is never sent."""
    bench = Bench(max_connections=1)
    bench.submit(1)
    waiting = bench.submit(2)
    bench.sender.give_up(waiting, TaskError(wire.CANCELLED, "no"))
    transport = bench.accept()
    assert [m["id"] for m in written(transport)] == [1]
    assert bench.answers == [(2, "no")]


def test_close_fails_waiting_then_sent_calls() -> None:
    """close() fails the waiting calls, then those in flight, and fires once all is gone."""
    bench = Bench(max_connections=1)
    bench.submit(1)
    bench.submit(2)
    transport = bench.accept()
    closed: list[Any] = []
    bench.sender.close().addCallback(closed.append)
    assert bench.answers == [(2, "client closed"), (1, "client closed")]
    assert transport.disconnecting
    assert bench.sender.closed and not closed


def test_fractional_connect_timeout() -> None:
    """An attempt that outlasts a fractional connect_timeout fails the call on time."""
    bench = Bench(connect_timeout=0.25)
    bench.submit(1)
    bench.reactor.advance(0.2)
    assert bench.answers == []
    with capturedLogs():
        bench.reactor.advance(0.05)
    [(request_id, message)] = bench.answers
    assert request_id == 1
    assert message == (
        "could not connect to tcp:127.0.0.1:1: User timeout caused connection failure."
    )


def test_unsendable_call_keeps_the_idle_connection() -> None:
    """A call whose arguments cannot be sent fails at once; the idle connection stays idle."""
    bench = Bench()
    bench.submit(1)
    protocol, transport = bench.accept_with_protocol()
    protocol.dataReceived(b'{"id": 1, "result": 1}\n')
    bad = Call(2, "f", (object(),), {}, None, None, bench.sender.give_up)
    bad.deferred.addBoth(bench._answered, 2)
    bench.sender.submit(bad)
    bench.submit(3)
    assert [m["id"] for m in written(transport)] == [1, 3]
    assert bench.answers[1][0] == 2 and "cannot be sent" in bench.answers[1][1]


testSuite = pytest_module(__file__)
