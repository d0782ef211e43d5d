"""
A worker pool's listening sockets (:class:`PoolSockets`): the default lane's and
one for each lane, bound by the supervisor, which never accepts on them, and
passed to the fork server, whose children do.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.address import UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload.config import PoolConfig
from taskoffload.lanes import DEFAULT_LANE, lane_listen
from taskoffload.slots import SlotState, WorkerSlot

__all__ = ["PoolSockets", "bind_never_accepting", "lane_status"]

_log = Logger(namespace="taskoffload.supervisor")


def _with_backlog(description: str, backlog: int = 1024) -> str:
    """Add a generous ``backlog`` to a tcp/unix endpoint string that sets none."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


class _NeverAccept(Factory):
    """The supervisor's port never accepts; this only satisfies the endpoint API."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return None


def bind_never_accepting(reactor: Any, description: str) -> IListeningPort:
    """
    Listen on the server endpoint ``description`` (with a generous backlog), for
    children to accept on: this process never does.

    :raises Exception: what the endpoint raised, if it cannot listen.
    """
    endpoint = serverFromString(reactor, _with_backlog(description))
    ports: list[IListeningPort] = []
    failures: list[Failure] = []
    endpoint.listen(_NeverAccept()).addCallbacks(ports.append, failures.append)
    if failures:
        failures[0].raiseException()
    if not ports:
        raise RuntimeError(f"{description}: the endpoint did not listen at once")
    ports[0].stopReading()  # type: ignore[attr-defined]  # tcp.Port and unix.Port are FileDescriptors
    return ports[0]


class PoolSockets:
    """
    The listening sockets of one pool.

    :param reactor: returns the reactor to listen with (looked up on first use).
    :ivar port: the default lane's socket, while held.
    :ivar lane_ports: each lane's socket, in the order of the pool's lanes.
    """

    def __init__(self, reactor: Callable[[], Any]) -> None:
        self._reactor = reactor
        self.port: IListeningPort | None = None
        self.lane_ports: list[IListeningPort] = []

    def bind(self, config: PoolConfig) -> PoolConfig:
        """
        Listen where ``config`` says: on ``config.listen``, and for each lane on
        its own endpoint or one beside the pool's.

        :return: ``config`` with where each lane listens (its port or path).
        :raises Exception: what the endpoint raised, if one cannot listen.
        """
        self.port = self._bind(config.listen)
        lanes = []
        for lane in config.lanes:
            try:
                port = self._bind(lane.listen or lane_listen(config.listen, lane.name))
            except BaseException:
                # All or none: a later try binds them all again.
                for bound in self._all():
                    bound.stopListening()
                self.port, self.lane_ports = None, []
                raise
            self.lane_ports.append(port)
            host = port.getHost()
            if isinstance(host, UNIXAddress):
                name = host.name
                path = name.decode() if isinstance(name, bytes) else str(name)
                lanes.append(attrs.evolve(lane, path=path))
            else:
                lanes.append(attrs.evolve(lane, port=host.port))  # type: ignore[attr-defined]  # an IPv4Address or IPv6Address
        return attrs.evolve(config, lanes=tuple(lanes))

    def _bind(self, description: str) -> IListeningPort:
        return bind_never_accepting(self._reactor(), description)

    def _all(self) -> list[IListeningPort]:
        return [self.port, *self.lane_ports] if self.port is not None else []

    def fds(self) -> tuple[int, list[int]]:
        """:return: the default lane's socket's fd, and each lane's."""
        if self.port is None:
            raise RuntimeError("the pool's sockets are not bound")
        return (
            self.port.fileno(),  # type: ignore[attr-defined]  # ports are FileDescriptors
            [port.fileno() for port in self.lane_ports],  # type: ignore[attr-defined]
        )

    def log_listening(self, config: PoolConfig) -> None:
        """Log where the pool and its lanes listen."""
        if self.port is None:
            return
        _log.info(
            "Worker pool listening on {address}, starting {count} workers",
            address=self.port.getHost(),
            count=config.count,
        )
        for lane, port in zip(config.lanes, self.lane_ports, strict=True):
            _log.info(
                "Lane {lane}: {count} workers listening on {address}",
                lane=lane.name,
                count=lane.count,
                address=port.getHost(),
            )

    def refuse_new_connections(self) -> None:
        """
        Make every socket refuse connections from now on (the workers stop
        accepting anyway): a balancer or client then goes to another pool at
        once, instead of queueing where nobody will accept.
        """
        for port in self._all():
            listening = getattr(port, "socket", None)
            if listening is not None:
                try:
                    listening.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    async def close(self) -> None:
        """Stop listening on every socket."""
        ports = self._all()
        self.port, self.lane_ports = None, []
        for port in ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped


def lane_status(config: PoolConfig, slots: Iterable[WorkerSlot]) -> dict[str, dict[str, Any]]:
    """
    :return: each lane's workers, how many serve, and where a lane of its own
        listens, for ``/status``.
    """
    serving: dict[str, int] = {}
    for slot in slots:
        if slot.state is SlotState.SERVING:
            name = config.lane_name(slot.index)
            serving[name] = serving.get(name, 0) + 1
    lanes: dict[str, dict[str, Any]] = {
        DEFAULT_LANE: {"count": config.default_count, "serving": serving.get(DEFAULT_LANE, 0)}
    }
    for lane in config.lanes:
        where = {"port": lane.port} if lane.port is not None else {"path": lane.path}
        lanes[lane.name] = {"count": lane.count, "serving": serving.get(lane.name, 0), **where}
    return lanes
