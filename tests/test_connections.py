"""
Unit tests for :mod:`taskoffload.connections`: one connection's protocol, played
over a ``StringTransport`` and reporting to a recording owner; the idle
connections; the set of all.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.calls import Call, CallState
from taskoffload.connections import (
    ConnectionSet,
    FinalReply,
    IConnectionOwner,
    IdleConnections,
    TaskClientProtocol,
)
from taskoffload.errors import TaskError
from taskoffload.ingest import FairIngest
from taskoffload.targets import PoolAddress, Target
from tests._trial_bridge import pytest_module


@implementer(IConnectionOwner)
class Owner:
    """Records what its connections report, in order."""

    def __init__(self) -> None:
        self.reports: list[tuple[Any, ...]] = []

    def progress(self, connection: TaskClientProtocol, call: Call, value: Any) -> None:
        self.reports.append(("progress", call.id, value))

    def answered(self, connection: TaskClientProtocol, call: Call, reply: FinalReply) -> None:
        self.reports.append(("answered", call.id, connection.call))

    def ahead_answered(self, connection: TaskClientProtocol, call: Call, reply: FinalReply) -> None:
        self.reports.append(("ahead_answered", call.id, list(connection.ahead)))

    def goodbye(self, connection: TaskClientProtocol) -> None:
        self.reports.append(("goodbye",))

    def bad_reply(self, connection: TaskClientProtocol, why: str) -> None:
        self.reports.append(("bad_reply", why))

    def lost(self, connection: TaskClientProtocol, reason: Failure) -> None:
        self.reports.append(("lost", reason.getErrorMessage()))


def ignore(call: Call, error: TaskError) -> None:
    """A give-up that does nothing: these tests never time out or cancel."""


def call(request_id: int) -> Call:
    """A queued call with that id."""
    return Call(request_id, "f", (), {}, None, None, ignore)


class Connection:
    """A protocol connected over a ``StringTransport`` to a worker that accepted it."""

    def __init__(
        self, secret: bytes | None = None, worker: int = 7, ingest: FairIngest | None = None
    ) -> None:
        self.owner = Owner()
        self.target = Target(PoolAddress.parse("tcp:h:1"))
        self.protocol = TaskClientProtocol(self.owner, self.target, 200, secret, ingest)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        if secret is None:
            self.reply(wire.encode_session_ack(wire.SessionAck(worker=worker, concurrency=2)))

    def reply(self, line: bytes) -> None:
        """The worker writes ``line``."""
        self.protocol.dataReceived(line)

    def written(self) -> list[Any]:
        """Every line the client wrote, decoded."""
        return [orjson.loads(line) for line in self.transport.value().splitlines()]

    def carry(self, *ids: int, ahead: bool = False) -> list[Call]:
        """Send new calls with those ids on the connection."""
        calls = [call(n) for n in ids]
        for one in calls:
            line = one.request_line(0)
            assert isinstance(line, bytes)
            self.protocol.carry(one, line, ahead=ahead)
        return calls


def result(request_id: int | None) -> bytes:
    """A result line for that request."""
    return orjson.dumps({"id": request_id, "result": None}) + b"\n"


def test_owner_provides_the_interface() -> None:
    """The recording owner provides IConnectionOwner, so the tests speak the real interface."""
    assert verifyObject(IConnectionOwner, Owner())


def test_session_then_accepted() -> None:
    """The connection asks for a session; the acknowledgement marks it accepted."""
    connection = Connection()
    assert connection.written() == [{"session": {"reject_when_busy": True}}]
    assert connection.protocol.accepted
    assert (connection.protocol.worker, connection.protocol.concurrency) == (7, 2)
    assert connection.protocol.ready.called


def test_acknowledgement_tells_the_target() -> None:
    """What an acknowledgement says of the pool goes to the connection's target."""
    connection = Connection()
    connection.reply(wire.encode_session_ack(wire.SessionAck(worker=7, retry=("i",), slots=3)))
    assert (connection.target.retry, connection.target.slots) == (frozenset({"i"}), 3)


def test_carrying_counts_the_load() -> None:
    """Each call taken on adds to the target's load; each final reply takes it off."""
    connection = Connection()
    first, second = connection.carry(1)[0], connection.carry(2, ahead=True)[0]
    assert connection.target.load.outstanding == 2
    assert first.state is CallState.SENT and first.carrier is connection.protocol
    assert connection.protocol.carried() == [first, second]
    connection.reply(result(1))
    assert connection.target.load.outstanding == 1
    assert first.carrier is None
    assert [m["id"] for m in connection.written()[1:]] == [1, 2]


def test_final_reply_lets_the_call_go_before_the_owner_hears() -> None:
    """The owner hears of a final reply once the connection no longer carries the call."""
    connection = Connection()
    connection.carry(1)
    connection.reply(result(1))
    assert connection.owner.reports == [("answered", 1, None)]


def test_idless_error_answers_the_current_call() -> None:
    """An error reply without an id answers the call the worker runs."""
    connection = Connection()
    connection.carry(1)
    connection.reply(b'{"id": null, "error": {"code": "bad_request", "message": "x"}}\n')
    assert connection.owner.reports == [("answered", 1, None)]


def test_progress_is_not_final() -> None:
    """Progress goes to the owner and the call stays on the connection."""
    connection = Connection()
    connection.carry(1)
    connection.reply(b'{"id": 1, "progress": 50}\n')
    assert connection.owner.reports == [("progress", 1, 50)]
    assert connection.target.load.outstanding == 1


def test_reply_to_a_call_sent_ahead() -> None:
    """A final reply to a call sent ahead lets that call go, before the one in front."""
    connection = Connection()
    connection.carry(1)
    connection.carry(2, 3, ahead=True)
    connection.reply(result(3))
    assert connection.owner.reports == [("ahead_answered", 3, [connection.protocol.ahead[0]])]
    assert connection.protocol.call is not None and connection.protocol.call.id == 1
    assert connection.target.load.outstanding == 2


def test_promote() -> None:
    """Promoting makes the first call sent ahead the one the worker runs."""
    connection = Connection()
    connection.carry(1)
    second = connection.carry(2, ahead=True)[0]
    connection.reply(result(1))
    connection.protocol.promote()
    assert connection.protocol.call is second
    assert not connection.protocol.ahead


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"not json\n", "JSON"),
        (result(9), "a reply to request 9, which is not in flight"),
        (b'{"id": 2, "progress": 1}\n', "a reply to request 2, which is not in flight"),
        (b'{"id": 1, "result": "' + b"x" * 300 + b'"}\n', "longer than the limit of 200"),
    ],
)
def test_bad_replies(line: bytes, why: str) -> None:
    """Garbage, a reply to no call in flight, progress for a call sent ahead, and an
    oversize line are bad replies, and let no call go."""
    connection = Connection()
    connection.carry(1)
    connection.carry(2, ahead=True)
    connection.reply(line)
    [(kind, said)] = connection.owner.reports
    assert kind == "bad_reply" and why in said
    assert connection.target.load.outstanding == 2


def test_let_go_of_everything() -> None:
    """Letting go of every call gives them in the order sent, and clears the load."""
    connection = Connection()
    calls = connection.carry(1) + connection.carry(2, 3, ahead=True)
    assert connection.protocol.let_go_all() == calls
    assert connection.protocol.carried() == []
    assert connection.target.load.outstanding == 0
    assert connection.protocol.let_go_current() is None
    assert connection.protocol.let_go_ahead() == []


def test_cancel_line() -> None:
    """Cancelling a call writes a cancel line for its id."""
    connection = Connection()
    [one] = connection.carry(4)
    connection.protocol.cancel(one)
    assert connection.written()[-1] == {"cancel": 4}


def test_goodbye_and_loss_are_reported() -> None:
    """A goodbye line and the loss of the connection go to the owner."""
    connection = Connection()
    connection.reply(wire.encode_goodbye(wire.Goodbye(reason="stopping")))
    connection.protocol.connectionLost(Failure(ConnectionLost("gone")))
    [goodbye, (lost, why)] = connection.owner.reports
    assert goodbye == ("goodbye",)
    assert lost == "lost" and why.endswith(": gone.")
    assert connection.protocol.lost


def test_lost_before_accepted_fails_ready() -> None:
    """A connection lost before the worker accepted it fails its ready Deferred."""
    owner = Owner()
    protocol = TaskClientProtocol(owner, Target(PoolAddress.parse("tcp:h:1")), 100)
    protocol.makeConnection(StringTransport())
    failures: list[Failure] = []
    protocol.ready.addErrback(failures.append)
    protocol.connectionLost(Failure(ConnectionLost()))
    assert len(failures) == 1 and failures[0].check(ConnectionLost)


def test_challenge_answered_with_the_secret() -> None:
    """With a secret, the connection waits for the challenge, then answers it and asks for a session."""
    connection = Connection(secret=b"k")
    assert connection.transport.value() == b""
    connection.reply(b'{"challenge": "n"}\n')
    assert connection.written() == [
        {"auth": wire.auth_digest(b"k", "n")},
        {"session": {"reject_when_busy": True}},
    ]


def test_challenge_without_a_secret() -> None:
    """Without a secret, a challenge fails the ready Deferred, naming the secret, and closes."""
    owner = Owner()
    protocol = TaskClientProtocol(owner, Target(PoolAddress.parse("tcp:h:1")), 100)
    transport = StringTransport()
    protocol.makeConnection(transport)
    failures: list[Failure] = []
    protocol.ready.addErrback(failures.append)
    protocol.dataReceived(b'{"challenge": "n"}\n')
    assert "shared secret" in failures[0].getErrorMessage()
    assert transport.disconnecting


# Idle connections


def idle_connection() -> TaskClientProtocol:
    """A connected protocol with nothing in flight."""
    return Connection().protocol


def test_idle_newest_first() -> None:
    """The most recently idle connection is taken first."""
    idle = IdleConnections(Clock(), 2)
    one, two = idle_connection(), idle_connection()
    idle.add(one)
    idle.add(two)
    assert idle.take() is two
    assert idle.take() is one
    assert len(idle) == 0


def test_idle_expiry_oldest_first() -> None:
    """Each idle connection closes its timeout after it became idle, one timer for all."""
    clock = Clock()
    idle = IdleConnections(clock, 2)
    one, two = idle_connection(), idle_connection()
    idle.add(one)
    clock.advance(1)
    idle.add(two)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert one.transport.disconnecting  # type: ignore[union-attr]  # a StringTransport
    assert not two.transport.disconnecting  # type: ignore[union-attr]  # a StringTransport
    clock.advance(1)
    assert two.transport.disconnecting  # type: ignore[union-attr]  # a StringTransport
    assert len(idle) == 0 and clock.getDelayedCalls() == []


def test_idle_put_back_and_discard() -> None:
    """A connection taken can be put back as it was; a closing one is discarded."""
    idle = IdleConnections(Clock(), 2)
    one = idle_connection()
    idle.add(one)
    since = one.idle_since
    idle.put_back(idle.take())
    assert one in idle and one.idle_since == since
    idle.discard(one)
    idle.discard(one)
    assert one not in idle


def test_idle_clear_stops_the_timer() -> None:
    """Clearing forgets every idle connection and cancels the timer."""
    clock = Clock()
    idle = IdleConnections(clock, 2)
    idle.add(idle_connection())
    idle.clear()
    assert len(idle) == 0 and clock.getDelayedCalls() == []


# The set of all connections


def test_set_counts_open_and_opening() -> None:
    """Open connections count against their target and worker; attempts count as opening."""
    connections = ConnectionSet(Clock(), 2, prefetch=0)
    connection = Connection()
    attempt: Deferred[TaskClientProtocol] = Deferred()
    connections.attempting(attempt)
    assert (len(connections), connections.opening) == (1, 1)
    connections.attempt_over(attempt)
    connections.add(connection.protocol)
    assert connections.holds(connection.protocol)
    assert (connection.target.opened, dict(connection.target.workers)) == (1, {7: 1})
    connections.retire(connection.protocol)
    assert not connections.holds(connection.protocol)
    assert (connection.target.opened, dict(connection.target.workers)) == (0, {})
    assert connection.transport.disconnecting


def test_offered_while_there_is_room() -> None:
    """A busy connection is offered a prefetched call while it has room, each once, in order."""
    connections = ConnectionSet(Clock(), 2, prefetch=1)
    a, b = Connection(), Connection()
    idle = Connection()
    a.carry(1)
    b.carry(2)
    for connection in (a, b, a, idle):
        connections.offer(connection.protocol)
    b.carry(3, ahead=True)
    assert connections.next_offered() is a.protocol
    # b filled up since it was offered; the idle one never was.
    assert connections.next_offered() is None


def test_set_aside_withdraws_offers() -> None:
    """A connection set aside is neither idle nor offered, and still counted."""
    connections = ConnectionSet(Clock(), 2, prefetch=1)
    connection = Connection()
    connections.add(connection.protocol)
    connection.carry(1)
    connections.offer(connection.protocol)
    connections.set_aside(connection.protocol)
    assert connections.next_offered() is None
    assert connections.holds(connection.protocol)


def test_retire_idle_beside() -> None:
    """The idle connections to a broken connection's worker are retired; others stay."""
    connections = ConnectionSet(Clock(), 2, prefetch=0)
    broken, same, other = Connection(worker=7), Connection(worker=7), Connection(worker=8)
    # Connections to the same address.
    same.protocol.target = other.protocol.target = broken.protocol.target
    for connection in (broken, same, other):
        connections.add(connection.protocol)
    connections.idle.add(same.protocol)
    connections.idle.add(other.protocol)
    connections.retire_idle_beside(broken.protocol)
    assert same.transport.disconnecting and not other.transport.disconnecting
    assert list(connections.idle) == [other.protocol]


def test_closing_waits_for_every_connection() -> None:
    """Closing returns the open connections and fires its waiters once all are gone."""
    connections = ConnectionSet(Clock(), 2, prefetch=0)
    connection = Connection()
    connections.add(connection.protocol)
    attempt: Deferred[TaskClientProtocol] = Deferred()
    connections.attempting(attempt)
    cancelled: list[Failure] = []
    attempt.addErrback(cancelled.append)
    closed = connections.when_closed()
    assert connections.close() == [connection.protocol]
    connections.check_closed()
    assert not closed.called
    connections.cancel_attempts()
    assert len(cancelled) == 1
    connections.attempt_over(attempt)
    connections.forget(connection.protocol)
    connections.check_closed()
    assert closed.called


# Replies in their turn (with a FairIngest)


def test_replies_beyond_a_turns_share_wait_for_the_next_turn_in_order() -> None:
    """Four replies read at once with a share of two per turn: two are handled now,
    the others in the next turn, in the order read, and the connection reads no
    more meanwhile."""
    clock = Clock()
    ingest = FairIngest(clock, per_turn=2)
    connection = Connection(ingest=ingest)  # the acknowledgement takes one of the two
    connection.carry(1)
    connection.carry(2, 3, 4, ahead=True)
    connection.reply(result(1) + result(2) + result(3) + result(4))
    assert [r[1] for r in connection.owner.reports] == [1]
    assert connection.transport.producerState == "paused"
    clock.advance(0)
    assert [r[1] for r in connection.owner.reports] == [1, 2, 3, 4]
    assert connection.transport.producerState == "producing"


def test_a_loss_after_replies_read_is_reported_after_them() -> None:
    """Replies read before the connection was lost are handled before the loss, in
    their turn: a call the worker answered is answered, not lost."""
    clock = Clock()
    ingest = FairIngest(clock, per_turn=1)
    connection = Connection(ingest=ingest)
    connection.carry(1)
    connection.carry(2, ahead=True)
    connection.reply(result(1) + result(2))
    connection.protocol.connectionLost(Failure(ConnectionLost("gone")))
    assert connection.owner.reports == []  # the acknowledgement took this turn's share
    clock.advance(0)
    assert [r[0] for r in connection.owner.reports] == ["answered", "ahead_answered", "lost"]


testSuite = pytest_module(__file__)
