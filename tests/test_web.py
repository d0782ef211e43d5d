"""
Unit tests for :mod:`taskoffload.web`: the site's resources rendered for a
``DummyRequest``, and the Prometheus metrics; and :func:`taskoffload.service.pool_address`.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from autobahn.twisted.resource import WebSocketResource
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.resource import Resource, getChildForRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from taskoffload.client import PoolAddress
from taskoffload.gateway import GatewayFactory, GatewayStats
from taskoffload.service import pool_address
from taskoffload.testing import FakeTaskPool
from taskoffload.web import GatewayMetrics, make_site, status_document
from tests._trial_bridge import pytest_module

STATUS: dict[str, Any] = {
    "gateway": {"clients": 2, "inflight": 3, "requests": 10},
    "pool": {"serving": 4, "restarts": 1},
}


def site(status: dict[str, Any] | None = None) -> tuple[Site, GatewayMetrics]:
    """A site whose status callable returns ``status``, and its metrics."""
    document = STATUS if status is None else status
    metrics = GatewayMetrics(lambda: document)
    return make_site(GatewayFactory(FakeTaskPool()), lambda: document, metrics), metrics


def resource_at(site: Site, path: bytes) -> tuple[DummyRequest, Resource]:
    """The resource the site serves at ``path``, and the GET request for it."""
    request = DummyRequest(path[1:].split(b"/"))
    return request, getChildForRequest(site.resource, request)


def get(site: Site, path: bytes) -> tuple[DummyRequest, bytes]:
    """Render a GET of ``path``: the request (for its headers and code) and the body."""
    request, resource = resource_at(site, path)
    body = resource.render(request)
    assert isinstance(body, bytes)
    return request, body


def header(request: DummyRequest, name: bytes) -> bytes:
    """The one value of a response header."""
    [value] = request.responseHeaders.getRawHeaders(name)
    return value


def test_page() -> None:
    """/ serves the live page as uncached HTML."""
    request, body = get(site()[0], b"/")
    assert b"<title>taskoffload</title>" in body
    assert header(request, b"content-type").startswith(b"text/html")
    assert header(request, b"cache-control") == b"no-cache"


def test_status() -> None:
    """/status serves what the status callable returns, as JSON."""
    request, body = get(site()[0], b"/status")
    assert orjson.loads(body) == STATUS
    assert header(request, b"content-type") == b"application/json"


def test_status_is_live() -> None:
    """/status calls the status callable on each request."""
    document: dict[str, Any] = {"gateway": {"clients": 0}}
    served = site(document)[0]
    assert orjson.loads(get(served, b"/status")[1]) == {"gateway": {"clients": 0}}
    document["gateway"]["clients"] = 5
    assert orjson.loads(get(served, b"/status")[1]) == {"gateway": {"clients": 5}}


def test_websocket_at_ws() -> None:
    """/ws is the WebSocket resource."""
    assert isinstance(resource_at(site()[0], b"/ws")[1], WebSocketResource)


def test_unknown_path_not_found() -> None:
    """Any other path is 404."""
    request, resource = resource_at(site()[0], b"/nope")
    resource.render(request)  # an error page, rendered without waiting
    assert request.responseCode == 404


def test_metrics_requests() -> None:
    """/metrics counts final replies by function and outcome, and times them."""
    served, metrics = site()
    metrics.finished("echo", "ok", 0.01)
    metrics.finished("echo", "ok", 0.02)
    metrics.finished("echo", "task_failed", 0.5)
    request, body = get(served, b"/metrics")
    text = body.decode()
    assert header(request, b"content-type").startswith(b"text/plain")
    assert 'taskoffload_requests_total{function="echo",outcome="ok"} 2.0' in text
    assert 'taskoffload_requests_total{function="echo",outcome="task_failed"} 1.0' in text
    assert "taskoffload_request_seconds_count 3.0" in text
    assert 'taskoffload_request_seconds_bucket{le="0.01"} 1.0' in text


def test_metrics_overloaded_not_timed() -> None:
    """An overloaded reply is counted but adds no latency observation."""
    served, metrics = site()
    metrics.finished("echo", "overloaded", 0.0)
    text = get(served, b"/metrics")[1].decode()
    assert 'taskoffload_requests_total{function="echo",outcome="overloaded"} 1.0' in text
    assert "taskoffload_request_seconds_count 0.0" in text


def test_metrics_gauges_from_status() -> None:
    """/metrics reads clients, in-flight requests and the pool's state from the status."""
    text = get(site()[0], b"/metrics")[1].decode()
    for line in [
        "taskoffload_clients 2.0",
        "taskoffload_inflight 3.0",
        "taskoffload_workers_serving 4.0",
        "taskoffload_worker_restarts 1.0",
    ]:
        assert line in text.splitlines()


def test_metrics_without_pool() -> None:
    """Without a pool in the status (role gateway), the pool gauges read 0."""
    text = get(site({"gateway": {}, "pool": None})[0], b"/metrics")[1].decode()
    assert "taskoffload_workers_serving 0.0" in text.splitlines()
    assert "taskoffload_clients 0.0" in text.splitlines()


def test_status_document() -> None:
    """The status document holds the gateway's stats, percentiles included, and the pool's."""
    stats = GatewayStats()
    stats.started()
    stats.finished("echo", "ok", 0.002)
    document = status_document(stats, lambda: {"addresses": ["tcp:127.0.0.1:12345"]})
    assert document == {
        "gateway": {
            "clients": 0,
            "inflight": 0,
            "requests": 1,
            "by_function": {"echo": 1},
            "by_outcome": {"ok": 1},
            "latency": {"p50_ms": 2.0, "p90_ms": 2.0, "p99_ms": 2.0, "max_ms": 2.0},
            "detached": {"held": 0, "resumed": 0, "expired": 0},
            "poison": {"quarantined": 0, "refused": 0, "kills": 0},
        },
        "pool": {"addresses": ["tcp:127.0.0.1:12345"]},
    }


# service.pool_address


class Port:
    """A listening port that knows only its address."""

    def __init__(self, host: Any) -> None:
        self._host = host

    def getHost(self) -> Any:
        return self._host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (IPv4Address("TCP", "127.0.0.1", 12345), "tcp:127.0.0.1:12345"),
        (IPv4Address("TCP", "10.1.2.3", 80), "tcp:10.1.2.3:80"),
        (IPv4Address("TCP", "0.0.0.0", 5000), "tcp:127.0.0.1:5000"),
        (IPv4Address("TCP", "", 5000), "tcp:127.0.0.1:5000"),
        (IPv6Address("TCP", "::1", 5001), "tcp:[::1]:5001"),
        (IPv6Address("TCP", "::", 5002), "tcp:[::1]:5002"),
        (IPv6Address("TCP", "fe80::1", 5003), "tcp:[fe80::1]:5003"),
        (UNIXAddress(b"/run/pool.sock"), "unix:/run/pool.sock"),
        (UNIXAddress("/run/pool.sock"), "unix:/run/pool.sock"),
    ],
)
def test_pool_address(host: Any, expected: str) -> None:
    """A pool's listening address becomes an address a client can connect to."""
    address = pool_address(Port(host))  # type: ignore[arg-type]
    assert address == expected
    assert str(PoolAddress.parse(address)) == expected


def test_pool_address_unnamed_unix() -> None:
    """An unnamed UNIX socket cannot be reached, and says so."""
    with pytest.raises(ValueError):
        pool_address(Port(UNIXAddress(None)))  # type: ignore[arg-type]


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
