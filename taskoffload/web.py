"""
The gateway's one ``twisted.web`` site: ``/ws`` the WebSocket, ``/`` the live
page, ``/status`` JSON and ``/metrics`` for Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from autobahn.twisted.resource import WebSocketResource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http import Request as HTTPRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from taskoffload.access import GatewayAccess
from taskoffload.gateway import GatewayFactory
from taskoffload.stats import GatewayMetrics, GatewayStats

# GatewayMetrics lives in taskoffload.stats; it is re-exported here.
__all__ = ["GatewayMetrics", "make_site"]


class _Page(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._body = resources.files("taskoffload").joinpath("static/index.html").read_bytes()

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        return self._body


class _Status(Resource):
    isLeaf = True

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._source = source

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-cache")
        return orjson.dumps(self._source(), option=orjson.OPT_INDENT_2)


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)


class _TokenRequired(Resource):
    """``resource``, for requests that present the token (see :class:`GatewayAccess`)."""

    isLeaf = True

    def __init__(self, resource: Resource, access: GatewayAccess) -> None:
        super().__init__()
        self._resource = resource
        self._access = access

    def render(self, request: Request) -> bytes:
        if self._access.presents_token(
            request.getHeader(b"authorization"), (request.args or {}).get(b"token", [])
        ):
            return self._resource.render(request)  # type: ignore[no-any-return]  # untyped in Twisted
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="taskoffload"')
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"a valid token is required: Authorization: Bearer TOKEN, or ?token=TOKEN\n"


def _without_query(value: bytes) -> str:
    # The query may hold the access token (?token=): it must never reach a log.
    return _escape(value.split(b"?", 1)[0])


def _escape(value: bytes | str) -> str:
    if isinstance(value, bytes):
        value = value.decode("ascii", "backslashreplace")
    return repr(value)[1:-1].replace('"', '\\"')


def access_log_line(timestamp: str, request: HTTPRequest) -> str:
    """
    The combined log format line of one request (Twisted's usual access log),
    with the query left out of the URI and the referrer: it may hold the token.
    """
    address = request.getClientAddress()
    ip = address.host if isinstance(address, (IPv4Address, IPv6Address)) else "-"
    line = '"{ip}" - - {timestamp} "{method} {uri} {protocol}" {code} {length} "{ref}" "{agent}"'
    return line.format(
        ip=_escape(ip),
        timestamp=timestamp,
        method=_escape(request.method),
        uri=_without_query(request.uri),
        protocol=_escape(request.clientproto),
        code=request.code,
        length=request.sentLength or "-",
        ref=_without_query(request.getHeader(b"referer") or b"-"),
        agent=_escape(request.getHeader(b"user-agent") or b"-"),
    )


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
    metrics: GatewayMetrics,
    access: GatewayAccess | None = None,
) -> Site:
    """
    :param factory: the WebSocket factory served at ``/ws`` (which checks its
        own handshakes).
    :param status: returns the JSON document served at ``/status``.
    :param metrics: served at ``/metrics``.
    :param access: who may read ``/status`` and ``/metrics``; by default, the
        WebSocket factory's.
    """
    access = access or factory.access
    root = _Root(_Page())
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"status", _TokenRequired(_Status(status), access))
    root.putChild(b"metrics", _TokenRequired(_Metrics(metrics.registry), access))
    site = Site(root, logFormatter=access_log_line)
    site.noisy = False
    return site


def status_document(
    stats: GatewayStats, pool: Callable[[], dict[str, Any] | None]
) -> dict[str, Any]:
    """The ``/status`` document: ``gateway`` counters and, where known, the ``pool``."""
    return {"gateway": stats.to_json(), "pool": pool()}
