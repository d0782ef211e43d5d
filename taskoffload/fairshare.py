"""
Fair admission to the pool: each client may have its share of the pool's
capacity (:meth:`~taskoffload.interfaces.ITaskPool.capacity`) at the pool at
once; its other calls wait in its own line here.  So one client's burst (a batch
of thousands, say) queues behind itself, and another client's call takes the next
free slot instead of waiting behind the whole burst.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.calls import cancelled_error
from taskoffload.errors import TaskError
from taskoffload.interfaces import ITaskPool

__all__ = ["FIRST_SHARE", "ClientLanes", "ClientLine", "FairShare", "LaneShares"]

#: The pool slots assumed until the pool says how many it has.
FIRST_SHARE = 16


class FairShare:
    """
    The pool's capacity, divided among the clients with calls waiting or running.

    :param pool: where the calls run.
    :param clock: for the deadlines of calls still waiting for their share.
    :param lane: the lane whose capacity is shared, or ``None`` for the pool's
        whole capacity.
    """

    def __init__(self, pool: ITaskPool, clock: IReactorTime, lane: str | None = None) -> None:
        self.pool = pool
        self.clock = clock
        self.lane = lane
        #: Clients with calls waiting or running, among which the pool is shared.
        self.active: set[ClientLine] = set()
        #: Of those, the clients with calls waiting beyond their share.
        self.held: set[ClientLine] = set()

    def client(self) -> ClientLine:
        """:return: the line of one new client."""
        return ClientLine(self)

    def share(self) -> int:
        """
        :return: how many calls one client may have at the pool at once: the
            pool's :meth:`~taskoffload.interfaces.ITaskPool.capacity` (or
            :data:`FIRST_SHARE` until it has said) divided among the active
            clients, rounded up, and at least 1.
        """
        # What the pool takes at once: its slots, or more if it prefetches.  Until
        # the pool has said, assume a small one: the first burst must not all
        # queue ahead of everyone else.
        total = (self.pool.capacity(self.lane) if self.lane else self.pool.capacity()) or (
            FIRST_SHARE
        )
        return max(1, -(-total // max(1, len(self.active))))

    def admit_held(self) -> None:
        """Let the clients held back take what their shares now allow."""
        for client in list(self.held):
            client.admit()


class _Ticket:
    """One call of one client, waiting for its share of the pool or running there."""

    __slots__ = (
        "args",
        "deadline",
        "function",
        "kwargs",
        "on_progress",
        "outcome",
        "submitted",
        "timer",
    )

    def __init__(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_progress: Callable[[Any], None] | None,
    ) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.on_progress = on_progress
        self.deadline: float | None = None
        self.timer: IDelayedCall | None = None
        self.outcome: Deferred[Any]
        self.submitted: Deferred[Any] | None = None


class ClientLine:
    """
    One client's calls: those the client's share lets through are at the pool,
    the others wait here, in order.

    :param share: the pool's division among the clients.
    """

    def __init__(self, share: FairShare) -> None:
        self._share = share
        self._waiting: deque[_Ticket] = deque()
        self._submitted = 0
        self._open = True

    def call(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_progress: Callable[[Any], None] | None,
    ) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)`` at the pool when this client's share allows.

        :param timeout: seconds from now to the result, time spent waiting here
            included; a call still waiting then fails with ``timeout``.
        :return: a Deferred that fires as the pool's does; cancelling it cancels
            the call, at the pool or here (with ``cancelled``).
        """
        started = self._share.clock.seconds()
        ticket = _Ticket(function, args, kwargs, on_progress)
        d: Deferred[Any] = Deferred(lambda _: self._cancel_ticket(ticket))
        ticket.outcome = d
        if timeout is not None:
            ticket.deadline = started + timeout
            ticket.timer = self._share.clock.callLater(timeout, self._ticket_expired, ticket)
        self._waiting.append(ticket)
        self._share.active.add(self)
        self._admit()
        return d

    @property
    def waiting(self) -> int:
        """This client's calls waiting here for its share."""
        return len(self._waiting)

    @property
    def submitted(self) -> int:
        """This client's calls at the pool."""
        return self._submitted

    def admit(self) -> None:
        """Hand the pool what waiting calls this client's share allows."""
        if self._open:
            self._admit()

    def close(self) -> None:
        """The client has gone (its calls cancelled): it no longer shares the pool."""
        self._open = False
        self._share.active.discard(self)
        self._share.held.discard(self)

    def _admit(self) -> None:
        share = self._share.share()
        while self._waiting and self._submitted < share:
            ticket = self._waiting.popleft()
            if ticket.timer is not None:
                ticket.timer.cancel()
                ticket.timer = None
            timeout = None
            if ticket.deadline is not None:
                timeout = ticket.deadline - self._share.clock.seconds()
                if timeout <= 0:
                    ticket.outcome.errback(TaskError(wire.TIMEOUT, "no worker was free in time"))
                    continue
            self._submitted += 1
            ticket.submitted = maybeDeferred(
                self._share.pool.send_task,
                ticket.function,
                ticket.args,
                ticket.kwargs,
                timeout=timeout,
                on_progress=ticket.on_progress,
            )
            ticket.submitted.addBoth(self._ticket_done, ticket)
        self._update_sharing()

    def _update_sharing(self) -> None:
        """Keep the share's ``active`` and ``held`` sets true of this client."""
        if self._waiting:
            self._share.held.add(self)
        else:
            self._share.held.discard(self)
            if not self._submitted:
                self._share.active.discard(self)

    def _ticket_done(self, outcome: Any, ticket: _Ticket) -> None:
        self._submitted -= 1
        ticket.submitted = None
        if not ticket.outcome.called:
            if isinstance(outcome, Failure):
                ticket.outcome.errback(outcome)
            else:
                ticket.outcome.callback(outcome)
        self._admit()
        if self._share.held and self not in self._share.active:
            # This client has left: the others' shares grew (one fewer active
            # client), so those held back take the freed slots now rather than
            # when their own calls next finish.
            self._share.admit_held()

    def _cancel_ticket(self, ticket: _Ticket) -> None:
        if ticket.submitted is not None:
            ticket.submitted.cancel()  # the pool sends the cancel; its failure follows
            return
        self._drop_waiting(ticket, cancelled_error())

    def _ticket_expired(self, ticket: _Ticket) -> None:
        ticket.timer = None
        self._drop_waiting(ticket, TaskError(wire.TIMEOUT, "no worker was free in time"))

    def _drop_waiting(self, ticket: _Ticket, error: TaskError) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            if ticket.timer is not None:
                ticket.timer.cancel()
                ticket.timer = None
            if not ticket.outcome.called:
                ticket.outcome.errback(error)
            self._update_sharing()


class LaneShares:
    """
    One :class:`FairShare` per lane of the pool: a burst on one lane waits
    behind itself there, and never delays another lane's calls.

    :param pool: where the calls run; it says which lane each task is on.
    :param clock: for the deadlines of calls still waiting for their share.
    """

    def __init__(self, pool: ITaskPool, clock: IReactorTime) -> None:
        self.pool = pool
        self.clock = clock
        #: Each lane's share, made when a call first goes to it.
        self.lanes: dict[str, FairShare] = {}

    def lane(self, name: str) -> FairShare:
        """:return: the share of lane ``name``."""
        share = self.lanes.get(name)
        if share is None:
            share = self.lanes[name] = FairShare(self.pool, self.clock, name)
        return share

    def client(self) -> ClientLanes:
        """:return: the lines of one new client, one per lane it calls."""
        return ClientLanes(self)

    def status(self) -> dict[str, dict[str, Any]]:
        """
        :return: for each lane called so far: its ``slots`` as the pool said,
            the calls ``waiting`` here for their share, and those ``at_pool``.
        """
        return {
            name: {
                "slots": self.pool.slots(name),
                "waiting": sum(line.waiting for line in share.active),
                "at_pool": sum(line.submitted for line in share.active),
            }
            for name, share in sorted(self.lanes.items())
        }


class ClientLanes:
    """
    One client's calls, in a :class:`ClientLine` per lane.

    :param shares: the pool's lanes, divided among the clients.
    """

    def __init__(self, shares: LaneShares) -> None:
        self._shares = shares
        self._lines: dict[str, ClientLine] = {}

    def call(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_progress: Callable[[Any], None] | None,
    ) -> Deferred[Any]:
        """See :meth:`ClientLine.call`: on the line of ``function``'s lane."""
        lane = self._shares.pool.lane_of(function)
        line = self._lines.get(lane)
        if line is None:
            line = self._lines[lane] = self._shares.lane(lane).client()
        return line.call(function, args, kwargs, timeout, on_progress)

    def close(self) -> None:
        """The client has gone: it no longer shares any lane."""
        for line in self._lines.values():
            line.close()
