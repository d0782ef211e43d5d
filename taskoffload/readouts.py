"""
The ``twisted.web`` resources that read a service out: ``/status`` as JSON and
``/metrics`` for Prometheus, behind the access token, with an access log that
never holds the token.  The gateway's site and a pool's own status site both
serve them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.http import Request as HTTPRequest
from twisted.web.resource import Resource
from twisted.web.server import Request

from taskoffload.access import GatewayAccess

__all__ = ["Metrics", "Status", "TokenRequired", "access_log_line"]


class Status(Resource):
    """A JSON document, made afresh by ``source`` for each request."""

    isLeaf = True

    def __init__(self, source: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self._source = source

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-cache")
        return orjson.dumps(self._source(), option=orjson.OPT_INDENT_2)


class Metrics(Resource):
    """A Prometheus registry in the text exposition format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)


class TokenRequired(Resource):
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
