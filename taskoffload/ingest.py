"""
Fair ingest: the gateway's incoming messages handled a bounded number per reactor
turn, the connections taking turns, so that a burst of frames on some connections
never keeps another connection's message waiting until the whole burst has been
dispatched.

Autobahn hands over every message of a read at once, and the reactor reads every
ready connection in one turn: without a bound, a probe's message that arrives
with a thousand others waits for all of them.  With :class:`FairIngest`, the
first :data:`PER_TURN` messages of a turn are handled at once (an idle gateway
adds no delay); later ones wait, one queue per connection, and the next turns
take one message from each connection in turn.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["MAX_WAITING", "PER_TURN", "FairIngest", "IngestSource"]

#: Messages handled per reactor turn, over all connections.
PER_TURN: Final = 64

#: Messages one connection may have waiting before its reading is paused.
MAX_WAITING: Final = 64


class IngestSource(Protocol):
    """A connection whose messages :class:`FairIngest` handles."""

    def pause_reading(self) -> None:
        """Read no more messages from it until :meth:`resume_reading`."""

    def resume_reading(self) -> None:
        """Read its messages again."""


_log = Logger(namespace="taskoffload.ingest")


class FairIngest:
    """
    Hand messages to their handlers, at most ``per_turn`` in one reactor turn,
    the connections with messages waiting taking turns.

    A connection with ``max_waiting`` messages waiting is paused until they
    have all been handled, so a client that sends faster than its turns come
    queues in its own socket, not here.

    :param clock: schedules the next turn's share of the work.
    :param per_turn: how many messages one turn handles.
    :param max_waiting: how many messages one connection may have waiting.
    """

    def __init__(
        self, clock: IReactorTime, per_turn: int = PER_TURN, max_waiting: int = MAX_WAITING
    ) -> None:
        if per_turn < 1 or max_waiting < 1:
            raise ValueError("per_turn and max_waiting must be at least 1")
        self._clock = clock
        self._per_turn = per_turn
        self._max_waiting = max_waiting
        self._handled = 0
        self._turn: IDelayedCall | None = None
        #: The connections with messages waiting, in the order they take turns.
        self._waiting: dict[IngestSource, deque[Callable[[], object]]] = {}
        #: The connections paused because too many of their messages wait.
        self._paused: set[IngestSource] = set()

    @property
    def waiting(self) -> int:
        """Messages waiting for a later turn."""
        return sum(len(queue) for queue in self._waiting.values())

    def received(self, source: IngestSource, handle: Callable[[], object]) -> None:
        """
        A message arrived from ``source`` (a connection): call ``handle`` now if
        this turn's share allows and none of ``source``'s waits, else later, in
        order.
        """
        if self._turn is None:
            self._turn = self._clock.callLater(0, self._next_turn)
        queue = self._waiting.get(source)
        if queue is None and self._handled < self._per_turn:
            self._handled += 1
            self._call(handle)
            return
        if queue is None:
            queue = self._waiting[source] = deque()
        queue.append(handle)
        if len(queue) >= self._max_waiting and source not in self._paused:
            self._paused.add(source)
            source.pause_reading()

    def forget(self, source: IngestSource) -> None:
        """``source`` has gone: drop what it still had waiting."""
        self._waiting.pop(source, None)
        self._paused.discard(source)

    def _next_turn(self) -> None:
        """A new turn: handle waiting messages, a connection at a time, up to the share."""
        self._turn = None
        self._handled = 0
        waiting = self._waiting
        while waiting and self._handled < self._per_turn:
            source = next(iter(waiting))
            queue = waiting.pop(source)
            handle = queue.popleft()
            if queue:
                waiting[source] = queue  # to the back: the others take their turns first
            elif source in self._paused:
                self._paused.discard(source)
                source.resume_reading()
            self._handled += 1
            self._call(handle)
        if waiting or self._handled:
            # Messages still wait, or this turn took its share: the counting
            # starts again next turn.
            self._turn = self._clock.callLater(0, self._next_turn)

    def _call(self, handle: Callable[[], object]) -> None:
        try:
            handle()
        except Exception:
            _log.failure("Handling a message failed")
