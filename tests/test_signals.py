"""Tests for taskoffload.signals: SIGTERM stops gracefully and twistd exits 0."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import pytest

from taskoffload.signals import ExitZeroOnSigterm
from tests._trial_bridge import pytest_module


class FakeReactor:
    """Records what the service asks of the reactor; runs what it is handed at once."""

    def __init__(self) -> None:
        self.running = True
        self.stops = 0
        self.when_running: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def callWhenRunning(self, f: Callable[..., Any], *args: Any) -> None:
        self.when_running.append((f, args))

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def stop(self) -> None:
        self.stops += 1
        self.running = False


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch) -> dict[int, Any]:
    """The signal handlers installed during the test, by signal (none really installed)."""
    installed: dict[int, Any] = {}
    monkeypatch.setattr(signal, "signal", installed.__setitem__)
    return installed


def test_sigterm_stops_the_reactor_once(handlers: dict[int, Any]) -> None:
    """Once the reactor runs, SIGTERM stops it; a second SIGTERM during the stop does nothing."""
    reactor = FakeReactor()
    service = ExitZeroOnSigterm(reactor)
    service.startService()
    # Installed only once the reactor runs, after the reactor's own handlers.
    assert handlers.get(signal.SIGTERM) != service._on_sigterm
    for f, args in reactor.when_running:
        f(*args)
    assert handlers[signal.SIGTERM] == service._on_sigterm
    handlers[signal.SIGTERM](signal.SIGTERM, None)
    assert reactor.stops == 1
    service.stopService()
    reactor.running = True
    handlers[signal.SIGTERM](signal.SIGTERM, None)
    assert reactor.stops == 1


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
