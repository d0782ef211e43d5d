"""
Unit tests for :class:`taskoffload.service.GatewayService`'s start: it binds its
port in ``privilegedStartService`` (so ``twistd --uid`` can use a port below 1024),
on a ``MemoryReactorClock``, and a port it cannot bind stops the reactor.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import Site

from taskoffload import service as service_module
from taskoffload.service import GatewayService
from tests._trial_bridge import pytest_module

POOL = "tcp:127.0.0.1:12345"


def gateway(reactor: MemoryReactorClock, listen: str = "tcp:443:interface=127.0.0.1") -> Any:
    """A gateway service on ``reactor``, sending to one pool."""
    return GatewayService(listen, pool_addresses=[POOL], reactor=reactor)


def test_privileged_start_listens_before_start() -> None:
    """privilegedStartService binds the port; startService then binds nothing more."""
    reactor = MemoryReactorClock()
    service = gateway(reactor)
    with capturedLogs() as events:
        service.privilegedStartService()
        [(port, factory, _backlog, interface)] = reactor.tcpServers
        assert (port, interface) == (443, "127.0.0.1")
        assert isinstance(factory, Site)
        assert service.port is not None
        assert not service.running
        service.startService()
    assert service.running
    assert len(reactor.tcpServers) == 1
    assert service.client is not None
    assert [formatEvent(e) for e in events if "listening" in e.get("log_format", "")] == [
        f"Gateway listening on {service.port.getHost()}, sending tasks to {POOL}"
    ]


def test_a_started_gateway_freezes_its_heap_once_the_reactor_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once listening, the gateway moves what is alive out of the collector's sight
    when the reactor runs (gc.freeze), so full collections do not pause it; a gateway
    that cannot listen does not."""
    frozen: list[bool] = []
    monkeypatch.setattr(service_module.gc, "freeze", lambda: frozen.append(True))
    reactor = MemoryReactorClock()
    service = gateway(reactor)
    service.privilegedStartService()
    service.startService()
    assert frozen == []
    for hook, args, kwargs in reactor.whenRunningHooks:
        hook(*args, **kwargs)
    assert frozen == [True]


def test_start_alone_listens_once() -> None:
    """Started without the privileged phase (as a plain parent service would), it listens once."""
    reactor = MemoryReactorClock()
    service = gateway(reactor)
    service.startService()
    assert [server[0] for server in reactor.tcpServers] == [443]
    assert service.port is not None


def test_restart_listens_again() -> None:
    """A service stopped and started again binds a new port."""
    reactor = MemoryReactorClock()
    service = gateway(reactor)
    service.privilegedStartService()
    service.startService()
    stopped = service.stopService()
    reactor.advance(0)
    assert service.port is None
    assert stopped.called
    service.startService()
    assert len(reactor.tcpServers) == 2
    assert service.port is not None


class RefusingReactor(MemoryReactorClock):
    """A reactor on which every port is taken."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError("address in use"))


def test_listen_failure_logged_and_reactor_stopped() -> None:
    """A port that cannot be bound is logged, and the reactor stops once it runs."""
    reactor = RefusingReactor()
    service = gateway(reactor)
    with capturedLogs() as events:
        service.privilegedStartService()
        service.startService()
    assert service.port is None
    messages = [formatEvent(e) for e in events]
    assert "The gateway cannot listen on tcp:443:interface=127.0.0.1" in messages
    assert not any("Gateway listening" in m for m in messages)
    # Not running yet (twistd binds ports before it runs the reactor): it stops once it runs.
    assert not reactor.hasStopped
    assert [hook for hook, _, _ in reactor.whenRunningHooks] == [reactor.stop]


def test_listen_failure_while_running_stops_the_reactor() -> None:
    """A port that cannot be bound while the reactor runs stops it at once."""
    reactor = RefusingReactor()
    reactor.running = True
    service = gateway(reactor)
    with capturedLogs():
        service.startService()
    assert reactor.hasStopped


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
