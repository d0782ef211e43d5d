"""
The gateway's one ``twisted.web`` site: ``/ws`` the WebSocket, ``/`` the live
page, ``/status`` JSON, ``/metrics`` for Prometheus, ``/tasks`` the pool's
tasks described and, with an embedded outbox, ``/outbox`` JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from autobahn.twisted.resource import WebSocketResource
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from taskoffload.access import GatewayAccess
from taskoffload.gateway import GatewayFactory
from taskoffload.interfaces import ITaskPool
from taskoffload.readouts import Metrics, Status, TokenRequired, access_log_line
from taskoffload.stats import GatewayMetrics, GatewayStats

if TYPE_CHECKING:
    from taskoffload.shared_metrics import SharedGatewayMetrics

# GatewayMetrics lives in taskoffload.stats, access_log_line in taskoffload.readouts;
# both are re-exported here.
__all__ = ["DESCRIBE_TIMEOUT", "GatewayMetrics", "access_log_line", "make_site"]

_log = Logger(namespace="taskoffload.gateway")

#: Seconds ``/tasks`` waits for the pool to describe its tasks before a 503.
DESCRIBE_TIMEOUT = 5.0


class _Page(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._body = resources.files("taskoffload").joinpath("static/index.html").read_bytes()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        return self._body


class _Tasks(Resource):
    """
    ``/tasks``: the pool's tasks as its workers describe them.  Before any
    worker has, the pool is asked, and the answer waits for it up to
    :data:`DESCRIBE_TIMEOUT` seconds; then a 503.
    """

    isLeaf = True

    def __init__(self, pool: ITaskPool) -> None:
        super().__init__()
        self._pool = pool

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-cache")
        described = self._pool.catalogue()
        if described is not None:
            return self._body(request, described)
        asked = self._pool.describe(DESCRIBE_TIMEOUT)
        left: list[bool] = []

        def client_left(reason: Failure) -> None:
            left.append(True)
            asked.cancel()

        request.notifyFinish().addErrback(client_left)

        def answer(tasks: list[dict[str, Any]] | None) -> None:
            if not left and not request.finished:
                request.write(self._body(request, tasks))
                request.finish()

        def failed(reason: Failure) -> None:
            # Whatever went wrong, a client still waiting gets its one answer.
            if not left and not request.finished:
                _log.failure("Describing the pool's tasks failed", reason)
                answer(None)

        asked.addCallback(answer).addErrback(failed)
        return NOT_DONE_YET

    @staticmethod
    def _body(request: Request, tasks: list[dict[str, Any]] | None) -> bytes:
        if tasks is None:
            request.setResponseCode(503)
            return orjson.dumps(
                {"error": f"no worker of the pool answered within {DESCRIBE_TIMEOUT:g} s"}
            )
        return orjson.dumps({"tasks": tasks}, option=orjson.OPT_INDENT_2)


class _Root(Resource):
    def __init__(self, page: Resource) -> None:
        super().__init__()
        self._page = page

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self._page
        return notFound()


def make_site(
    factory: GatewayFactory,
    status: Callable[[], dict[str, Any]],
    metrics: GatewayMetrics | SharedGatewayMetrics,
    access: GatewayAccess | None = None,
    outbox: Callable[[], dict[str, Any]] | None = None,
) -> Site:
    """
    :param factory: the WebSocket factory served at ``/ws`` (which checks its
        own handshakes).
    :param status: returns the JSON document served at ``/status``.
    :param metrics: served at ``/metrics`` (its ``registry``).
    :param access: who may read ``/status``, ``/metrics``, ``/tasks`` and ``/outbox``; by
        default, the WebSocket factory's.
    :param outbox: returns the JSON document served at ``/outbox`` (see
        :meth:`taskoffload.outbox.Outbox.to_json`); without it, ``/outbox`` is
        not found.
    """
    access = access or factory.access
    root = _Root(_Page())
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"status", TokenRequired(Status(status), access))
    root.putChild(b"metrics", TokenRequired(Metrics(metrics.registry), access))
    root.putChild(b"tasks", TokenRequired(_Tasks(factory.pool), access))
    if outbox is not None:
        root.putChild(b"outbox", TokenRequired(Status(outbox), access))
    site = Site(root, logFormatter=access_log_line)
    site.noisy = False
    return site


def status_document(
    stats: GatewayStats, pool: Callable[[], dict[str, Any] | None]
) -> dict[str, Any]:
    """The ``/status`` document: ``gateway`` counters and, where known, the ``pool``."""
    return {"gateway": stats.to_json(), "pool": pool()}
