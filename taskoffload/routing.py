"""
How a :class:`~taskoffload.client.TaskClient` sends each call to its lane: one
:class:`~taskoffload.sending.Sender` (a waiting line, connections and addresses)
per lane, the lane of each task as the pool last said, and the lanes' addresses,
given (``LANE=ADDRESS``) or learnt from the pools' session acknowledgements
(:class:`LaneRouter`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from taskoffload import wire
from taskoffload.calls import Call
from taskoffload.errors import TaskError
from taskoffload.lanes import DEFAULT_LANE, LaneInfo
from taskoffload.sending import Sender
from taskoffload.targets import PoolAddress, Target, Targets

__all__ = ["LaneRouter", "lane_address"]


def lane_address(pool: PoolAddress, lane: LaneInfo) -> PoolAddress | None:
    """
    :param pool: the address of a pool whose worker told of ``lane``.
    :return: where that lane's workers listen: the pool's host on the lane's
        port, or the lane's socket path; ``None`` if the lane gave neither that
        fits the pool's kind of address.
    """
    if pool.kind == "tcp" and lane.port is not None:
        return PoolAddress(kind="tcp", host=pool.host, port=lane.port)
    if pool.kind == "unix" and lane.path is not None:
        return PoolAddress(kind="unix", path=lane.path)
    return None


class LaneRouter:
    """
    The client's lanes, each with its own line, connections and addresses.

    :param reactor: as :class:`~taskoffload.sending.Sender` needs it.
    :param addresses: the lane of each address (``None``: a pool's own
        address, which serves the default lane and tells of the others).
    :param log: where to log, under the client's name.
    :param sender: the keyword arguments of every lane's
        :class:`~taskoffload.sending.Sender`.
    :raises ValueError: if no address is a pool's own.
    """

    def __init__(
        self,
        reactor: Any,
        addresses: Sequence[tuple[str | None, PoolAddress]],
        log: Logger,
        **sender: Any,
    ) -> None:
        self._reactor = reactor
        self._log = log
        self._sender = sender
        #: The lane of each task not on the default one, as the pool last said.
        self.routes: dict[str, str] = {}
        #: The pool's tasks described, as a worker last said (``None`` until one has).
        self.catalogue: tuple[dict[str, Any], ...] | None = None
        self._describing: list[Deferred[None]] = []
        self._senders: dict[str, Sender] = {}
        self._targets: dict[str, Targets] = {}
        #: Lanes whose addresses were given, not learnt.
        self._given: set[str] = set()
        plain = [address for lane, address in addresses if lane is None]
        if not plain:
            raise ValueError("a TaskClient needs at least one pool address that names no lane")
        self._add_lane(DEFAULT_LANE, plain)
        for lane, address in addresses:
            if lane is not None:
                self._given.add(lane)
                if lane in self._targets:
                    self._targets[lane].add(address)
                else:
                    self._add_lane(lane, [address])

    def _add_lane(self, lane: str, addresses: Sequence[PoolAddress]) -> None:
        targets = Targets(self._reactor, addresses, self._acknowledged)
        self._targets[lane] = targets
        self._senders[lane] = Sender(
            self._reactor, targets, self._log, reroute=self._reroute, **self._sender
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._senders[DEFAULT_LANE].closed

    def described(self) -> Deferred[None]:
        """
        :return: a Deferred that fires once a worker has described the pool's
            tasks (at once if one has), a connection opened for it if need be.
        """
        if self.catalogue is not None:
            return defer.succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._describing.remove(d))
        self._describing.append(d)
        self._senders[DEFAULT_LANE].probe()
        return d

    def lane_of(self, function: str) -> str:
        """:return: the lane ``function`` runs on, as the pool last said."""
        return self.routes.get(function, DEFAULT_LANE)

    def submit(self, call: Call) -> None:
        """Put ``call`` in its lane's line, or answer it if the lane has no address."""
        lane = self.lane_of(call.function)
        sender = self._senders.get(lane)
        if sender is None:
            call.lane = lane
            call.finish()
            call.answer(
                TaskError(
                    wire.WRONG_LANE,
                    f"{call.function} runs on lane {lane!r}, and no address of that lane "
                    f"is known: give one as {lane}=ADDRESS",
                )
            )
            return
        call.lane = lane
        sender.submit(call)

    def give_up(self, call: Call, error: TaskError) -> None:
        """Answer ``call`` with ``error`` (its timeout or cancel) through its lane."""
        self._senders[call.lane].give_up(call, error)

    def _reroute(self, call: Call) -> bool:
        """A call leaves its line: if its lane is now known to be another, move it there."""
        if self.lane_of(call.function) == call.lane:
            return False
        self.submit(call)
        return True

    def _acknowledged(self, target: Target, ack: wire.SessionAck) -> None:
        """
        A worker told of its pool's lanes: learn the addresses, take the routes,
        and move the calls waiting in a line that is not their lane's.
        """
        changed = ack.routes != self.routes
        if ack.tasks is not None:
            self.catalogue = ack.tasks
            waiting, self._describing = self._describing, []
            for d in waiting:
                d.callback(None)
        self._learn_addresses(target, ack)
        if changed:
            self.routes = dict(ack.routes)
            for lane, sender in list(self._senders.items()):
                for call in sender.take_where(self._elsewhere(lane)):
                    self.submit(call)

    def _elsewhere(self, lane: str) -> Callable[[Call], bool]:
        """:return: whether a call's task runs on a lane other than ``lane``."""
        return lambda call: self.lane_of(call.function) != lane

    def _learn_addresses(self, target: Target, ack: wire.SessionAck) -> None:
        """Take the addresses of the lanes ``ack`` tells of, but those given."""
        for lane in ack.lanes:
            if lane.name in self._given:
                continue
            address = lane_address(target.address, lane)
            if address is None:
                self._log.warn(
                    "The pool at {address} has lane {lane} but says nowhere it listens "
                    "that fits; give it as {lane}=ADDRESS",
                    address=str(target),
                    lane=lane.name,
                )
                continue
            targets = self._targets.get(lane.name)
            if targets is None:
                self._add_lane(lane.name, [])
                targets = self._targets[lane.name]
            # Its slots as the pool says, until its own workers say.
            targets.add(address, lane.slots)

    def slots(self, lane: str | None = None) -> int | None:
        """
        :return: how many tasks ``lane`` (``None``: every lane) runs at once, as
            its pools said; ``None`` before any has.
        """
        if lane is not None:
            # Read for each call the gateway admits: one lane's, without a list.
            targets = self._targets.get(lane)
            return targets.slots() if targets is not None else None
        known = [s for s in (t.slots() for t in self._targets.values()) if s]
        return sum(known) if known else None

    def close(self) -> Deferred[None]:
        """Close every lane's connections; see :meth:`Sender.close`."""
        closing = [sender.close() for sender in self._senders.values()]
        return defer.gatherResults(closing).addCallback(lambda _: None)
