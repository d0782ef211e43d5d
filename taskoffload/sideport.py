"""
:class:`SidePortService`: a port a worker pool serves beside its own, for the
machines around it (its ``/status`` and ``/metrics``, HAProxy's agent check).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from taskoffload.signals import stop_when_running

__all__ = ["SidePortService"]

_log = Logger(namespace="taskoffload")


class SidePortService(Service):
    """
    Serve :meth:`factory` on ``listen``, bound in ``privilegedStartService`` (as
    the pool's own port is, so ``twistd --uid`` may use a port below 1024).  A
    port that cannot be bound stops the reactor: a pool asked to be observable,
    or to tell a balancer its load, must not run without.

    :param listen: a Twisted server endpoint string.
    :param reactor: provides the endpoint's ``listen``; by default the global one.
    :ivar listening_as: what the log calls the port once it listens.
    :ivar failing_as: what the pool cannot do, in the log, if it cannot listen.
    """

    listening_as = "Side port"
    failing_as = "serve its side port"

    def __init__(self, listen: str, reactor: Any = None) -> None:
        self.listen = listen
        self._reactor = reactor
        self.port: IListeningPort | None = None

    def factory(self) -> IProtocolFactory:
        """:return: what serves the port's connections."""
        raise NotImplementedError

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        listening = serverFromString(self._reactor, self.listen).listen(self.factory())
        listening.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        _log.info("{what} on {address}", what=self.listening_as, address=port.getHost())

    def _failed(self, failure: Any) -> None:
        _log.failure(
            "The pool cannot {what} on {listen}", failure, what=self.failing_as, listen=self.listen
        )
        stop_when_running(self._reactor)

    def close(self) -> Deferred[None]:
        """Stop listening, if listening."""
        if self.port is None:
            return defer.succeed(None)
        port, self.port = self.port, None
        stopped = port.stopListening()
        return stopped if stopped is not None else defer.succeed(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()
