"""
How a taskoffload process answers SIGTERM: a graceful stop that exits 0.

Twisted's own SIGTERM handler stops the reactor and then makes twistd die of the
signal again (exit status -15), which a service manager reads as a failure. A
graceful stop that finished its work is a success, so every role's top service
gets :class:`ExitZeroOnSigterm` instead.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

__all__ = ["ExitZeroOnSigterm", "stop_when_running"]

_log = Logger(namespace="taskoffload")


class ExitZeroOnSigterm(Service):
    """
    While running, SIGTERM stops the reactor (so every service stops gracefully)
    and twistd exits 0.

    :param reactor: provides ``IReactorCore`` and ``IReactorThreads``; defaults
        to the global reactor.
    """

    def __init__(self, reactor: Any = None) -> None:
        self._reactor = reactor

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        super().startService()
        # After the reactor's own handlers are installed, so this one wins.
        self.reactor.callWhenRunning(signal.signal, signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        if self.running and self.reactor.running:
            _log.info("Received SIGTERM: stopping gracefully")
            self.reactor.stop()


def stop_when_running(reactor: Any) -> None:
    """
    Stop ``reactor``: now if it runs, else as soon as it does (a service that
    cannot bind its port finds out before twistd runs the reactor).
    """
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)
