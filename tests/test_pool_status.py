"""A worker pool's own status site (``--role=worker --status-listen``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from taskoffload import tap
from taskoffload.access import GatewayAccess
from taskoffload.pool_status import PoolStatusService, pool_site
from taskoffload.supervisor import WorkerPoolService
from tests._trial_bridge import pytest_module

STATUS: dict[str, Any] = {
    "count": 4,
    "alive": 4,
    "serving": 3,
    "busy": 2,
    "restarts": 2,
    "recycled": 1,
    "reloads": 0,
    "reloading": False,
    "killed_past_deadline": 0,
    "workers": [],
}


def get(site: Site, path: bytes, headers: dict[bytes, bytes] | None = None) -> DummyRequest:
    """Render ``GET path`` on ``site``; :return: the finished request."""
    request = DummyRequest([path.lstrip(b"/")])
    request.uri = path
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    resource = site.getResourceFor(request)
    body = resource.render(request)
    request.write(body)
    return request


def body(request: DummyRequest) -> bytes:
    return b"".join(request.written)


def test_status_is_the_pools_summary() -> None:
    """``/status`` is ``{"pool": ...}``, read from the pool at each request."""
    current = dict(STATUS)
    site = pool_site(lambda: current, GatewayAccess())
    assert orjson.loads(body(get(site, b"/status"))) == {"pool": STATUS}
    current["serving"] = 4
    assert orjson.loads(body(get(site, b"/status")))["pool"]["serving"] == 4


def test_metrics_give_the_pools_figures() -> None:
    """``/metrics`` has the serving, alive, busy and configured workers and the restart
    counters."""
    text = body(get(pool_site(lambda: STATUS, GatewayAccess()), b"/metrics")).decode()
    assert "taskoffload_workers_serving 3.0" in text
    assert "taskoffload_workers_busy 2.0" in text
    assert "taskoffload_workers_alive 4.0" in text
    assert "taskoffload_workers 4.0" in text
    assert "taskoffload_worker_restarts_total 2.0" in text
    assert "taskoffload_workers_recycled_total 1.0" in text
    assert "taskoffload_reloads_total 0.0" in text


@pytest.mark.parametrize("path", [b"/status", b"/metrics"])
def test_the_token_guards_both(path: bytes) -> None:
    """With a token, a request without it gets 401; with it, the document."""
    site = pool_site(lambda: STATUS, GatewayAccess(token="s3cret"))
    assert get(site, path).responseCode == 401
    allowed = get(site, path, {b"authorization": b"Bearer s3cret"})
    assert allowed.responseCode in (None, 200)
    assert b"serving" in body(allowed)


def test_service_binds_in_privileged_start_and_stops() -> None:
    """The port is bound in ``privilegedStartService`` (``twistd --uid``) and closed at stop."""
    reactor = MemoryReactorClock()
    service = PoolStatusService(
        "tcp:9090:interface=127.0.0.1", lambda: STATUS, GatewayAccess(), reactor=reactor
    )
    assert reactor.tcpServers == []
    service.privilegedStartService()
    [(port, factory, _, interface)] = reactor.tcpServers
    assert (port, interface) == (9090, "127.0.0.1")
    assert isinstance(factory, Site)
    service.startService()
    [(port, _, _, _)] = reactor.tcpServers
    assert service.port is not None and service.port.getHost().port == port
    stopped: list[bool] = []
    service.port.stopListening = lambda: stopped.append(True)  # type: ignore[method-assign]  # a recorder
    service.stopService()
    assert stopped == [True]
    assert service.port is None


def test_tap_adds_the_site_to_a_pool() -> None:
    """``--role=worker --status-listen`` runs the site beside the pool, on its status."""
    options = tap.Options()
    options.parseOptions(["--role=worker", "--count=2", "--status-listen=tcp:9090"])
    pool, site = [s for s in tap.makeService(options) if not isinstance(s, tap.ExitZeroOnSigterm)]
    assert isinstance(pool, WorkerPoolService)
    assert isinstance(site, PoolStatusService)
    assert site.listen == "tcp:9090"


def test_tap_takes_a_token_file_with_status_listen(tmp_path: Path) -> None:
    """A pool takes ``--token-file`` when it serves its status, and refuses it otherwise."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    options = tap.Options()
    options.parseOptions(["--role=worker", f"--token-file={token}", "--status-listen=tcp:9090"])
    assert options["token"] == "s3cret"
    with pytest.raises(tap.usage.UsageError, match="only with --status-listen"):
        tap.Options().parseOptions(["--role=worker", f"--token-file={token}"])


@pytest.mark.parametrize("role", ["all", "gateway"])
def test_tap_refuses_status_listen_beside_a_gateway(role: str) -> None:
    """Only a pool on its own takes ``--status-listen``: a gateway already serves /status."""
    with pytest.raises(tap.usage.UsageError, match="--status-listen is for --role=worker"):
        tap.Options().parseOptions([f"--role={role}", "--status-listen=tcp:9090"])


def test_tap_refuses_a_status_listen_that_is_no_endpoint() -> None:
    """A ``--status-listen`` that is not an endpoint string is refused with an example."""
    with pytest.raises(tap.usage.UsageError, match="expected an endpoint such as"):
        tap.Options().parseOptions(["--role=worker", "--status-listen=9090"])


testSuite = pytest_module(__file__)
