"""
:class:`ProcessControl`: the operating system's side of
:class:`~taskoffload.interfaces.IProcessControl`, what a worker pool's supervisor
does to processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from zope.interface import implementer

from taskoffload._forkserver import FIRST_LANE_FD, LIFELINE_FD, LISTEN_FD
from taskoffload.interfaces import IProcessControl

__all__ = ["ProcessControl"]


@implementer(IProcessControl)
class ProcessControl:
    """
    Start fork servers with ``reactor.spawnProcess`` and signal processes with
    :func:`os.kill`.

    :param reactor: the reactor that spawns and watches the fork servers.
    """

    def __init__(self, reactor: IReactorProcess) -> None:
        self._reactor = reactor

    def spawn_fork_server(
        self,
        protocol: IProcessProtocol,
        listen_fd: int,
        lifeline_fd: int,
        lane_fds: Sequence[int] = (),
    ) -> IProcessTransport:
        """See :meth:`IProcessControl.spawn_fork_server`."""
        child_fds: dict[int, int | str] = {
            0: "w",
            1: "r",
            2: "r",
            LISTEN_FD: listen_fd,
            LIFELINE_FD: lifeline_fd,
        }
        for position, fd in enumerate(lane_fds):
            child_fds[FIRST_LANE_FD + position] = fd
        env = dict(os.environ)
        # Its events and tracebacks must reach the supervisor as they happen.
        env["PYTHONUNBUFFERED"] = "1"
        return self._reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", "taskoffload._forkserver"],
            env=env,
            childFDs=child_fds,
        )

    def kill(self, pid: int, signum: int) -> None:
        """See :meth:`IProcessControl.kill`."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
