"""The gateway as a service: its pool client, its WebSocket factory and its site."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from taskoffload.client import TaskClient
from taskoffload.defaults import AUTO_PING, STOP_TIMEOUT
from taskoffload.gateway import GatewayAccess, GatewayFactory, GatewayLimits, GatewayStats
from taskoffload.supervisor import WorkerPoolService
from taskoffload.web import GatewayMetrics, make_site, status_document

__all__ = ["GatewayService", "pool_address"]

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
    ) -> None:
        self.secret = secret
        self.prefetch = prefetch
        self.stop_timeout = stop_timeout
        self.listen = listen
        self.pool_addresses = list(pool_addresses)
        self.pool_service = pool_service
        self.limits = limits or GatewayLimits()
        self.auto_ping = auto_ping
        self.access = access or GatewayAccess()
        self._reactor = reactor
        self.client: TaskClient | None = None
        self.port: IListeningPort | None = None
        self.stats: GatewayStats | None = None

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
            return {"addresses": self._addresses()}

        return status_document(self.stats, pool)

    def startService(self) -> None:
        super().startService()
        self.client = TaskClient(
            self.reactor, self._addresses(), secret=self.secret, prefetch=self.prefetch
        )
        metrics = GatewayMetrics(lambda: self.status())
        self.stats = GatewayStats(on_finished=metrics.finished)
        factory = GatewayFactory(
            self.client,
            self.reactor,
            self.limits,
            self.stats,
            auto_ping=self.auto_ping,
            access=self.access,
        )
        site = make_site(factory, self.status, metrics)
        endpoint = serverFromString(self.reactor, self.listen)
        d = endpoint.listen(site)

        def listening(port: IListeningPort) -> None:
            self.port = port
            _log.info(
                "Gateway listening on {address}, sending tasks to {pools}",
                address=port.getHost(),
                pools=", ".join(self._addresses()),
            )

        def failed(failure: Any) -> None:
            _log.failure("The gateway cannot listen on {listen}", failure, listen=self.listen)
            if self.reactor.running:
                self.reactor.stop()
            else:
                self.reactor.callWhenRunning(self.reactor.stop)

        d.addCallbacks(listening, failed)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
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
