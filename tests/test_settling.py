"""
Unit tests for :mod:`taskoffload.settling`: what the reports of a connection,
played over a ``StringTransport``, do to its calls, with a recording sender.
"""

from __future__ import annotations

from typing import Any

import orjson
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, capturedLogs
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.calls import Call, CallState, WaitingLine
from taskoffload.connections import ConnectionSet, IConnectionOwner, TaskClientProtocol
from taskoffload.errors import TaskError
from taskoffload.settling import Settler
from taskoffload.targets import PoolAddress, Target
from tests._trial_bridge import pytest_module


class Board:
    """A settler over a real line and connection set, and a sender that records."""

    def __init__(self, prefetch: int = 0) -> None:
        self.events: list[Any] = []
        self.line = WaitingLine()
        self.connections = ConnectionSet(Clock(), 2, prefetch)
        self.settler = Settler(self, self.line, self.connections, Logger())
        self.target = Target(PoolAddress.parse("tcp:h:1"))

    # The sender's side, recorded.

    def dispatch(self) -> None:
        self.events.append("dispatch")

    def use(self, connection: TaskClientProtocol) -> None:
        self.events.append("use")

    def connect(self, worker: int = 7, retry: tuple[str, ...] = ()) -> TaskClientProtocol:
        """An open connection accepted by ``worker``, whose pool lists ``retry``."""
        protocol = TaskClientProtocol(self.settler, self.target, 1000)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(wire.encode_session_ack(wire.SessionAck(worker=worker, retry=retry)))
        self.connections.add(protocol)
        return protocol

    def send(self, connection: TaskClientProtocol, request_id: int, function: str = "f") -> Call:
        """A call sent on ``connection`` (ahead, if it carries one already)."""
        call = Call(request_id, function, (), {}, None, None, self.give_up)
        call.deferred.addBoth(lambda value: self.events.append(("answer", request_id, value)))
        line = call.request_line(0)
        assert isinstance(line, bytes)
        connection.carry(call, line, ahead=connection.call is not None)
        return call

    def give_up(self, call: Call, error: TaskError) -> None:
        call.move(CallState.ABANDONED)
        call.answer(error)

    def answers(self) -> list[tuple[int, Any]]:
        """(id, result or error code) of each call answered, in order."""
        return [
            (e[1], e[2].value.code if isinstance(e[2], Failure) else e[2])
            for e in self.events
            if isinstance(e, tuple)
        ]


def reply(connection: TaskClientProtocol, message: dict[str, Any]) -> None:
    """The worker writes ``message``."""
    connection.dataReceived(orjson.dumps(message) + b"\n")


def test_provides_the_owner_interface() -> None:
    """The settler provides IConnectionOwner."""
    assert verifyObject(IConnectionOwner, Board().settler)


def test_connection_freed_before_the_caller_hears() -> None:
    """A final reply frees its connection for the waiting calls, then answers the caller."""
    board = Board()
    connection = board.connect()
    call = board.send(connection, 1)
    reply(connection, {"id": 1, "result": 3})
    assert board.events[0] == "use"
    assert board.answers() == [(1, 3)]
    assert call.state is CallState.FINISHED


def test_abandoned_call_not_answered_again() -> None:
    """The final reply to a call already answered (timed out) frees the connection only."""
    board = Board()
    connection = board.connect()
    call = board.send(connection, 1)
    board.give_up(call, TaskError(wire.TIMEOUT, "late"))
    reply(connection, {"id": 1, "result": 3})
    assert board.answers() == [(1, wire.TIMEOUT)]
    assert board.events[-1] == "use"


def test_handed_back_goes_to_the_head_of_the_line() -> None:
    """A call the worker hands back unrun is requeued ahead of the waiting ones, its
    connection retired."""
    board = Board()
    waiting = Call(9, "f", (), {}, None, None, board.give_up)
    board.line.append(waiting)
    connection = board.connect()
    call = board.send(connection, 1)
    busy = {"code": wire.OVERLOADED, "message": "busy", "type": wire.WORKER_BUSY}
    reply(connection, {"id": 1, "error": busy})
    assert board.line.take() is call
    assert board.line.take() is waiting
    assert not board.connections.holds(connection)
    assert board.events == ["dispatch"]


def test_goodbye_requeues_in_the_order_sent() -> None:
    """A goodbye puts the unrun calls back at the head of the line, in the order sent."""
    board = Board(prefetch=1)
    connection = board.connect()
    first, second = board.send(connection, 1), board.send(connection, 2)
    reply(connection, {"goodbye": "stopping"})
    assert [board.line.take(), board.line.take()] == [first, second]
    assert board.target.load.outstanding == 0
    assert board.answers() == []


def test_lost_call_fails_after_dispatch() -> None:
    """A lost connection fails its call with worker_lost, after the line is dispatched."""
    board = Board()
    connection = board.connect()
    board.send(connection, 1)
    connection.connectionLost(Failure(ConnectionLost("killed")))
    assert board.events[0] == "dispatch"
    assert board.answers() == [(1, wire.WORKER_LOST)]
    assert not board.connections.holds(connection)


def test_lost_idempotent_call_goes_once_more() -> None:
    """A lost call the pool lists as idempotent is requeued, once."""
    board = Board()
    connection = board.connect(retry=("idem",))
    call = board.send(connection, 1, "idem")
    with capturedLogs() as events:
        connection.connectionLost(Failure(ConnectionLost()))
    assert any("once more" in e.get("log_format", "") for e in events)
    assert board.line.take() is call and call.retried
    again = board.connect(retry=("idem",))
    again.carry(call, b"{}\n")
    again.connectionLost(Failure(ConnectionLost()))
    assert board.answers() == [(1, wire.WORKER_LOST)]


def test_bad_reply_abandons_the_call_until_the_loss() -> None:
    """A bad reply fails the call at once; the call stays on the closing connection
    until it is lost, and is not answered again then."""
    board = Board()
    connection = board.connect()
    board.send(connection, 1)
    with capturedLogs():
        connection.dataReceived(b"not json\n")
    assert board.answers() == [(1, wire.WORKER_LOST)]
    assert connection.transport.disconnecting  # type: ignore[union-attr]  # a StringTransport
    assert board.target.load.outstanding == 1
    connection.connectionLost(Failure(ConnectionLost()))
    assert board.target.load.outstanding == 0
    assert board.answers() == [(1, wire.WORKER_LOST)]


def test_progress_only_while_the_caller_waits() -> None:
    """Progress reaches on_progress while the call is sent, not once it is abandoned."""
    board = Board()
    connection = board.connect()
    seen: list[Any] = []
    call = Call(1, "f", (), {}, None, seen.append, board.give_up)
    cancelled: list[Failure] = []
    call.deferred.addErrback(cancelled.append)
    connection.carry(call, b"{}\n")
    reply(connection, {"id": 1, "progress": 1})
    board.give_up(call, TaskError(wire.CANCELLED, "no"))
    reply(connection, {"id": 1, "progress": 2})
    assert seen == [1]
    assert len(cancelled) == 1


testSuite = pytest_module(__file__)
