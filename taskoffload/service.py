"""The gateway as a service: its pool client, its WebSocket factory and its site."""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload.access import GatewayAccess
from taskoffload.client import TaskClient
from taskoffload.defaults import AUTO_PING, STOP_TIMEOUT
from taskoffload.gateway import GatewayFactory
from taskoffload.interfaces import ITaskPool
from taskoffload.poison import DEFAULT_COOLDOWN, DEFAULT_WINDOW
from taskoffload.session import GatewayLimits
from taskoffload.shared_metrics import (
    SharedGatewayMetrics,
    read_pool_status,
    shared_gateway_status,
)
from taskoffload.signals import stop_when_running
from taskoffload.stats import GatewayMetrics, GatewayStats
from taskoffload.supervisor import WorkerPoolService
from taskoffload.web import make_site, status_document

if TYPE_CHECKING:
    from taskoffload.outbox import Outbox

__all__ = ["SAMPLE_INTERVAL", "GatewayService", "SharedPort", "pool_address"]

#: Seconds between writes of a shared gateway process's gauges.
SAMPLE_INTERVAL: Final = 0.25


@attrs.frozen
class SharedPort:
    """
    What one of several gateway processes on one port serves with.

    :ivar fd: the listening socket, inherited from the parent.
    :ivar family: its address family: ``socket.AF_INET``, ``AF_INET6`` or ``AF_UNIX``.
    :ivar directory: the directory of the processes' shared counters.
    :ivar pool_in_parent: the parent runs the pool (role all) and writes its state there.
    """

    fd: int
    family: int
    directory: str
    pool_in_parent: bool = False


_log = Logger(namespace="taskoffload.gateway")


def pool_address(port: IListeningPort) -> str:
    """The client address of a pool's listening port."""
    host = port.getHost()
    if isinstance(host, (IPv4Address, IPv6Address)):
        name = host.host
        if name in ("0.0.0.0", ""):
            name = "127.0.0.1"
        elif name == "::":
            name = "::1"
        if isinstance(host, IPv6Address):
            name = f"[{name}]"
        return f"tcp:{name}:{host.port}"
    if isinstance(host, UNIXAddress) and host.name is not None:
        name = host.name.decode() if isinstance(host.name, bytes) else host.name
        return f"unix:{name}"
    raise ValueError(f"cannot reach a pool listening on {host}")


class GatewayService(Service):
    """
    Serve the gateway's site on ``listen`` and send its tasks to the pools.

    :param pool_addresses: the pools to use (role gateway).
    :param pool_service: the pool in this process (role all): its address is
        used, and its state shown in ``/status``.
    :param access: who may use the site; by default anyone.
    :param prefetch: how many calls the gateway's ``TaskClient`` may send ahead
        to each busy worker (see :class:`~taskoffload.client.TaskClient`).
    :param shared: for one of several gateway processes on one port: the socket
        it serves (inherited from the parent, with its address family) instead of
        ``listen``, and the directory of the counters the processes share
        (:mod:`taskoffload.shared_metrics`).
    :param poison: the ``--poison-window`` and ``--poison-cooldown`` of the
        gateway's ``TaskClient`` (:mod:`taskoffload.poison`).
    :param outbox: the embedded outbox (role all given neither ``--smtp-host`` nor
        ``--smtp-port``), served at ``/outbox``; without it there is no ``/outbox``.
    """

    def __init__(
        self,
        listen: str,
        pool_addresses: Sequence[str] = (),
        pool_service: WorkerPoolService | None = None,
        limits: GatewayLimits | None = None,
        auto_ping: float = AUTO_PING,
        stop_timeout: float = STOP_TIMEOUT,
        reactor: Any = None,
        access: GatewayAccess | None = None,
        secret: bytes | None = None,
        prefetch: int = 0,
        poison: tuple[float, float] = (DEFAULT_WINDOW, DEFAULT_COOLDOWN),
        shared: SharedPort | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.shared = shared
        self.outbox = outbox
        self.secret = secret
        self.prefetch = prefetch
        self.poison = poison
        self.stop_timeout = stop_timeout
        self.listen = listen
        self.pool_addresses = list(pool_addresses)
        self.pool_service = pool_service
        self.limits = limits or GatewayLimits()
        self.auto_ping = auto_ping
        self.access = access or GatewayAccess()
        self._reactor = reactor
        self.client: ITaskPool | None = None
        self._metrics: GatewayMetrics | SharedGatewayMetrics | None = None
        self._sampling: task.LoopingCall | None = None
        self.port: IListeningPort | None = None
        self.stats: GatewayStats | None = None
        self.factory: GatewayFactory | None = None
        # Fires with the listening port, or None if it could not listen.
        self._listening: Deferred[IListeningPort | None] | None = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def _addresses(self) -> list[str]:
        if self.pool_service is not None and self.pool_service.port is not None:
            return [pool_address(self.pool_service.port)]
        return self.pool_addresses

    def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        assert self.stats is not None

        def pool() -> dict[str, Any] | None:
            if self.pool_service is not None:
                return self.pool_service.status()
            if self.shared is not None and self.shared.pool_in_parent:
                return read_pool_status(self.shared.directory)
            return {"addresses": self._addresses()}

        if self.shared is not None and isinstance(self._metrics, SharedGatewayMetrics):
            # Every process's counts, whichever process answers.
            return {"gateway": shared_gateway_status(self._metrics.counts), "pool": pool()}
        document = status_document(self.stats, pool)
        if self.factory is not None:
            document["gateway"]["lanes"] = self.factory.fair_share.status()
        return document

    def privilegedStartService(self) -> None:
        """Bind the listening port (before twistd drops privileges, if it does)."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen().addCallback(self._log_listening)

    def _listen(self) -> Deferred[IListeningPort | None]:
        """
        Bind the port, once: the site, and the pool client and counters behind
        it, are made first (none does any I/O until the reactor runs).

        :return: a Deferred that fires with the port, or ``None`` if the gateway
            cannot listen (which is logged, and stops the reactor).
        """
        if self._listening is not None:
            return self._listening
        window, cooldown = self.poison
        self.client = client = TaskClient(
            self.reactor,
            self._addresses(),
            secret=self.secret,
            prefetch=self.prefetch,
            poison_window=window,
            poison_cooldown=cooldown,
        )
        metrics: GatewayMetrics | SharedGatewayMetrics
        if self.shared is not None:
            metrics = SharedGatewayMetrics(lambda: self.status())
        else:
            metrics = GatewayMetrics(lambda: self.status())
        self._metrics = metrics
        self.stats = GatewayStats(on_finished=metrics.finished)
        self.stats.poison = client.poison
        self.factory = factory = GatewayFactory(
            self.client,
            self.reactor,
            self.limits,
            self.stats,
            auto_ping=self.auto_ping,
            access=self.access,
            # Several processes: resume tokens name theirs (taskoffload.detach).
            process=str(os.getpid()) if self.shared is not None else None,
        )
        outbox = self.outbox.to_json if self.outbox is not None else None
        site = make_site(factory, self.status, metrics, outbox=outbox)
        if self.shared is not None:
            listening: Deferred[IListeningPort] = defer.maybeDeferred(
                self.reactor.adoptStreamPort, self.shared.fd, self.shared.family, site
            )
        else:
            listening = serverFromString(self.reactor, self.listen).listen(site)
        self._listening = listening.addCallbacks(self._bound, self._cannot_listen)
        return self._listening

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        metrics, stats = self._metrics, self.stats
        if isinstance(metrics, SharedGatewayMetrics) and stats is not None:
            self._sampling = task.LoopingCall(metrics.sample, stats)
            self._sampling.clock = self.reactor
            self._sampling.start(SAMPLE_INTERVAL)
        return port

    def _cannot_listen(self, failure: Failure) -> None:
        _log.failure("The gateway cannot listen on {listen}", failure, listen=self.listen)
        stop_when_running(self.reactor)

    def _log_listening(self, port: IListeningPort | None) -> IListeningPort | None:
        if port is not None:
            # Started: what is alive now lives as long as the gateway.
            self.reactor.callWhenRunning(freeze_heap)
            _log.info(
                "Gateway listening on {address}, sending tasks to {pools}",
                address=port.getHost(),
                pools=", ".join(self._addresses()),
            )
        return port

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._listening = None
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._sampling is not None and self._sampling.running:
            self._sampling.stop()
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        # Let the requests in flight finish (the pool, if ours, is still serving).
        deadline = self.reactor.seconds() + self.stop_timeout
        while self.stats is not None and self.stats.inflight > 0:
            if self.reactor.seconds() > deadline:
                _log.warn("{count} requests unfinished at stop", count=self.stats.inflight)
                break
            await task.deferLater(self.reactor, 0.05, lambda: None)
        if self.client is not None:
            await self.client.close()


def freeze_heap() -> None:
    """
    Move every object alive once the gateway has started (Twisted, Autobahn,
    the task client, the site: hundreds of thousands) out of the garbage
    collector's sight: a full collection then scans only what was made since,
    instead of pausing the whole process, every reply waiting, for tens of
    milliseconds (measured: 38-74 ms in the 1000-mail burst of the
    ``responsive`` benchmark, role all, 100 workers).
    """
    gc.collect()
    gc.freeze()
