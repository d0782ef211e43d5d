"""
:class:`SocketReactor`: a ``MemoryReactorClock`` whose ``listenTCP`` binds a
real loopback socket, for the unit tests of services that hand a bound socket
on (the pool's and the gateway's, the outbox's): the port is driven by this
reactor, so its closing runs when the clock advances.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock

__all__ = ["SocketReactor"]


class SocketReactor(MemoryReactorClock):
    """A memory reactor whose ``listenTCP`` binds a real socket, as it records the call."""

    def listenTCP(  # type: ignore[override]  # returns the real port
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> tcp.Port:
        super().listenTCP(port, factory, backlog, interface)
        listening = tcp.Port(port, factory, backlog, interface, reactor=self)
        listening.startListening()
        return listening
