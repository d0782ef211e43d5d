"""
:class:`SharedSocketAcceptor`: how a worker process takes connections from the
listening socket it shares with the rest of its pool, one per wake-up and only
while its task server has room for another.
"""

from __future__ import annotations

import errno
import socket
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["CapacityGatedFactory", "SharedSocketAcceptor"]


class CapacityGatedFactory(Protocol):
    """
    What the acceptor hands connections to: a protocol factory (the reactor adopts
    each connection into it) that says whether its process can take one more.
    """

    @property
    def has_capacity(self) -> bool:
        """The process can take another connection."""


@implementer(IReadDescriptor)
class SharedSocketAcceptor:
    """
    Take connections from a listening socket shared with other processes, one per
    wake-up, and only while the factory has capacity.

    Twisted's own port accepts up to a hundred connections per wake-up, so one
    process would grab a whole burst; accepting one at a time leaves the rest in
    the shared queue for idle processes.

    :param reactor: provides ``addReader``/``removeReader`` and
        ``adoptStreamConnection``.
    :param listening: the shared listening socket (non-blocking).
    :param factory: the task server the accepted connections are adopted into.
    """

    def __init__(
        self, reactor: Any, listening: socket.socket, factory: CapacityGatedFactory
    ) -> None:
        self._reactor = reactor
        self._socket = listening
        self._family = listening.family
        self._factory = factory
        self._reading = False
        self._stopped = False
        self._retry: IDelayedCall | None = None
        self.accepted = 0
        # The namespace the acceptor's warnings have always been logged under,
        # which a reader of the pool's logs may filter on.
        self.log = Logger(namespace="taskoffload.worker.SharedSocketAcceptor", source=self)

    def set_capacity(self, has_capacity: bool) -> None:
        """
        Start reading when the factory gains capacity.  Losing it stops nothing
        yet: the next connection that arrives while there is none does (see
        :meth:`doRead`), so a worker that runs one task after another on the
        connections it holds costs the reactor no (un)registration per task.
        """
        if has_capacity:
            self.resume()

    def resume(self) -> None:
        """Take connections again."""
        if not self._reading and not self._stopped and self._retry is None:
            self._reading = True
            self._reactor.addReader(self)

    def pause(self) -> None:
        """Take no connection until :meth:`resume`."""
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)

    def stop(self) -> None:
        """Take no more connections, ever, and close this process's copy of the socket."""
        self.pause()
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._socket.close()

    def fileno(self) -> int:
        return self._socket.fileno()

    def logPrefix(self) -> str:
        return "SharedSocketAcceptor"

    def connectionLost(self, reason: Failure) -> None:
        self._reading = False

    def doRead(self) -> None:
        if not self._factory.has_capacity:
            # A connection is waiting and this process has no room: leave it to
            # an idle one, and stop reading until there is room again.
            self.pause()
            return
        try:
            connection, _ = self._socket.accept()
        except (BlockingIOError, InterruptedError):
            return  # another process took it
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors or memory: back off instead of spinning.
                self.log.warn("accept() failed: {error}; pausing for 1 s", error=e)
                self.pause()
                self._retry = self._reactor.callLater(1.0, self._retry_accept)
                return
            if e.errno == errno.ECONNABORTED:
                return
            if e.errno == errno.EINVAL:
                # The supervisor shut the socket down: the pool is stopping.
                self.pause()
                return
            raise
        try:
            connection.setblocking(False)
            if self._family in (socket.AF_INET, socket.AF_INET6):
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._reactor.adoptStreamConnection(connection.fileno(), self._family, self._factory)
            self.accepted += 1
        except OSError as e:
            # Adopting duplicates the descriptor, which can fail as accept can.
            self.log.warn("Could not adopt a connection: {error}; pausing for 1 s", error=e)
            self.pause()
            self._retry = self._reactor.callLater(1.0, self._retry_accept)
        finally:
            # adoptStreamConnection took its own duplicate of the descriptor.
            connection.close()

    def _retry_accept(self) -> None:
        self._retry = None
        if self._factory.has_capacity:
            self.resume()
