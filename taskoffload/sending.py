"""
How a :class:`~taskoffload.client.TaskClient` puts its calls on connections:
on the most recently used idle connection, else on a new one to the least
loaded address, else (with prefetch) ahead on a busy one, else they wait in
line; and how it gives a call up and closes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.calls import Call, CallState, WaitingLine
from taskoffload.connections import (
    ConnectionFactory,
    ConnectionSet,
    IConnectionOwner,
    TaskClientProtocol,
    accepted,
)
from taskoffload.errors import TaskError
from taskoffload.ingest import FairIngest
from taskoffload.inquiry import LostInquiries
from taskoffload.poison import PoisonTable
from taskoffload.settling import Settler
from taskoffload.targets import Target, Targets

__all__ = ["REPLIES_PER_TURN", "Sender"]

#: Reply lines one lane's connections have handled per reactor turn (each may
#: send the next call, a system call that wakes a worker).
REPLIES_PER_TURN: Final = 16


class Sender:
    """
    Send calls over a client's connections, at most one running per connection
    (and up to ``prefetch`` more sent ahead on it).

    :param reactor: provides ``IReactorTime`` and ``IReactorTCP``, and
        ``IReactorUNIX`` for ``unix:`` addresses.
    :param targets: the pool addresses.
    :param log: where to log, under the client's name.
    :param idle_timeout: seconds an unused connection stays open.
    :param max_connections: bound on open and opening connections together.
    :param max_message: longest reply line accepted, in bytes.
    :param connect_timeout: seconds a connection attempt may take.
    :param secret: the pools' shared secret, if they ask for one.
    :param prefetch: calls that may be sent ahead on each busy connection.
    :param reroute: called with each call about to go out of the line: if the
        pool has said since that its task runs on another lane, it moves the
        call to that lane's line and returns ``True``.
    :param poison: the client's poison table: what its lost calls killed.
    """

    def __init__(
        self,
        reactor: Any,
        targets: Targets,
        log: Logger,
        *,
        idle_timeout: float,
        max_connections: int,
        max_message: int,
        connect_timeout: float,
        secret: bytes | None,
        prefetch: int,
        reroute: Callable[[Call], bool] | None = None,
        poison: PoisonTable | None = None,
    ) -> None:
        self._reactor = reactor
        self._reroute = reroute
        self._targets = targets
        self._log = log
        self._max_connections = max_connections
        self._max_message = max_message
        self._connect_timeout = connect_timeout
        self._secret = secret
        self._prefetch = prefetch
        self._line = WaitingLine()
        # The workers' replies, a bounded number per reactor turn: a burst of
        # replies on this lane never holds another lane's for long.
        self._ingest = FairIngest(reactor, per_turn=REPLIES_PER_TURN)
        self._connections = ConnectionSet(reactor, idle_timeout, prefetch)
        self._inquiries = LostInquiries(reactor, self._connections, self._open_carrier, poison)
        self._settler = Settler(self, self._line, self._connections, log, self._inquiries)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._connections.closed

    def submit(self, call: Call) -> None:
        """Send a new call on an idle connection if none waits before it, else queue it."""
        idle = self._connections.idle
        if idle and not self._line:
            connection = idle.take()
            error = self._send(connection, call)
            if error is not None:
                idle.put_back(connection)
                call.answer(error)
        else:
            self._line.append(call)
            self.dispatch()

    def probe(self) -> None:
        """
        Open one connection, if none is open or opening, only to hear a worker's
        acknowledgement (which describes the pool); with no call for it, it is
        closed once accepted.
        """
        if self.closed or len(self._connections):
            return
        target = self._targets.choose()
        if target is not None:
            self._open(target)

    def take_where(self, predicate: Callable[[Call], bool]) -> list[Call]:
        """Take the waiting calls ``predicate`` holds true of out of the line (see WaitingLine)."""
        return self._line.take_where(predicate)

    def dispatch(self) -> None:
        """
        Give waiting calls to idle connections, open connections for the rest
        and, with prefetch, send what those will not take ahead on busy ones.
        """
        connections = self._connections
        while self._line and connections.idle:
            self.use(connections.idle.take())
        while len(self._line) > connections.opening and len(connections) < self._max_connections:
            target = self._targets.choose()
            if target is None:
                if self._targets.all_down():
                    self._fail_unserved()
                break  # every pool has as many connections as it has slots: wait
            self._open(target)
        if self._prefetch:
            self._prefetch_calls()

    def use(self, connection: TaskClientProtocol) -> None:
        """Send the oldest waiting call on a free connection, or let it idle."""
        failed: list[tuple[Call, TaskError]] = []
        while (call := self._line.take()) is not None:
            if self._reroute is not None and self._reroute(call):
                continue
            error = self._send(connection, call)
            if error is None:
                break
            failed.append((call, error))
        else:
            self._connections.idle.add(connection)
        for call, error in failed:
            call.answer(error)

    def give_up(self, call: Call, error: TaskError) -> None:
        """Answer ``call`` with ``error`` now (its timeout or cancel), and cancel it if sent."""
        if call.state is CallState.QUEUED:
            self._line.withdraw(call)
        elif call.state is CallState.SENT:
            call.move(CallState.ABANDONED)
            assert call.carrier is not None
            call.carrier.cancel(call)
        else:
            return
        call.answer(error)

    def close(self) -> Deferred[None]:
        """
        Close every connection and refuse new calls.  Calls waiting or in flight
        fail with ``worker_lost`` ("client closed").

        :return: a Deferred that fires when every connection is gone.
        """
        closed = self._connections.when_closed()
        if not self.closed:
            dropped = self._line.withdraw_all()
            for connection in self._connections.close():
                for sent in connection.carried():
                    if sent.state is CallState.SENT:
                        sent.move(CallState.ABANDONED)
                        dropped.append(sent)
                connection.close()
            self._connections.cancel_attempts()
            for call in dropped:
                call.answer(TaskError(wire.WORKER_LOST, "client closed"))
        asked = self._inquiries.close()
        self._connections.check_closed()
        return defer.gatherResults([closed, asked]).addCallback(lambda _: None)

    def _prefetch_calls(self) -> None:
        """Send waiting calls ahead on busy connections, but those opening connections will take."""
        connections = self._connections
        while len(self._line) > connections.opening:
            connection = connections.next_offered()
            if connection is None:
                return
            call = self._line.take()
            if call is None:
                return
            if self._reroute is not None and self._reroute(call):
                connections.offer(connection)
                continue
            error = self._send(connection, call, ahead=True)
            if error is not None:
                connections.offer(connection)
                call.answer(error)

    def _send(
        self, connection: TaskClientProtocol, call: Call, ahead: bool = False
    ) -> TaskError | None:
        """
        Write ``call``'s request on ``connection``, as its current call or, with
        ``ahead``, behind the calls on it.

        :return: ``None``, or the error that kept the request from being written:
            the connection is then untouched and the call finished, its caller
            still to be answered.
        """
        line = call.request_line(self._reactor.seconds())
        if isinstance(line, TaskError):
            call.finish()
            return line
        connection.carry(call, line, ahead=ahead)
        self._connections.offer(connection)
        return None

    def _fail_unserved(self) -> None:
        """Every address is backing off: fail the waiting calls no connection is coming for."""
        message = self._targets.failures()
        # The newest calls go: the oldest are first in line for what connects.
        unserved = len(self._line) - self._connections.opening
        for call in self._line.withdraw_newest(unserved):
            call.answer(TaskError(wire.WORKER_LOST, message))

    # Connecting

    def _open_carrier(
        self, target: Target, owner: IConnectionOwner
    ) -> Deferred[TaskClientProtocol]:
        """
        :return: a Deferred firing with a connection to ``target`` for
            ``owner`` (no call of this lane's), once a worker accepted it.
        """
        factory = ConnectionFactory(owner, target, self._max_message, self._secret)
        whole = math.ceil(self._connect_timeout)
        attempt = clientFromString(self._reactor, target.address.endpoint(whole)).connect(factory)
        return attempt.addCallback(accepted)

    def _open(self, target: Target) -> None:
        """Start a connection attempt to ``target``."""
        factory = ConnectionFactory(
            self._settler, target, self._max_message, self._secret, self._ingest
        )
        attempt = target.connect(self._reactor, factory, self._connect_timeout)
        # Requests wait until the worker has accepted the connection, so none sits
        # in the listening socket's queue where a stopping pool would drop it.
        ready = attempt.addCallback(accepted)
        self._connections.attempting(ready)
        ready.addCallbacks(
            self._connected,
            self._connect_failed,
            callbackArgs=(ready, target),
            errbackArgs=(ready, target),
        ).addErrback(self._log_failure, "Connection bookkeeping for {address} failed", target)

    def _connected(
        self,
        connection: TaskClientProtocol,
        attempt: Deferred[TaskClientProtocol],
        target: Target,
    ) -> None:
        if connection.lost:
            # Closed by the other side before we got it: as good as refused.
            self._connect_failed(Failure(ConnectionError("closed at once")), attempt, target)
            return
        self._attempt_over(attempt, target)
        if self.closed:
            connection.close()
            self._connections.check_closed()
            return
        target.reached()
        if target.duplicate(connection.worker, connection.concurrency, bool(self._line)):
            # Another worker may take the next one; this worker's connections
            # already bring it work.
            connection.close()
            self.dispatch()
            return
        self._connections.add(connection)
        if not self._line:
            # Accepted after the calls it was opened for went elsewhere: holding
            # it idle would keep its worker reserved for nothing.
            self._connections.retire(connection)
            return
        self.use(connection)
        # Its acknowledgement may have told us the pool's size: open what more
        # connections the waiting calls need.
        self.dispatch()

    def _connect_failed(
        self, reason: Failure, attempt: Deferred[TaskClientProtocol], target: Target
    ) -> None:
        self._attempt_over(attempt, target)
        if self.closed:
            self._connections.check_closed()
            return
        if target.failed(reason, self._reactor.seconds()):
            self._log.warn(
                "Could not connect to {address}: {error}", address=str(target), error=target.error
            )
        self.dispatch()

    def _attempt_over(self, attempt: Deferred[TaskClientProtocol], target: Target) -> None:
        self._connections.attempt_over(attempt)
        target.attempt_ended()

    def _log_failure(self, failure: Failure, message: str, target: Target) -> None:
        self._log.failure(message, failure, address=str(target))
