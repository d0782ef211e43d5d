"""
A worker pool's own status site, for a pool that runs without a gateway
(``--role=worker --status-listen ENDPOINT``): ``/status`` the pool's summary as
JSON, ``/metrics`` its figures for Prometheus, behind ``--token-file`` like the
gateway's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from twisted.logger import Logger
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site

from taskoffload.access import GatewayAccess
from taskoffload.readouts import Metrics, Status, TokenRequired, access_log_line
from taskoffload.sideport import SidePortService

__all__ = ["PoolCollector", "PoolStatusService", "pool_site"]

_log = Logger(namespace="taskoffload.pool_status")


class PoolCollector(Collector):
    """
    The pool's figures, read from its ``status()`` at each scrape: one process
    holds them, so a counter never goes back.

    :param status: returns the pool's summary (``WorkerPoolService.status``).
    """

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status()
        gauges = [
            ("taskoffload_workers", "Worker processes the pool is configured to run.", "count"),
            ("taskoffload_workers_alive", "Worker processes running.", "alive"),
            ("taskoffload_workers_serving", "Worker processes taking connections.", "serving"),
            (
                "taskoffload_workers_busy",
                "Task slots taken: tasks queued or running, or a connection about to bring one.",
                "busy",
            ),
        ]
        for name, documentation, key in gauges:
            yield GaugeMetricFamily(name, documentation, value=status[key])
        counters = [
            ("taskoffload_worker_restarts", "Workers replaced after they died.", "restarts"),
            ("taskoffload_workers_recycled", "Workers replaced after their limits.", "recycled"),
            ("taskoffload_reloads", "Rolling reloads finished.", "reloads"),
        ]
        for name, documentation, key in counters:
            yield CounterMetricFamily(name, documentation, value=status[key])


def pool_site(status: Callable[[], dict[str, Any]], access: GatewayAccess) -> Site:
    """
    :param status: returns the pool's summary.
    :param access: who may read ``/status`` and ``/metrics``.
    :return: the site: ``/status`` (``{"pool": ...}``) and ``/metrics``.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(status))
    root = Resource()
    root.putChild(b"", notFound())
    root.putChild(b"status", TokenRequired(Status(lambda: {"pool": status()}), access))
    root.putChild(b"metrics", TokenRequired(Metrics(registry), access))
    site = Site(root, logFormatter=access_log_line)
    site.noisy = False
    return site


class PoolStatusService(SidePortService):
    """
    Serve :func:`pool_site` on ``listen`` (see :class:`SidePortService`).

    :param listen: a Twisted server endpoint string.
    :param status: returns the pool's summary.
    :param access: who may read it.
    :param reactor: provides the endpoint's ``listen``; by default the global one.
    """

    listening_as = "Pool status"
    failing_as = "serve its status"

    def __init__(
        self,
        listen: str,
        status: Callable[[], dict[str, Any]],
        access: GatewayAccess,
        reactor: Any = None,
    ) -> None:
        super().__init__(listen, reactor)
        self._status = status
        self._access = access

    def factory(self) -> Site:
        return pool_site(self._status, self._access)
