"""
The pool addresses a :class:`~taskoffload.client.TaskClient` connects to: how
each is written and read (:class:`PoolAddress`), what the client knows of each
and holds on it (:class:`Target`: its load, its backoff, its workers), and the
choice of the address for the next connection (:class:`Targets`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IReactorTime
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.lanes import check_lane_name

__all__ = [
    "CONNECT_BACKOFF",
    "DUPLICATE_RETRIES",
    "EARLY_CLOSE_RETRIES",
    "FIRST_CONNECTS",
    "Load",
    "PoolAddress",
    "Target",
    "Targets",
    "parse_lane_address",
]

#: Seconds an address is skipped after a connection attempt to it failed.
CONNECT_BACKOFF: Final = 1.0

#: Connections in a row that an address may close before a worker takes them and
#: still be tried again at once; then it backs off like a refusing one.
EARLY_CLOSE_RETRIES: Final = 8

#: Connection attempts made to a pool before it has said how many task slots it has.
FIRST_CONNECTS: Final = 16

#: Connections in a row that may land on a worker the client already holds enough
#: connections to, and be closed to try for another worker; then one is kept.
DUPLICATE_RETRIES: Final = 4


@attrs.frozen
class PoolAddress:
    """
    Where a pool listens: ``tcp:HOST:PORT`` (or ``HOST:PORT``, IPv6 hosts in
    brackets) or ``unix:PATH``.

    :ivar kind: ``"tcp"`` or ``"unix"``.
    """

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> PoolAddress:
        """
        :raises ValueError: if ``text`` is not one of the accepted forms.
        """
        if text.startswith("unix:"):
            if len(text) == 5:
                raise ValueError(f"{text!r} is not a pool address: unix:PATH needs a path")
            return cls(kind="unix", path=text[5:])
        rest = text[4:] if text.startswith("tcp:") else text
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{text!r} is not a pool address: use tcp:HOST:PORT, HOST:PORT or unix:PATH"
            )
        return cls(kind="tcp", host=host, port=int(port))

    def endpoint(self, timeout: int) -> str:
        """
        :param timeout: whole seconds a connection attempt may take (endpoint
            strings take no fraction).
        :return: the client endpoint string that connects to the address, for
            :func:`~twisted.internet.endpoints.clientFromString`; the host or
            path is quoted, so an IPv6 host's colons stay in the host.
        """
        if self.kind == "unix":
            return f"unix:path={quoteStringArgument(self.path)}:timeout={timeout}"
        host = quoteStringArgument(self.host)
        return f"tcp:host={host}:port={self.port}:timeout={timeout}"

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_lane_address(text: str) -> tuple[str | None, PoolAddress]:
    """
    Read a pool address that may name a lane: ``LANE=ADDRESS`` is where the
    workers of lane ``LANE`` listen; a plain address is a pool's own.

    :return: the lane (``None`` for a plain address) and the address.
    :raises ValueError: if either part cannot be read.
    """
    head, equals, rest = text.partition("=")
    if equals and ":" not in head:
        return check_lane_name(head), PoolAddress.parse(rest)
    return None, PoolAddress.parse(text)


class Load:
    """
    How many calls are outstanding on the connections to one address: written,
    their final reply not yet read, whether their caller still waits or not.

    Only the connections change it, each as it takes a call on and lets it go
    (:class:`~taskoffload.connections.TaskClientProtocol`); the choice of
    address reads it.
    """

    __slots__ = ("_outstanding",)

    def __init__(self) -> None:
        self._outstanding = 0

    @property
    def outstanding(self) -> int:
        """The calls outstanding."""
        return self._outstanding

    def carried(self) -> None:
        """A connection took a call on."""
        self._outstanding += 1

    def released(self) -> None:
        """
        A connection let a call go.

        :raises RuntimeError: if none was outstanding.
        """
        if not self._outstanding:
            raise RuntimeError("a connection let go of a call it did not carry")
        self._outstanding -= 1


def _connect_timed_out(result: Any, timeout: float) -> Failure:
    """What an attempt that ran out of time fails with: as the reactor says it."""
    return Failure(error.TimeoutError())


class Target:
    """One pool address, what the pool said of itself, and the client's load on it."""

    __slots__ = (
        "address",
        "connecting",
        "down_until",
        "duplicates",
        "early_closes",
        "error",
        "load",
        "on_ack",
        "opened",
        "retry",
        "slots",
        "workers",
    )

    def __init__(
        self,
        address: PoolAddress,
        on_ack: Callable[[Target, wire.SessionAck], object] | None = None,
    ) -> None:
        self.address = address
        #: Told each session acknowledgement, after the target has read it.
        self.on_ack = on_ack
        #: Calls outstanding on its connections.
        self.load = Load()
        #: Connection attempts under way.
        self.connecting = 0
        #: Reactor time before which new connections go elsewhere.
        self.down_until = 0.0
        #: Why the last connection attempt failed, if it did.
        self.error: str | None = None
        #: The pool's idempotent tasks, from the latest session acknowledgement.
        self.retry: frozenset[str] = frozenset()
        #: Tasks the pool runs at once (workers x concurrency), once it has said.
        self.slots: int | None = None
        #: Connections in a row closed before a worker took them.
        self.early_closes = 0
        #: Open connections to it (accepted by a worker, not yet forgotten).
        self.opened = 0
        #: Of those, how many each worker process (by pid) accepted.
        self.workers: Counter[int] = Counter()
        #: Connections in a row closed because their worker already had enough.
        self.duplicates = 0

    def __str__(self) -> str:
        return str(self.address)

    def acknowledged(self, ack: wire.SessionAck) -> None:
        """A worker accepted a connection: take the latest word on the pool."""
        # The pool's task modules may change with a reload.
        self.retry = frozenset(ack.retry)
        if ack.slots:
            self.slots = ack.slots
        if self.on_ack is not None:
            self.on_ack(self, ack)

    def backing_off(self, now: float) -> bool:
        """:return: whether new connections go elsewhere at reactor time ``now``."""
        return self.down_until > now

    def at_capacity(self) -> bool:
        """
        More connections to the address would only wait: it has as many as the
        pool has task slots (it says how many when it accepts one), or, until it
        has said, :data:`FIRST_CONNECTS` attempts are under way.  Calls beyond
        wait in the client, and go out in order as connections free up, instead
        of queueing in the pool's listening socket where the first worker to
        accept takes them.
        """
        if self.slots is None:
            return self.connecting >= FIRST_CONNECTS
        return self.opened + self.connecting >= self.slots

    def connect(
        self, reactor: Any, factory: IProtocolFactory, timeout: float
    ) -> Deferred[IProtocol]:
        """
        Start a connection attempt, counted until :meth:`attempt_ended`.

        :param reactor: provides ``IReactorTime`` and ``IReactorTCP`` (or
            ``IReactorUNIX`` for a ``unix:`` address).
        :param timeout: seconds the attempt may take.
        :return: the endpoint's Deferred: it fires with the connected protocol.
        """
        self.connecting += 1
        whole = math.ceil(timeout)
        attempt = clientFromString(reactor, self.address.endpoint(whole)).connect(factory)
        if whole != timeout:
            # An endpoint string takes whole seconds: the reactor's own deadline
            # is the next whole one, and this one is exact.
            clock: IReactorTime = reactor
            attempt.addTimeout(timeout, clock, onTimeoutCancel=_connect_timed_out)
        return attempt

    def attempt_ended(self) -> None:
        """A connection attempt started by :meth:`connect` succeeded or failed."""
        self.connecting -= 1

    def reached(self) -> None:
        """A worker accepted a connection: the address is good again."""
        self.down_until = 0.0
        self.error = None
        self.early_closes = 0

    def failed(self, reason: Failure, now: float) -> bool:
        """
        A connection attempt failed.

        :param now: the reactor's time.
        :return: whether the address now backs off for :data:`CONNECT_BACKOFF`
            seconds; if not, a fresh attempt may go to it at once.
        """
        if reason.check(error.ConnectionDone, error.ConnectionLost):
            # Connected, then closed before a worker took the connection: a
            # balancer in front of a pool that is stopping, or a stopping pool's
            # accept queue.  Nothing was sent on it: try a fresh connection at
            # once, unless the address keeps doing it.
            self.early_closes += 1
            if self.early_closes <= EARLY_CLOSE_RETRIES:
                return False
        self.early_closes = 0
        self.down_until = now + CONNECT_BACKOFF
        self.error = reason.getErrorMessage()
        return True

    def duplicate(self, worker: int | None, concurrency: int, waiting: bool) -> bool:
        """
        :param worker: the process id of the worker that accepted a connection.
        :param concurrency: how many tasks that worker runs at once.
        :param waiting: whether calls wait for a connection.
        :return: whether the connection is better closed for a fresh try: each
            worker takes connections while it has a free slot, so a fast one can
            take another while others have none, and the calls would then crowd
            onto it (two tasks in a row) while another worker idles.  Its first
            connections will bring it work.  After :data:`DUPLICATE_RETRIES`
            such closes in a row, one is kept.
        """
        if worker is None:
            return False
        if self.workers[worker] >= concurrency and waiting and self.duplicates < DUPLICATE_RETRIES:
            self.duplicates += 1
            return True
        self.duplicates = 0
        return False

    def hold(self, worker: int | None) -> None:
        """Count an open connection that ``worker`` accepted."""
        self.opened += 1
        if worker is not None:
            self.workers[worker] += 1

    def let_go(self, worker: int | None) -> None:
        """Stop counting an open connection that ``worker`` accepted."""
        self.opened -= 1
        if worker is not None:
            self.workers[worker] -= 1
            if not self.workers[worker]:
                del self.workers[worker]


class Targets:
    """
    The addresses a client spreads its connections over.

    :param reactor: provides ``IReactorTime``.
    :param on_ack: given to each :class:`Target`.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        addresses: Sequence[PoolAddress],
        on_ack: Callable[[Target, wire.SessionAck], object] | None = None,
    ) -> None:
        self._reactor = reactor
        self._on_ack = on_ack
        self._targets = [Target(address, on_ack) for address in addresses]
        self._next = 0

    def __iter__(self) -> Iterator[Target]:
        return iter(self._targets)

    def add(self, address: PoolAddress, slots: int | None = None) -> bool:
        """
        Spread connections over ``address`` too, unless it is already among them.

        :param slots: its task slots, if known before it says (a pool tells of
            its lanes' slots).
        :return: whether it was added.
        """
        if any(target.address == address for target in self._targets):
            return False
        target = Target(address, self._on_ack)
        target.slots = slots
        self._targets.append(target)
        return True

    def choose(self) -> Target | None:
        """
        :return: the address for a new connection: the one with the fewest calls
            outstanding and attempts under way, ties taken in turn, among those
            neither backing off nor at capacity; ``None`` if there is none.
        """
        now = self._reactor.seconds()
        count = len(self._targets)
        best: Target | None = None
        best_index = 0
        best_load = 0
        for offset in range(count):
            index = (self._next + offset) % count
            target = self._targets[index]
            if target.backing_off(now) or target.at_capacity():
                continue
            load = target.load.outstanding + target.connecting
            if best is None or load < best_load:
                best, best_index, best_load = target, index, load
        if best is not None:
            self._next = (best_index + 1) % count
        return best

    def all_down(self) -> bool:
        """:return: whether every address is backing off."""
        now = self._reactor.seconds()
        return all(target.backing_off(now) for target in self._targets)

    def failures(self) -> str:
        """:return: why the addresses could not be reached, for a failed call."""
        return (
            "; ".join(
                f"could not connect to {target}: {target.error}"
                for target in self._targets
                if target.error is not None
            )
            or "no pool address is available"
        )

    def slots(self) -> int | None:
        """
        :return: how many tasks the pools run at once, as they said when they
            accepted a connection; ``None`` before any has.
        """
        known = [target.slots for target in self._targets if target.slots]
        return sum(known) if known else None
