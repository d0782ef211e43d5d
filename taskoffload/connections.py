"""
A :class:`~taskoffload.client.TaskClient`'s connections to its pools: the line
protocol of one (:class:`TaskClientProtocol`), which tells its owner what the
worker says through :class:`IConnectionOwner` and alone counts the calls it
carries; the idle ones, newest first (:class:`IdleConnections`); and the set of
all, open and opening (:class:`ConnectionSet`).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import Interface

from taskoffload import wire
from taskoffload._transport import write_now
from taskoffload.calls import Call, CallState
from taskoffload.ingest import FairIngest
from taskoffload.lost import LostAnswer
from taskoffload.targets import Target

__all__ = [
    "ConnectionFactory",
    "ConnectionSet",
    "FinalReply",
    "IConnectionOwner",
    "IdleConnections",
    "TaskClientProtocol",
    "accepted",
]

# Slack when comparing reactor times, so float rounding never delays an expiry by
# one more timer round.
_EPSILON: Final = 1e-6

_SESSION: Final = wire.encode_session(wire.Session(reject_when_busy=True))

#: A final reply to a call.
FinalReply = wire.Result | wire.ErrorReply


class IConnectionOwner(Interface):
    """What a :class:`TaskClientProtocol` tells the object that owns its calls."""

    def progress(connection: TaskClientProtocol, call: Call, value: Any) -> None:
        """The worker reports progress of ``call``, the one it runs."""

    def answered(connection: TaskClientProtocol, call: Call, reply: FinalReply) -> None:
        """
        The final reply to ``call``, the one the worker ran; the connection has
        let the call go.
        """

    def ahead_answered(connection: TaskClientProtocol, call: Call, reply: FinalReply) -> None:
        """
        A final reply to ``call``, sent ahead, before the reply to the call in
        front of it (it was cancelled, or handed back, before it ran); the
        connection has let the call go.
        """

    def goodbye(connection: TaskClientProtocol) -> None:
        """The worker closes the connection and has read nothing after its goodbye."""

    def bad_reply(connection: TaskClientProtocol, why: str) -> None:
        """The worker wrote something that is not a reply to a call in flight."""

    def lost(connection: TaskClientProtocol, reason: Failure) -> None:
        """The connection is gone."""


class TaskClientProtocol(LineReceiver):
    """
    One connection to a pool: writes request and cancel lines, reads reply
    lines and tells its owner what they answer.

    It carries at most one call the worker runs (:attr:`call`) and, with
    prefetch, calls sent behind it (:attr:`ahead`), and it is the one place
    where its address's :class:`~taskoffload.targets.Load` goes up
    (:meth:`carry`) and down (as it lets a call go).

    :ivar target: the address it is connected to.
    :ivar call: the call the worker runs (or will run first), if any.
    """

    delimiter = b"\n"
    MAX_LENGTH = wire.DEFAULT_MAX_MESSAGE

    def __init__(
        self,
        owner: IConnectionOwner,
        target: Target,
        max_message: int,
        secret: bytes | None = None,
        ingest: FairIngest | None = None,
    ) -> None:
        self.MAX_LENGTH = max_message
        #: If given, what the worker writes is handled in its turn (see
        #: :mod:`taskoffload.ingest`), a bounded number of lines per reactor turn.
        self._ingest = ingest
        self.owner = owner
        self.target = target
        self._secret = secret
        self.call: Call | None = None
        #: With prefetch: calls sent behind :attr:`call`, queued at the worker.
        self.ahead: deque[Call] = deque()
        self.idle_since = 0.0
        self.lost = False
        #: The worker has accepted the connection (its session acknowledgement came).
        self.accepted = False
        #: The process id of the worker that accepted it, if it said.
        self.worker: int | None = None
        #: How many tasks that worker runs at once, as it said.
        self.concurrency = 1
        #: Its pool answers ``{"lost": PID}`` (its acknowledgement said so).
        self.tells_deaths = False
        #: Fires with this protocol once accepted; fails if lost before.
        self.ready: Deferred[TaskClientProtocol] = Deferred(lambda d: self._abort())
        #: Told each answer to a question about a lost worker asked on it.
        self.lost_answers: Callable[[TaskClientProtocol, LostAnswer], object] | None = None

    def connectionMade(self) -> None:
        if self.target.address.kind == "tcp":
            # Requests and replies are single small writes; Nagle would hold each back.
            transport = self.transport
            if ITCPTransport.providedBy(transport):
                transport.setTcpNoDelay(True)
        # Ask a busy worker to hand requests back rather than queue them behind
        # another connection's task (see wire.Session).  With a secret, that waits
        # for the worker's challenge.
        if self._secret is None:
            self.send(_SESSION)

    def lineReceived(self, line: bytes) -> None:
        ingest = self._ingest
        if ingest is None:
            self._line_received(line)
        else:
            # In its turn; no line after it is read before it is handled.
            ingest.received(self, lambda: self._line_received(line), hold=True)

    def pause_reading(self) -> None:
        """Its lines wait for their turn: read no more of them for now."""
        self.pauseProducing()

    def resume_reading(self) -> None:
        """Its waiting lines have been handled: read on."""
        self.resumeProducing()

    def _line_received(self, line: bytes) -> None:
        try:
            reply = wire.decode_reply(line)
        except wire.BadMessage as e:
            self.owner.bad_reply(self, e.message)
            return
        if isinstance(reply, wire.Challenge):
            if self._secret is None:
                if not self.ready.called:
                    why = "the pool asks for a shared secret; give the client secret=..."
                    self.ready.errback(Failure(ConnectionRefusedError(why)))
                self.close()
                return
            answer = wire.Auth(digest=wire.auth_digest(self._secret, reply.nonce))
            self.send(wire.encode_auth(answer) + _SESSION)
            return
        if isinstance(reply, wire.SessionAck):
            self.target.acknowledged(reply)
            if not self.accepted:
                self.accepted = True
                self.worker = reply.worker
                self.concurrency = reply.concurrency or 1
                self.tells_deaths = reply.deaths
                self.ready.callback(self)
            return
        if isinstance(reply, wire.Goodbye):
            self.owner.goodbye(self)
            return
        if isinstance(reply, LostAnswer):
            if self.lost_answers is not None:
                self.lost_answers(self, reply)
            return
        self._reply_received(reply)

    def _reply_received(self, reply: wire.Result | wire.ErrorReply | wire.Progress) -> None:
        """Tell the owner which call ``reply`` is for, letting go of it if final."""
        if self.ahead and not isinstance(reply, wire.Progress):
            for ahead in self.ahead:
                if reply.id == ahead.id:
                    self.ahead.remove(ahead)
                    self._let_go(ahead)
                    self.owner.ahead_answered(self, ahead, reply)
                    return
        call = self.call
        if call is None or (
            reply.id != call.id and not (reply.id is None and type(reply) is wire.ErrorReply)
        ):
            # An id-less error answers a request the worker could not read at all.
            self.owner.bad_reply(self, f"a reply to request {reply.id!r}, which is not in flight")
            return
        if isinstance(reply, wire.Progress):
            self.owner.progress(self, call, reply.progress)
            return
        self.call = None
        self._let_go(call)
        self.owner.answered(self, call, reply)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport

    def lineLengthExceeded(self, line: bytes) -> None:
        self.owner.bad_reply(self, f"a reply longer than the limit of {self.MAX_LENGTH} bytes")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        ingest = self._ingest
        if ingest is not None and ingest.holds(self):
            # Replies read before the loss are handled before it: those waiting
            # their turn, and those read but not parsed while the turns paused it.
            *lines, _partial = self.clearLineBuffer().split(self.delimiter)
            for line in lines:
                ingest.received(self, functools.partial(self._line_received, line))
            ingest.received(self, lambda: self._connection_lost(reason))
            return
        self._connection_lost(reason)

    def _connection_lost(self, reason: Failure) -> None:
        self.lost = True
        if not self.accepted and not self.ready.called:
            # Still queued in the pool's listening socket: nothing was sent on it.
            self.ready.errback(reason)
        self.owner.lost(self, reason)

    # The calls it carries

    def carry(self, call: Call, line: bytes, *, ahead: bool = False) -> None:
        """
        Take ``call`` on, as the one the worker runs or, with ``ahead``, behind
        the calls before it, and write its request ``line``.
        """
        call.move(CallState.SENT)
        call.carrier = self
        if ahead:
            self.ahead.append(call)
        else:
            self.call = call
        self.target.load.carried()
        self.send(line)

    def carried(self) -> list[Call]:
        """:return: the calls on the connection, in the order they were sent."""
        return [call for call in (self.call, *self.ahead) if call is not None]

    def promote(self) -> None:
        """The first call sent ahead is now the one the worker runs."""
        self.call = self.ahead.popleft()

    def let_go_current(self) -> Call | None:
        """:return: the call the worker runs, if any, which the connection lets go."""
        call = self.call
        if call is not None:
            self.call = None
            self._let_go(call)
        return call

    def let_go_ahead(self) -> list[Call]:
        """:return: the calls sent ahead, in the order sent, which the connection lets go."""
        ahead = list(self.ahead)
        self.ahead.clear()
        for call in ahead:
            self._let_go(call)
        return ahead

    def let_go_all(self) -> list[Call]:
        """:return: every call on the connection, in the order sent, which it lets go."""
        current = self.let_go_current()
        ahead = self.let_go_ahead()
        return ahead if current is None else [current, *ahead]

    def _let_go(self, call: Call) -> None:
        call.carrier = None
        self.target.load.released()

    def cancel(self, call: Call) -> None:
        """Ask the worker to cancel ``call``."""
        self.send(wire.encode_cancel(wire.Cancel(id=call.id)))

    def send(self, data: bytes) -> None:
        """Write ``data`` to the connection, sending it now (see :mod:`._transport`)."""
        assert self.transport is not None
        write_now(self.transport, data)

    def close(self) -> None:
        """Close the connection once what was written is sent."""
        assert self.transport is not None
        self.transport.loseConnection()


class ConnectionFactory(Factory):
    """Builds the protocol of connection attempts to one address."""

    # One attempt per connection: "Starting factory" lines would flood the log.
    noisy = False

    def __init__(
        self,
        owner: IConnectionOwner,
        target: Target,
        max_message: int,
        secret: bytes | None,
        ingest: FairIngest | None = None,
    ) -> None:
        self._owner = owner
        self._target = target
        self._max_message = max_message
        self._secret = secret
        self._ingest = ingest

    def buildProtocol(self, addr: IAddress | None) -> TaskClientProtocol:
        return TaskClientProtocol(
            self._owner, self._target, self._max_message, self._secret, self._ingest
        )


class IdleConnections:
    """
    Open connections with nothing in flight, in the order they became idle: the
    newest is taken first, the oldest expires first, so one timer serves them all.

    :param reactor: provides ``IReactorTime``.
    :param timeout: seconds a connection may stay idle before it is closed.
    """

    def __init__(self, reactor: IReactorTime, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._connections: deque[TaskClientProtocol] = deque()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[TaskClientProtocol]:
        return iter(self._connections)

    def __contains__(self, connection: object) -> bool:
        return connection in self._connections

    def add(self, connection: TaskClientProtocol) -> None:
        """``connection`` has nothing in flight from now on."""
        connection.idle_since = self._reactor.seconds()
        self._connections.append(connection)
        if self._timer is None:
            self._timer = self._reactor.callLater(self._timeout, self._expire)

    def take(self) -> TaskClientProtocol:
        """:return: the most recently used idle connection, no longer idle."""
        return self._connections.pop()

    def put_back(self, connection: TaskClientProtocol) -> None:
        """Make the connection :meth:`take` just gave idle again, as it was."""
        self._connections.append(connection)

    def discard(self, connection: TaskClientProtocol) -> None:
        """``connection`` is closing: it is no longer idle, if it was."""
        if connection in self._connections:
            self._connections.remove(connection)

    def clear(self) -> None:
        """Forget every idle connection and stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._connections.clear()

    def _expire(self) -> None:
        """Close the connections idle for the timeout; wait for the next one."""
        self._timer = None
        now = self._reactor.seconds()
        idle = self._connections
        while idle and idle[0].idle_since + self._timeout <= now + _EPSILON:
            idle.popleft().close()
        if idle:
            delay = idle[0].idle_since + self._timeout - now
            self._timer = self._reactor.callLater(max(delay, 0.0), self._expire)


class ConnectionSet:
    """
    Every connection a client has: open ones (a worker accepted them; each is
    counted against its address until forgotten), attempts under way, the idle
    ones among the open, and the busy ones offered a prefetched call.

    Once closing, it fires its waiters when the last connection and attempt is gone.

    :param reactor: provides ``IReactorTime``.
    :param idle_timeout: seconds an unused connection stays open.
    :param prefetch: calls that may be sent ahead on each busy connection.
    """

    def __init__(self, reactor: IReactorTime, idle_timeout: float, prefetch: int) -> None:
        self.idle = IdleConnections(reactor, idle_timeout)
        self._open: set[TaskClientProtocol] = set()
        self._attempts: set[Deferred[TaskClientProtocol]] = set()
        self._prefetch = prefetch
        # Busy connections with room for a prefetched call, in the order they got
        # it (a dict as an ordered set: each at most once, forgotten with it; one
        # that has no room any more is skipped when reached).
        self._offered: dict[TaskClientProtocol, None] = {}
        self.closed = False
        self._waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        """Open connections and attempts under way, together."""
        return len(self._open) + len(self._attempts)

    @property
    def opening(self) -> int:
        """Connection attempts under way."""
        return len(self._attempts)

    def holds(self, connection: TaskClientProtocol) -> bool:
        """:return: whether ``connection`` is open and counted."""
        return connection in self._open

    def attempting(self, attempt: Deferred[TaskClientProtocol]) -> None:
        """Count a connection attempt under way until :meth:`attempt_over`."""
        self._attempts.add(attempt)

    def attempt_over(self, attempt: Deferred[TaskClientProtocol]) -> None:
        """A connection attempt succeeded or failed."""
        self._attempts.discard(attempt)

    def add(self, connection: TaskClientProtocol) -> None:
        """Count an open connection a worker accepted."""
        self._open.add(connection)
        connection.target.hold(connection.worker)

    def offer(self, connection: TaskClientProtocol) -> None:
        """Let a busy connection take prefetched calls, if it has room for one."""
        if connection.call is not None and len(connection.ahead) < self._prefetch:
            # Appended last: one call ahead on each busy connection before a second.
            self._offered[connection] = None

    def next_offered(self) -> TaskClientProtocol | None:
        """:return: the busy connection first offered that still has room, no longer offered."""
        while self._offered:
            connection = next(iter(self._offered))
            del self._offered[connection]
            if connection.call is not None and len(connection.ahead) < self._prefetch:
                return connection
            # Its call was answered (it is idle), or it filled up, since it was offered.
        return None

    def set_aside(self, connection: TaskClientProtocol) -> None:
        """Take a closing connection out of use (idle or offered), still counting it."""
        self.idle.discard(connection)
        self._offered.pop(connection, None)

    def forget(self, connection: TaskClientProtocol) -> None:
        """Stop counting a connection: it is closed or closing."""
        if connection in self._open:
            self._open.remove(connection)
            connection.target.let_go(connection.worker)
        self.set_aside(connection)

    def retire(self, connection: TaskClientProtocol) -> None:
        """Close a connection that has nothing in flight, and stop counting it."""
        self.forget(connection)
        connection.close()

    def retire_idle_beside(self, connection: TaskClientProtocol) -> None:
        """
        Retire the idle connections to the worker of ``connection``, which broke:
        most likely they broke with it, their loss not seen yet.
        """
        if connection.worker is None:
            return
        for same in [
            c for c in self.idle if c.target is connection.target and c.worker == connection.worker
        ]:
            self.retire(same)

    def close(self) -> list[TaskClientProtocol]:
        """
        Take no more connections from now on, and forget the idle ones.

        :return: the open connections, for the caller to close.
        """
        self.closed = True
        self.idle.clear()
        return list(self._open)

    def cancel_attempts(self) -> None:
        """Abandon the connection attempts under way."""
        for attempt in list(self._attempts):
            attempt.cancel()

    def when_closed(self) -> Deferred[None]:
        """:return: a Deferred that fires once closing and every connection is gone."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def check_closed(self) -> None:
        """Fire the waiters if closing and every connection and attempt is gone."""
        if self.closed and not self._open and not self._attempts:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)


def accepted(protocol: object) -> Deferred[TaskClientProtocol]:
    """
    :param protocol: what a connection attempt connected.
    :return: its Deferred that fires once the worker accepted the connection.
    """
    assert isinstance(protocol, TaskClientProtocol)  # what ConnectionFactory builds
    return protocol.ready
