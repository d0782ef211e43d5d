"""
The client side of the worker port: :class:`TaskClient` sends tasks to a pool over
reused connections and fires one Deferred per task with its result.

Connections carry one request at a time (a worker runs one task at a time, so a
second request on a busy connection would wait behind the first).  A call takes the
most recently used idle connection, else opens a new one, else waits its turn; idle
connections close after a short time so they do not pin workers.

This module is the client's face: a call's record and the line it waits in are in
:mod:`taskoffload.calls`, the connections in :mod:`taskoffload.connections`, the
pool addresses in :mod:`taskoffload.targets`, and how calls go out and come back
in :mod:`taskoffload.sending` and :mod:`taskoffload.settling`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from taskoffload import wire
from taskoffload.calls import ON_PROGRESS_RAISED as ON_PROGRESS_RAISED
from taskoffload.calls import Call, check_timeout
from taskoffload.calls import cancelled_error as cancelled_error
from taskoffload.calls import encode_request_or_error as encode_request_or_error
from taskoffload.calls import timeout_error as timeout_error
from taskoffload.connections import TaskClientProtocol
from taskoffload.defaults import DEFAULT_POOL
from taskoffload.errors import TaskError
from taskoffload.flights import Flights
from taskoffload.interfaces import ITaskPool
from taskoffload.poison import DEFAULT_COOLDOWN, DEFAULT_WINDOW, PoisonTable
from taskoffload.routing import LaneRouter
from taskoffload.targets import CONNECT_BACKOFF, PoolAddress, parse_lane_address

__all__ = [
    "CONNECT_BACKOFF",
    "DEFAULT_POOL",
    "ITaskPool",
    "PoolAddress",
    "TaskClient",
    "TaskClientProtocol",
    "TaskError",
]


def pool_capacity(slots: int | None, prefetch: int) -> int | None:
    """
    :param slots: how many tasks the pool runs at once, or ``None`` if unknown.
    :param prefetch: how many calls are sent ahead on each busy connection.
    :return: how many calls the pool takes at once: ``slots`` times one more
        than ``prefetch``; ``None`` without ``slots``.
    """
    if slots is None:
        return None
    return slots * (1 + prefetch)


@implementer(ITaskPool)
class TaskClient:
    """
    Run tasks on one or more worker pools over reused connections.

    At most one request is in flight per connection.  A call takes the most
    recently used idle connection, else opens a new one (to the address with the
    fewest requests in flight, ties taken in turn) while fewer than
    ``max_connections`` exist, else waits in line.  An address that refuses a
    connection is skipped for :data:`CONNECT_BACKOFF` seconds; a request not yet
    sent then goes to another address, and fails with ``worker_lost`` only when
    every address has failed.

    A request that was sent is sent again only if the worker hands it back
    unrun (busy, or stopping), or if its task is idempotent: when the pool's
    session acknowledgement lists the task (``@task(retry=True)``) and the
    connection is lost (or dropped after a bad reply) before the result, the
    request goes once more, with what is left of its timeout, on another
    connection, so to another worker; the caller sees only the second attempt's
    reply, and a second loss fails it with ``worker_lost``.  Progress may then
    repeat.  A call that timed out or was cancelled is never sent again.

    Request ids are consecutive integers from 1, in the order of the calls.

    :param reactor: provides ``IReactorTime`` and ``IReactorTCP``, and
        ``IReactorUNIX`` for ``unix:`` addresses.
    :param addresses: pool addresses, see :class:`PoolAddress`; at least one
        names no lane.  ``"LANE=ADDRESS"`` sends the calls of lane ``LANE`` to
        ADDRESS instead of where the pools say that lane listens.
    :param idle_timeout: seconds an unused connection stays open.
    :param timeout: the default seconds to wait for a result, or ``None`` to wait
        as long as it takes.
    :param max_connections: bound on open and opening connections together,
        on each lane.
    :param max_message: longest reply line accepted, in bytes.
    :param connect_timeout: seconds a connection attempt may take.
    :param secret: the pools' shared secret, if they ask for one (an HMAC
        challenge on each connection).
    :param prefetch: while calls wait for a free connection, send up to this many
        of them ahead on each busy connection, where the worker queues them and
        starts each the moment the task before it ends, instead of a round trip
        later.  The cost: a prefetched call waits for the tasks ahead of it even
        if another worker frees first, and if its worker is lost it fails with
        ``worker_lost`` (or is sent again, if idempotent) like the call ahead of
        it, since the client cannot tell whether it had started.
    :param poison_window: seconds within which a call (function and arguments)
        that killed two workers is quarantined; 0: never (:mod:`taskoffload.poison`).
    :param poison_cooldown: seconds a quarantined call is answered ``poisoned``
        at once instead of being sent.
    :raises ValueError: for an unreadable address or an out-of-range number.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        addresses: Sequence[str],
        *,
        idle_timeout: float = 2.0,
        timeout: float | None = None,
        max_connections: int = 1024,
        max_message: int = wire.DEFAULT_MAX_MESSAGE,
        connect_timeout: float = 5.0,
        secret: bytes | None = None,
        prefetch: int = 0,
        poison_window: float = DEFAULT_WINDOW,
        poison_cooldown: float = DEFAULT_COOLDOWN,
    ) -> None:
        if isinstance(addresses, str):
            raise ValueError("addresses is a sequence of address strings, not one string")
        if not addresses:
            raise ValueError("a TaskClient needs at least one pool address")
        if idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        check_timeout(timeout, or_none=True)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_message < 1:
            raise ValueError("max_message must be at least 1")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        if prefetch < 0:
            raise ValueError("prefetch must not be negative")
        self._reactor = reactor
        self._timeout = timeout
        self._prefetch = prefetch
        self._ids = itertools.count(1)
        #: The calls that killed workers lately (``/status``'s ``poison``).
        self.poison = PoisonTable(reactor, poison_window, poison_cooldown)
        self._flights = Flights()  # the calls sent with a key
        self._lanes = LaneRouter(
            reactor,
            [parse_lane_address(text) for text in addresses],
            self.log,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            max_message=max_message,
            connect_timeout=connect_timeout,
            secret=secret,
            prefetch=prefetch,
            poison=self.poison,
        )

    # ITaskPool

    def call(self, function: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)`` with the client's default timeout.

        :return: a Deferred that fires with the result or fails with
            :class:`TaskError`.
        """
        return self.send_task(function, args, kwargs)

    def send_task(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Any], object] | None = None,
        key: str | None = None,
    ) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)``.

        When ``timeout`` passes first, the Deferred fails with ``timeout`` and a
        cancel is sent; cancelling the Deferred fails it with ``cancelled`` and
        sends a cancel if the request was sent.  Either way the connection is
        reused only after the worker's final reply.  If the connection is lost
        first, the Deferred fails with ``worker_lost``, unless the pool declares
        the task idempotent: then it is sent once more (see :class:`TaskClient`).

        :param function: the registered name of the task.
        :param args: positional arguments; JSON-serializable.
        :param kwargs: keyword arguments; JSON-serializable.
        :param timeout: seconds to wait for the result, counted from now; ``None``
            for the client's default.  It is sent along so the worker enforces it too.
        :param on_progress: called with each progress value the task reports
            before its result; what it raises is logged.
        :param key: single flight: while a call of ``function`` sent with the
            same key by this client runs, join it (its progress from then on,
            its outcome) instead of sending another; ``args``, ``kwargs`` and
            ``timeout`` are then not used.  Cancelling leaves the run to its
            other callers; the last to leave cancels it (:mod:`taskoffload.flights`).
        :return: a Deferred that fires with the result or fails with
            :class:`TaskError`.
        :raises ValueError: if ``timeout`` is not positive, or ``key`` not a
            non-empty string.
        """
        check_timeout(timeout)
        if key is not None:
            if not isinstance(key, str) or not key:
                raise ValueError("key must be a non-empty string")
            return self._flights.call(
                function,
                key,
                lambda progress: self.send_task(function, args, kwargs, timeout, progress),
                on_progress,
            )
        if timeout is None:
            timeout = self._timeout
        if self._lanes.closed:
            return defer.fail(TaskError(wire.WORKER_LOST, "client closed"))
        refused = self.poison.refusal(function, args, kwargs or {})
        if refused is not None:
            return defer.fail(refused)
        call = Call(
            next(self._ids),
            function,
            tuple(args),
            dict(kwargs) if kwargs else {},
            timeout,
            on_progress,
            self._lanes.give_up,
        )
        call.start_timer(self._reactor)
        self._lanes.submit(call)
        return call.deferred

    def slots(self, lane: str | None = None) -> int | None:
        """
        :param lane: a lane's name, or ``None`` for all of them.
        :return: how many tasks the pools run at once on ``lane``, as they said
            when they accepted a connection; ``None`` before any has.
        """
        return self._lanes.slots(lane)

    def capacity(self, lane: str | None = None) -> int | None:
        """
        :param lane: a lane's name, or ``None`` for all of them.
        :return: how many calls the pools take at once on ``lane`` before calls
            wait in this client: their slots, times one more than ``prefetch``;
            ``None`` before any pool has said how many slots it has.
        """
        return pool_capacity(self.slots(lane), self._prefetch)

    def lane_of(self, function: str) -> str:
        """
        :return: the lane ``function`` runs on, as the pool last said
            (``"default"`` until it has).
        """
        return self._lanes.lane_of(function)

    def catalogue(self) -> list[dict[str, Any]] | None:
        """
        :return: the pool's tasks, each described as in ``GET /tasks`` (name,
            doc, timeout, retry, lane, progress and parameters), as a worker
            last said when it accepted a connection; ``None`` before any has.
        """
        known = self._lanes.catalogue
        return list(known) if known is not None else None

    def describe(self, timeout: float = 5.0) -> Deferred[list[dict[str, Any]] | None]:
        """
        :return: a Deferred that fires with :meth:`catalogue`: at once if a
            worker has described the pool's tasks, else once one does (a
            connection is opened for it, and closed again if no call needs it),
            or with ``None`` after ``timeout`` seconds.
        """
        d = self._lanes.described()
        d.addTimeout(timeout, self._reactor, onTimeoutCancel=lambda _, __: None)
        return d.addCallback(lambda _: self.catalogue())

    # Lifecycle

    def close(self) -> Deferred[None]:
        """
        Close every connection and refuse new calls.  Calls waiting or in flight
        fail with ``worker_lost`` ("client closed").

        :return: a Deferred that fires when every connection is gone.
        """
        return self._lanes.close()
