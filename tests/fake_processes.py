"""
Stand-ins for the processes a worker pool's supervisor starts and signals:
:class:`FakeProcessControl` records what it is asked to do instead of doing it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IProcessProtocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from taskoffload.interfaces import IProcessControl


class ProcessStringTransport(StringTransport):
    """A ``StringTransport`` that records what a process transport is asked to do."""

    stdin_closed = False

    def __init__(self) -> None:
        super().__init__()
        self.signals: list[str] = []

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal_name: str) -> None:
        self.signals.append(signal_name)


@attrs.frozen
class SpawnedForkServer:
    """One fork server a :class:`FakeProcessControl` was asked to start."""

    protocol: IProcessProtocol
    transport: ProcessStringTransport
    listen_fd: int
    #: Whether the lifeline given was the read end of a pipe, when it was given.
    lifeline_was_pipe: bool
    #: The listening sockets of the pool's lanes, in order.
    lane_fds: tuple[int, ...] = ()


@implementer(IProcessControl)
class FakeProcessControl:
    """
    Records the fork servers it is asked to start (each gets a
    :class:`ProcessStringTransport`) and the signals it is asked to send.

    :ivar signals: ``(pid, signum)`` of each signal, in order.
    :ivar spawned: each fork server started, in order.
    """

    def __init__(self) -> None:
        self.signals: list[tuple[int, int]] = []
        self.spawned: list[SpawnedForkServer] = []

    def spawn_fork_server(
        self,
        protocol: IProcessProtocol,
        listen_fd: int,
        lifeline_fd: int,
        lane_fds: Sequence[int] = (),
    ) -> ProcessStringTransport:
        transport = ProcessStringTransport()
        is_pipe = stat.S_ISFIFO(os.fstat(lifeline_fd).st_mode)
        self.spawned.append(
            SpawnedForkServer(protocol, transport, listen_fd, is_pipe, tuple(lane_fds))
        )
        protocol.makeConnection(transport)
        return transport

    def kill(self, pid: int, signum: int) -> None:
        self.signals.append((pid, signum))
