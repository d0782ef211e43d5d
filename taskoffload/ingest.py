"""
Fair ingest: the gateway's incoming messages handled a bounded number per reactor
turn, the connections taking turns, so that a burst of frames on some connections
never keeps another connection's message waiting until the whole burst has been
dispatched.

Autobahn hands over every message of a read at once, and the reactor reads every
ready connection in one turn: without a bound, a probe's message that arrives
with a thousand others waits for all of them.  With :class:`FairIngest`, the
first :data:`PER_TURN` messages of a turn are handled at once (an idle gateway
adds no delay); later ones wait, one queue per connection.  The next turns
serve first the connections that began waiting since they were last served, in
the order they came, then take one message from each of the others in turn: a
client with one message is served before the second message of one with a
thousand.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Final, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["MAX_WAITING", "PER_TURN", "FairIngest", "IngestSource"]

#: Messages handled per reactor turn, over all connections.  Each one handled
#: costs a system call or two (its request written to a worker): at about 0.3 ms
#: each on a loaded machine, 16 keep a turn near 5 ms.
PER_TURN: Final = 16

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
        #: Connections that began waiting since they were last served, in the
        #: order they began: served first.
        self._fresh: OrderedDict[IngestSource, deque[Callable[[], object]]] = OrderedDict()
        #: Connections served with more waiting: one message each, in turn.
        self._rotation: OrderedDict[IngestSource, deque[Callable[[], object]]] = OrderedDict()
        #: The connection whose message a turn is handling, and whether what
        #: it brings meanwhile (a read's messages) has had its one at once.
        self._serving: IngestSource | None = None
        self._serving_used = False
        #: Connections served this turn: what more they have waits in the rotation.
        self._served: set[IngestSource] = set()
        #: The connections paused until what they have waiting is handled.
        self._paused: set[IngestSource] = set()

    @property
    def exhausted(self) -> bool:
        """Whether this turn has handled its share."""
        return self._handled >= self._per_turn

    @property
    def waiting(self) -> int:
        """Messages waiting for a later turn."""
        return sum(len(q) for q in (*self._fresh.values(), *self._rotation.values()))

    def received(
        self, source: IngestSource, handle: Callable[[], object], *, hold: bool = False
    ) -> None:
        """
        A message arrived from ``source`` (a connection): call ``handle`` now if
        this turn's share allows and none of ``source``'s waits, else later, in
        order.

        :param hold: if it waits, pause ``source`` at once, until what it has
            waiting is handled (for bytes not yet parsed: none is read beyond).
        """
        if self._turn is None:
            self._turn = self._clock.callLater(0, self._next_turn)
        queue = self._fresh.get(source) or self._rotation.get(source)
        serving = source is self._serving
        if queue is None and not self.exhausted and not (serving and self._serving_used):
            # What the connection being served brings: its first now, in its turn.
            self._serving_used = self._serving_used or serving
            self._served.add(source)
            self._handled += 1
            self._call(handle)
            return
        if queue is None:
            # The rest of what a served connection brings waits its next turn.
            queue = deque()
            (self._rotation if source in self._served else self._fresh)[source] = queue
        queue.append(handle)
        if (hold or len(queue) >= self._max_waiting) and source not in self._paused:
            self._paused.add(source)
            source.pause_reading()

    def holds(self, source: IngestSource) -> bool:
        """Whether ``source`` has messages waiting."""
        return source in self._fresh or source in self._rotation

    def forget(self, source: IngestSource) -> None:
        """``source`` has gone: drop what it still had waiting."""
        self._fresh.pop(source, None)
        self._rotation.pop(source, None)
        self._paused.discard(source)
        self._served.discard(source)

    def _next_turn(self) -> None:
        """A new turn: handle waiting messages, a connection at a time, up to the share."""
        # self._turn stays set while the turn runs: a message arriving meanwhile
        # must not schedule another turn (each would start the count again).
        self._handled = 0
        self._served.clear()
        fresh, rotation = self._fresh, self._rotation
        while (fresh or rotation) and not self.exhausted:
            if fresh:
                source, queue = fresh.popitem(last=False)
            else:
                source = next(iter(rotation))
                queue = rotation.pop(source)
            handle = queue.popleft()
            if queue:
                rotation[source] = queue  # to the back: the others take their turns first
            self._handled += 1
            self._served.add(source)
            self._serving, self._serving_used = source, False
            try:
                self._call(handle)
            finally:
                self._serving = None
            if source in self._paused and not self.holds(source):
                # Its last one handled (and none arrived meanwhile): read it again,
                # after, so what it reads next comes after what it had waiting.
                self._paused.discard(source)
                source.resume_reading()
        if fresh or rotation or self._handled:
            # Messages still wait, or this turn took its share: the counting
            # starts again next turn.
            self._turn = self._clock.callLater(0, self._next_turn)
        else:
            self._turn = None

    def _call(self, handle: Callable[[], object]) -> None:
        try:
            handle()
        except Exception:
            _log.failure("Handling a message failed")
