"""
The supervisor's side of its fork servers: :class:`ForkServerClient` spawns them,
sends the current one fork commands, tells the pool when one is ready or failed,
and starts another after one dies unasked; :class:`ForkServerProtocol` reads one
fork server's pipes.

During a rolling reload there are up to three kinds at once: the *current* fork
server, which forks every new worker; a *fresh* one importing the task modules
anew, which becomes current once it is ready; and *old* ones, whose workers are
being replaced, closed when the reload completes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import orjson
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload.config import PoolConfig
from taskoffload.interfaces import IProcessControl
from taskoffload.slots import MAX_RESTART_DELAY, MIN_RESTART_DELAY, STABLE_SECONDS

__all__ = ["ForkServerClient", "ForkServerOwner", "ForkServerProtocol", "FreshCodeWatcher"]

_log = Logger(namespace="taskoffload.supervisor")

#: Seconds a fork server has to exit once its input closed, before it is killed.
FORK_SERVER_EXIT_TIMEOUT = 5.0


class ForkServerOwner(Protocol):
    """What a :class:`ForkServerClient` tells the pool it serves."""

    def event_received(self, line: bytes, source: ForkServerProtocol | None = None) -> None:
        """One line from a fork server's events pipe (``source``'s or a worker's)."""

    def raw_output(self, line: bytes) -> None:
        """One line a fork server or a worker wrote to standard error."""

    def fork_server_ready(self) -> None:
        """The current fork server takes fork commands."""

    def fork_server_failed(self, text: str) -> None:
        """The current fork server could not import the task modules (``text`` says why)."""

    def fork_server_lost(self) -> None:
        """The current fork server died unasked: its workers are gone too."""


class FreshCodeWatcher(Protocol):
    """What a :class:`ForkServerClient` tells of a fresh fork server (a reload's)."""

    def fresh_code_ready(self) -> None:
        """The fresh fork server is ready, and now current."""

    def fresh_code_failed(self, text: str) -> None:
        """The fresh fork server could not import the task modules (``text`` says why)."""

    def fresh_code_exited(self, reason: Failure) -> None:
        """The fresh fork server exited before it was ready."""


class ForkServerProtocol(ProcessProtocol):
    """
    Reads one fork server's events (fd 1) and raw standard error (fd 2).

    :ivar ended: fires once the fork server has exited.
    :ivar lifeline: the write end of this fork server's lifeline, closed when it
        has ended.
    :ivar started: when it was spawned (``clock.seconds()``).
    """

    def __init__(self, client: ForkServerClient, started: float = 0.0) -> None:
        self._client = client
        self._buffers = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()
        self.lifeline: int | None = None
        self.started = started

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        self._buffers[childFD] = rest
        for line in lines:
            if childFD == 1:
                self._client.owner.event_received(line, self)
            elif line.strip():
                self._client.owner.raw_output(line)

    def processEnded(self, reason: Failure) -> None:
        self.close_lifeline()
        self.ended.callback(None)
        self._client.ended(self, reason)

    def close_lifeline(self) -> None:
        """Close the write end of the lifeline, if still open."""
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None


class ForkServerClient:
    """
    Spawn a pool's fork servers and send them fork commands.

    :param config: the pool's configuration, each fork server's first line.
    :param clock: schedules the restart of a fork server that died.
    :param processes: spawns the fork servers.
    :param owner: the pool, told what the fork servers do.
    :ivar current: the fork server that forks new workers, if any.
    :ivar fresh: a fork server started for a reload, until it is ready.
    :ivar old: fork servers whose workers a reload is replacing.
    """

    def __init__(
        self,
        config: PoolConfig,
        clock: IReactorTime,
        processes: IProcessControl,
        owner: ForkServerOwner,
    ) -> None:
        self._config = config
        self._clock = clock
        self._processes = processes
        self.owner = owner
        self.current: ForkServerProtocol | None = None
        self.fresh: ForkServerProtocol | None = None
        self._watcher: FreshCodeWatcher | None = None
        self.old: list[ForkServerProtocol] = []
        self._listen_fd: int | None = None
        self._lane_fds: tuple[int, ...] = ()
        self._stopping = False
        self._delay = 0.0
        self._restart: IDelayedCall | None = None

    def start(
        self, listen_fd: int, lane_fds: Sequence[int] = (), config: PoolConfig | None = None
    ) -> None:
        """
        Spawn the first fork server, passing it the listening socket ``listen_fd``
        and those of the pool's lanes, ``lane_fds``.

        :param config: the pool's configuration as bound (where its lanes
            listen), if it changed since this client was made.
        """
        if config is not None:
            self._config = config
        self._stopping = False
        self._listen_fd = listen_fd
        self._lane_fds = tuple(lane_fds)
        self.spawn()

    def spawn(self, fresh: FreshCodeWatcher | None = None) -> None:
        """
        Spawn a fork server: the current one, or one for a reload that becomes
        current once it is ready, and tells ``fresh`` how it went.
        """
        self._restart = None
        if self._stopping or self._listen_fd is None:
            return
        # Each fork server has its own lifeline: its workers stop when its write
        # end closes, which happens when the supervisor dies.
        lifeline_r, lifeline_w = os.pipe()
        protocol = ForkServerProtocol(self, started=self._clock.seconds())
        protocol.lifeline = lifeline_w
        if fresh is not None:
            self.fresh, self._watcher = protocol, fresh
        else:
            self.current = protocol
        transport = self._processes.spawn_fork_server(
            protocol, self._listen_fd, lifeline_r, self._lane_fds
        )
        os.close(lifeline_r)
        transport.write(self._config.to_json())

    def fork(self, index: int) -> None:
        """Ask the current fork server, if there is one, for a worker in slot ``index``."""
        if self.current is None or self.current.transport is None:
            return
        self.current.transport.write(orjson.dumps({"cmd": "fork", "index": index}) + b"\n")

    # What the fork servers report

    def ready(self, source: ForkServerProtocol | None) -> None:
        """``source`` has imported the task modules and takes fork commands."""
        if source is not None and source is self.fresh:
            # The fresh code imported: it forks from now on.
            self.fresh = None
            if self.current is not None:
                self.old.append(self.current)
            self.current = source
            self._fresh_watcher().fresh_code_ready()
            return
        self.owner.fork_server_ready()

    def failed(self, source: ForkServerProtocol | None, text: str) -> None:
        """``source`` could not import the task modules; it exits."""
        if source is not None and source is self.fresh:
            self.fresh = None
            self._fresh_watcher().fresh_code_failed(text)
            return
        self.owner.fork_server_failed(text)

    def ended(self, protocol: ForkServerProtocol, reason: Failure) -> None:
        """``protocol``'s fork server exited; if that was not asked for, start another."""
        if protocol in self.old:
            self.old.remove(protocol)
        if protocol is self.fresh:
            self.fresh = None
            self._fresh_watcher().fresh_code_exited(reason)
            return
        if protocol is not self.current:
            return
        self.current = None
        self.owner.fork_server_lost()
        if self._stopping:
            return
        uptime = self._clock.seconds() - protocol.started
        if uptime >= STABLE_SECONDS * 5:
            self._delay = 0.0
        else:
            self._delay = min(max(self._delay * 2, MIN_RESTART_DELAY * 2), MAX_RESTART_DELAY)
        _log.error(
            "The fork server exited ({reason}); restarting the pool in {delay} s",
            reason=reason.getErrorMessage(),
            delay=self._delay,
        )
        self._restart = self._clock.callLater(self._delay, self.spawn)

    def _fresh_watcher(self) -> FreshCodeWatcher:
        watcher, self._watcher = self._watcher, None
        assert watcher is not None, "a fresh fork server is spawned with its watcher"
        return watcher

    # Stopping

    def retire_old(self) -> None:
        """Close the old fork servers' input, so that they exit (a reload completed)."""
        for old in self.old:
            if old.transport is not None and not old.ended.called:
                old.transport.closeStdin()  # type: ignore[attr-defined]  # IProcessTransport
        self.old = [s for s in self.old if not s.ended.called]

    def stop(self) -> None:
        """Start no fork server from now on (until :meth:`start`)."""
        self._stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()

    async def close(self) -> None:
        """
        Close every fork server's input, and wait for each to exit; kill one that
        is still running :data:`FORK_SERVER_EXIT_TIMEOUT` seconds later.
        """
        for fork_server in [self.current, self.fresh, *self.old]:
            if fork_server is None or fork_server.transport is None or fork_server.ended.called:
                continue
            fork_server.transport.closeStdin()  # type: ignore[attr-defined]  # IProcessTransport
            ended = fork_server.ended
            ended.addTimeout(FORK_SERVER_EXIT_TIMEOUT, self._clock)
            try:
                await ended
            except defer.TimeoutError:
                try:
                    fork_server.transport.signalProcess("KILL")  # type: ignore[attr-defined]  # IProcessTransport
                except Exception:
                    pass
            fork_server.close_lifeline()
