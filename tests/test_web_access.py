"""
Unit tests for the site's access rules (:mod:`taskoffload.web`): ``/status`` and
``/metrics`` behind the token, ``/`` public, and an access log without queries.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.web.resource import getChildForRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from taskoffload.gateway import GatewayAccess, GatewayFactory
from taskoffload.testing import FakeTaskPool
from taskoffload.web import GatewayMetrics, access_log_line, make_site
from tests._trial_bridge import pytest_module

TOKEN = "s3cret-Token_42"


def site(access: GatewayAccess) -> Site:
    """A site whose WebSocket factory has these access rules."""
    document = {"gateway": {"clients": 0}, "pool": None}
    factory = GatewayFactory(FakeTaskPool(tasks={"noop": lambda: None}), access=access)
    return make_site(factory, lambda: document, GatewayMetrics(lambda: document))


def get(
    site: Site, path: bytes, query: dict[bytes, list[bytes]] | None = None, *headers: bytes
) -> tuple[DummyRequest, bytes]:
    """Render a GET of ``path``: the request (for its code) and the body."""
    request = DummyRequest(path[1:].split(b"/"))
    request.args = dict(query or {})
    for value in headers:
        name, _, content = value.partition(b": ")
        request.requestHeaders.addRawHeader(name, content)
    body = getChildForRequest(site.resource, request).render(request)
    assert isinstance(body, bytes)
    return request, body


@pytest.mark.parametrize("path", [b"/status", b"/metrics", b"/tasks"])
def test_token_required(path: bytes) -> None:
    """With a token set, /status, /metrics and /tasks answer 401 without it or with a wrong one."""
    guarded = site(GatewayAccess(TOKEN))
    request, _ = get(guarded, path)
    assert request.responseCode == 401
    assert request.responseHeaders.getRawHeaders(b"www-authenticate") == [
        b'Bearer realm="taskoffload"'
    ]
    assert get(guarded, path, {b"token": [b"wrong"]})[0].responseCode == 401
    assert get(guarded, path, None, b"Authorization: Bearer wrong")[0].responseCode == 401


@pytest.mark.parametrize("path", [b"/status", b"/metrics", b"/tasks"])
def test_token_presented(path: bytes) -> None:
    """/status, /metrics and /tasks answer to the token in the query or the Authorization header."""
    guarded = site(GatewayAccess(TOKEN))
    request, body = get(guarded, path, {b"token": [TOKEN.encode()]})
    assert request.responseCode in (None, 200) and body
    request, body = get(guarded, path, None, b"Authorization: Bearer " + TOKEN.encode())
    assert request.responseCode in (None, 200) and body


def test_page_stays_public() -> None:
    """The page at / needs no token (its script forwards ?token= to /ws and /status)."""
    request, body = get(site(GatewayAccess(TOKEN)), b"/")
    assert request.responseCode in (None, 200)
    assert b"encodeURIComponent(token)" in body


def test_open_without_token() -> None:
    """Without a token, /status is open as before."""
    request, _ = get(site(GatewayAccess()), b"/status")
    assert request.responseCode in (None, 200)


def test_access_log_drops_queries() -> None:
    """The access log line has the path but not the query, of the URI and of the referrer."""
    request = DummyRequest([b"status"])
    request.uri = b"/status?token=" + TOKEN.encode()
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 1234  # type: ignore[attr-defined]  # set by a real channel
    request.client = IPv4Address("TCP", "10.0.0.7", 40000)
    request.requestHeaders.addRawHeader(b"referer", b"http://gw/?token=" + TOKEN.encode())
    request.requestHeaders.addRawHeader(b"user-agent", b'agent "quoted"')
    line = access_log_line("[01/Jan/2030:00:00:00 +0000]", request)
    assert TOKEN not in line
    assert line.startswith(
        '"10.0.0.7" - - [01/Jan/2030:00:00:00 +0000] "GET /status HTTP/1.1" 200 1234'
    )
    assert '"http://gw/"' in line
    assert 'agent \\"quoted\\"' in line


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
