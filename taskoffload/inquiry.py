"""
Asking a pool why a worker died (:class:`LostInquiries`): when a connection
whose worker named its pid, and said its pool keeps a death journal
(``"deaths": true`` in its acknowledgement), is lost with calls in flight, the calls that are to
fail wait for the answer to ``{"lost": PID}`` (:mod:`taskoffload.lost`), asked
of another worker of the same pool address, again every :data:`ASK_INTERVAL`
while it says ``null``, for at most :data:`ASK_FOR` in all; then they fail with
``worker_lost`` carrying the cause (or saying it is unknown).  A confirmed death
counts a kill for every call that was in flight to the worker
(:class:`~taskoffload.poison.PoisonTable`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload import wire
from taskoffload.calls import Call
from taskoffload.connections import ConnectionSet, IConnectionOwner, TaskClientProtocol
from taskoffload.errors import TaskError
from taskoffload.lost import LostAnswer, LostQuery, describe, encode_lost_query
from taskoffload.poison import PoisonTable
from taskoffload.targets import Target

__all__ = ["ASK_FOR", "ASK_INTERVAL", "LostInquiries", "lost_error"]

#: Seconds between two questions while the pool has no record yet.
ASK_INTERVAL: Final = 0.05
#: Seconds the calls wait for the answer at most, from the loss.
ASK_FOR: Final = 1.0
#: Deaths remembered once confirmed (a second connection to the same worker
#: may be found lost later).
_REMEMBERED: Final = 256

#: What opens a connection of the inquiry's own to an address.
OpenCarrier = Callable[[Target, IConnectionOwner], "Deferred[TaskClientProtocol]"]


def lost_error(
    target: Target, why: str, pid: int | None, cause: dict[str, Any] | None
) -> TaskError:
    """:return: the ``worker_lost`` error of a call lost with worker ``pid``."""
    head = f"lost the connection to {target} with the request in flight"
    if cause is not None:
        return TaskError(
            wire.WORKER_LOST, f"{head}: worker {pid} died: {describe(cause)}", cause=cause
        )
    if pid is None:
        return TaskError(wire.WORKER_LOST, f"{head}: {why}")
    return TaskError(
        wire.WORKER_LOST, f"{head}: {why} (the pool did not say why worker {pid} ended)"
    )


def _answer(calls: Sequence[Call], error: TaskError) -> None:
    for call in calls:
        # A caller that cancelled meanwhile has had its answer.
        if not call.deferred.called:
            call.answer(error)


@implementer(IConnectionOwner)
class _CarrierOwner:
    """The owner of a connection opened for questions: it carries no call."""

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def progress(self, connection: TaskClientProtocol, call: Call, value: Any) -> None:
        pass

    def answered(self, connection: TaskClientProtocol, call: Call, reply: Any) -> None:
        pass

    def ahead_answered(self, connection: TaskClientProtocol, call: Call, reply: Any) -> None:
        pass

    def goodbye(self, connection: TaskClientProtocol) -> None:
        connection.close()

    def bad_reply(self, connection: TaskClientProtocol, why: str) -> None:
        connection.close()

    def lost(self, connection: TaskClientProtocol, reason: Failure) -> None:
        if not self.closed.called:
            self.closed.callback(None)


class _Inquiry:
    """The question about one dead worker, and the calls that wait for its answer."""

    def __init__(self, owner: LostInquiries, target: Target, pid: int, why: str) -> None:
        self._owner = owner
        self.target = target
        self.pid = pid
        self.why = why
        self.in_flight: list[Call] = []
        self.failed: list[Call] = []
        clock = owner.reactor
        self._deadline: IDelayedCall = clock.callLater(ASK_FOR, self.finish, None)
        self._again: IDelayedCall | None = None
        self._carrier: TaskClientProtocol | None = None
        self._opening = False
        self.done = False

    def add(self, in_flight: Sequence[Call], failed: Sequence[Call]) -> None:
        self.in_flight.extend(in_flight)
        self.failed.extend(failed)

    def ask(self) -> None:
        """Ask the pool, over an idle connection to another worker, else a new one."""
        self._again = None
        if self.done:
            return
        carrier = self._carrier
        if carrier is None or carrier.lost:
            carrier = self._carrier = self._owner.idle_beside(self.target, self.pid)
        if carrier is not None:
            carrier.lost_answers = self._owner.answered
            carrier.send(encode_lost_query(LostQuery(pid=self.pid)))
        elif not self._opening:
            self._opening = True
            self._owner.open(self.target).addCallbacks(self._opened, self._not_opened)

    def _opened(self, carrier: TaskClientProtocol) -> None:
        self._opening = False
        if self.done or carrier.lost:
            carrier.close()
            return
        self._carrier = carrier
        self.ask()

    def _not_opened(self, reason: Failure) -> None:
        self._opening = False
        if not self.done:
            self.not_yet()

    def not_yet(self) -> None:
        """The pool has no record (yet): ask again shortly, while there is time."""
        if not self.done and self._again is None:
            self._again = self._owner.reactor.callLater(ASK_INTERVAL, self.ask)

    def finish(self, cause: dict[str, Any] | None) -> None:
        """Answer the waiting calls with ``cause`` (``None``: unknown)."""
        if self.done:
            return
        self.done = True
        for timer in (self._deadline, self._again):
            if timer is not None and timer.active():
                timer.cancel()
        self._owner.finished(self, cause)


class LostInquiries:
    """
    The questions a client's lane asks its pools about dead workers.

    :param reactor: provides ``IReactorTime``.
    :param connections: the lane's connections; an idle one carries a question.
    :param open_carrier: opens a connection of the inquiries' own.
    :param poison: counts the kills of confirmed deaths.
    """

    def __init__(
        self,
        reactor: Any,
        connections: ConnectionSet,
        open_carrier: OpenCarrier,
        poison: PoisonTable | None = None,
    ) -> None:
        self.reactor = reactor
        self._connections = connections
        self._open_carrier = open_carrier
        self.poison = poison
        self._asking: dict[tuple[int, int], _Inquiry] = {}
        #: Confirmed deaths: their cause and the calls counted for them.
        self._confirmed: OrderedDict[tuple[int, int], tuple[dict[str, Any], set[str]]] = (
            OrderedDict()
        )
        self._carriers: list[tuple[TaskClientProtocol, _CarrierOwner]] = []

    def settle(
        self,
        connection: TaskClientProtocol,
        in_flight: Sequence[Call],
        failed: Sequence[Call],
        why: str,
    ) -> None:
        """
        ``connection`` was lost with ``in_flight`` calls; ``failed`` are those
        to fail (the others were sent once more): answer them, once the pool
        says why its worker ended if it named itself.
        """
        target, pid = connection.target, connection.worker
        if pid is None or not connection.tells_deaths or self._connections.closed or not in_flight:
            _answer(failed, lost_error(target, why, pid, None))
            return
        key = (id(target), pid)
        confirmed = self._confirmed.get(key)
        if confirmed is not None:
            cause, counted = confirmed
            self._count(in_flight, counted)
            _answer(failed, lost_error(target, why, pid, cause))
            return
        inquiry = self._asking.get(key)
        if inquiry is None:
            inquiry = self._asking[key] = _Inquiry(self, target, pid, why)
            inquiry.add(in_flight, failed)
            inquiry.ask()
        else:
            inquiry.add(in_flight, failed)

    def idle_beside(self, target: Target, pid: int) -> TaskClientProtocol | None:
        """:return: an idle connection to ``target`` that another worker than ``pid`` took."""
        for connection in self._connections.idle:
            if connection.target is target and connection.worker != pid and not connection.lost:
                return connection
        return None

    def open(self, target: Target) -> Deferred[TaskClientProtocol]:
        """:return: a Deferred firing with a new connection to ``target``, accepted."""
        self._carriers = [(c, o) for c, o in self._carriers if not c.lost]
        owner = _CarrierOwner()
        opened = self._open_carrier(target, owner)

        def keep(carrier: TaskClientProtocol) -> TaskClientProtocol:
            self._carriers.append((carrier, owner))
            carrier.lost_answers = self.answered
            return carrier

        return opened.addCallback(keep)

    def answered(self, connection: TaskClientProtocol, answer: LostAnswer) -> None:
        """A worker answered a question on ``connection``."""
        inquiry = self._asking.get((id(connection.target), answer.pid))
        if inquiry is None:
            return
        if answer.cause is None:
            inquiry.not_yet()
        else:
            inquiry.finish(answer.cause)

    def finished(self, inquiry: _Inquiry, cause: dict[str, Any] | None) -> None:
        """``inquiry`` is over: count the kills of a confirmed death, answer its calls."""
        key = (id(inquiry.target), inquiry.pid)
        self._asking.pop(key, None)
        if cause is not None:
            counted: set[str] = set()
            self._confirmed[key] = (cause, counted)
            while len(self._confirmed) > _REMEMBERED:
                self._confirmed.popitem(last=False)
            self._count(inquiry.in_flight, counted)
        if not self._asking:
            self._close_carriers()
        _answer(inquiry.failed, lost_error(inquiry.target, inquiry.why, inquiry.pid, cause))

    def _count(self, calls: Sequence[Call], counted: set[str]) -> None:
        if self.poison is not None and calls:
            self.poison.record(((c.function, c.args, c.kwargs) for c in calls), counted)

    def _close_carriers(self) -> None:
        for carrier, _owner in self._carriers:
            if not carrier.lost:
                carrier.close()

    def close(self) -> Deferred[None]:
        """
        The client closes: answer the waiting calls now, without a cause.

        :return: a Deferred firing once the inquiries' own connections are gone.
        """
        for inquiry in list(self._asking.values()):
            inquiry.finish(None)
        self._close_carriers()
        closing = [owner.closed for carrier, owner in self._carriers if not carrier.lost]
        self._carriers = []
        return defer.gatherResults(closing).addCallback(lambda _: None)
