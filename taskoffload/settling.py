"""
What becomes of the calls on a :class:`~taskoffload.client.TaskClient`'s
connection when the connection reports: a reply answers its call, a hand-back
or a goodbye puts calls back in line, and a bad line or a lost connection sends
idempotent calls once more and fails the rest with ``worker_lost``.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload import wire
from taskoffload.calls import ON_PROGRESS_RAISED, Call, CallState, WaitingLine
from taskoffload.connections import (
    ConnectionSet,
    FinalReply,
    IConnectionOwner,
    TaskClientProtocol,
)
from taskoffload.errors import TaskError
from taskoffload.inquiry import LostInquiries
from taskoffload.targets import Target

__all__ = ["Dispatch", "Settler"]


class Dispatch(Protocol):
    """What the settler asks of the sender once connections or calls are free."""

    def dispatch(self) -> None:
        """Send the waiting calls where they can go."""

    def use(self, connection: TaskClientProtocol) -> None:
        """Send the oldest waiting call on a free connection, or let it idle."""


def _handed_back(reply: FinalReply) -> bool:
    """The worker did not run the request: it was busy with another connection's."""
    return (
        type(reply) is wire.ErrorReply
        and reply.code == wire.OVERLOADED
        and reply.type == wire.WORKER_BUSY
    )


def _answer_reply(call: Call, reply: FinalReply) -> None:
    """Answer ``call`` with what its final reply says."""
    if type(reply) is wire.Result:
        call.answer(reply.result)
    else:
        assert isinstance(reply, wire.ErrorReply)
        call.answer(TaskError.from_reply(reply))


def _lost_error(target: Target, why: str) -> TaskError:
    return TaskError(
        wire.WORKER_LOST, f"lost the connection to {target} with the request in flight: {why}"
    )


@implementer(IConnectionOwner)
class Settler:
    """
    Settle the calls on a connection from what it reports.

    A connection freed by a final reply is used again before its call's caller
    hears of it, so that waiting calls keep their place in line ahead of any call
    the caller then makes.

    :param sender: sends what waits once a connection or call is free.
    :param line: the waiting calls.
    :param connections: the client's connections.
    :param log: where to log, under the client's name.
    :param inquiries: ask the pool why a lost connection's worker ended before
        its calls fail, and count the kills; without them the calls fail at once.
    """

    def __init__(
        self,
        sender: Dispatch,
        line: WaitingLine,
        connections: ConnectionSet,
        log: Logger,
        inquiries: LostInquiries | None = None,
    ) -> None:
        self._sender = sender
        self._line = line
        self._connections = connections
        self._log = log
        self._inquiries = inquiries

    def progress(self, connection: TaskClientProtocol, call: Call, value: Any) -> None:
        """Pass progress to the caller's ``on_progress`` while the caller waits."""
        if call.state is CallState.SENT and call.on_progress is not None:
            try:
                call.on_progress(value)
            except Exception:
                self._log.failure(ON_PROGRESS_RAISED, function=call.function)

    def answered(self, connection: TaskClientProtocol, call: Call, reply: FinalReply) -> None:
        """Reuse the connection, then answer the caller; resend a call handed back."""
        if _handed_back(reply):
            # The request did not run: this connection's worker is busy with other
            # work.  Drop the connection (an idle worker accepts the next one) and
            # send the request again, ahead of the calls waiting.  A call sent
            # behind it gets its own answer first.
            if not connection.ahead:
                self._connections.retire(connection)
            else:
                self._promote(connection)
            self._resend(call)
            return
        owed = call.finish()
        if not self._connections.closed:
            if connection.ahead:
                self._promote(connection)
                self._sender.dispatch()
            else:
                self._sender.use(connection)
        if owed:
            _answer_reply(call, reply)

    def ahead_answered(self, connection: TaskClientProtocol, call: Call, reply: FinalReply) -> None:
        """Offer the room to another call, then answer the caller; resend a call handed back."""
        if _handed_back(reply):
            self._resend(call)
            return
        owed = call.finish()
        if not self._connections.closed:
            self._connections.offer(connection)
            self._sender.dispatch()
        if owed:
            _answer_reply(call, reply)

    def goodbye(self, connection: TaskClientProtocol) -> None:
        """Retire the connection and put its calls, none of which ran, back in line."""
        self._connections.retire(connection)
        # Back to the head of the line in the order they were sent.
        for call in reversed(connection.let_go_all()):
            self._put_back(call)
        if not self._connections.closed:
            self._sender.dispatch()

    def bad_reply(self, connection: TaskClientProtocol, why: str) -> None:
        """Drop the connection: send its idempotent calls once more, fail the others."""
        target = connection.target
        self._log.warn(
            "Dropping the connection to {address} after a bad reply: {why}",
            address=str(target),
            why=why,
        )
        self._connections.set_aside(connection)
        connection.close()
        for lost_ahead in self._drop_ahead(connection, f"bad reply: {why}"):
            lost_ahead.answer(TaskError(wire.WORKER_LOST, f"bad reply from {target}: {why}"))
        call = connection.call
        if call is not None and call.state is CallState.SENT:
            if self._may_retry(call, target):
                # Detach the call and forget the closing connection now, so that its
                # loss later cannot touch the call's second attempt.
                connection.let_go_current()
                self._connections.forget(connection)
                self._retry(call, connection, f"bad reply: {why}")
                self._sender.dispatch()
                return
            call.move(CallState.ABANDONED)
            call.answer(TaskError(wire.WORKER_LOST, f"bad reply from {target}: {why}"))

    def lost(self, connection: TaskClientProtocol, reason: Failure) -> None:
        """Forget the connection: send its idempotent calls once more, fail the others."""
        if not self._connections.holds(connection):
            # Never handed over (lost while connecting), or already forgotten.
            return
        in_flight = connection.carried()
        self._connections.forget(connection)
        why = reason.getErrorMessage()
        if not self._connections.closed:
            # A lost connection most likely means a dead worker: its other, idle
            # connections are gone too.  Drop them before a waiting call is sent
            # out on one.
            self._connections.retire_idle_beside(connection)
        lost_ahead = self._drop_ahead(connection, why)
        lost: Call | None = None
        call = connection.let_go_current()
        if call is not None:
            if call.state is CallState.SENT and self._may_retry(call, connection.target):
                # Ahead of the waiting calls; the dispatch below sends it on.
                self._retry(call, connection, why)
            elif call.finish():
                lost = call
        if self._connections.closed:
            self._connections.check_closed()
        else:
            self._sender.dispatch()
        failed = [dropped for dropped in (lost, *lost_ahead) if dropped is not None]
        if self._inquiries is not None:
            # Answered once the pool says why the worker ended (or at the latest
            # 1 s on), each death counted against the calls it had (poison).
            self._inquiries.settle(connection, in_flight, failed, why)
            return
        for dropped in failed:
            dropped.answer(_lost_error(connection.target, why))

    def _promote(self, connection: TaskClientProtocol) -> None:
        """The call sent ahead on ``connection`` is now the one its worker runs."""
        connection.promote()
        self._connections.offer(connection)

    def _resend(self, call: Call) -> None:
        """Put a call that was sent but did not run back at the head of the line."""
        if self._put_back(call):
            self._sender.dispatch()

    def _put_back(self, call: Call) -> bool:
        """
        Requeue a detached call that did not run, unless its caller has had an
        answer or the client is closed; then it is finished.

        :return: whether it was requeued.
        """
        if call.state is CallState.SENT and not self._connections.closed:
            self._line.requeue(call)
            return True
        call.finish()
        return False

    def _may_retry(self, call: Call, target: Target) -> bool:
        """
        :return: whether a sent call whose connection to ``target`` broke before
            its reply is to be sent once more: its task is idempotent, and this
            was its first attempt.
        """
        return (
            not call.retried
            and not self._connections.closed
            and call.function in target.retry
            and not self._killed_twice(call)
        )

    def _killed_twice(self, call: Call) -> bool:
        """:return: whether this loss would be ``call``'s second kill: it goes no more."""
        poison = self._inquiries.poison if self._inquiries is not None else None
        return poison is not None and poison.killed_twice(call.function, call.args, call.kwargs)

    def _retry(self, call: Call, connection: TaskClientProtocol, why: str) -> None:
        """Requeue a call that :meth:`_may_retry` after ``connection`` broke; caller dispatches."""
        call.retried = True
        self._log.info(
            "Sending {function!r} once more: the connection to {address} broke with it "
            "in flight ({why})",
            function=call.function,
            address=str(connection.target),
            why=why,
        )
        # The worker's idle connections most likely broke with it: the second
        # attempt must go to another worker, not out on one.
        self._connections.retire_idle_beside(connection)
        self._line.requeue(call)

    def _drop_ahead(self, connection: TaskClientProtocol, why: str) -> list[Call]:
        """
        Let go of the calls sent ahead on a connection that is lost or dropped.
        They may have started (the reply to the call before one may be what was
        lost), so each is sent again only if idempotent, like a running call.

        :return: the calls whose callers are to get ``worker_lost``, in the order sent.
        """
        lost: list[Call] = []
        for ahead in reversed(connection.let_go_ahead()):
            if ahead.state is CallState.SENT and self._may_retry(ahead, connection.target):
                self._retry(ahead, connection, why)
            elif ahead.finish():
                lost.append(ahead)
        lost.reverse()
        return lost
