"""
Several gateway processes on one port (``--gateway-processes N``): on a machine
with more cores than one gateway process can use, N processes serve the same
WebSocket port.

:class:`GatewayProcesses` binds the port once (it never accepts on it) and
starts N processes (:mod:`taskoffload._gateway_child`) that inherit it, as the
pool's workers inherit theirs: one shared socket, one accept queue, whichever
process is free takes the next connection.  A process that dies is replaced at
at once by a spare process started beforehand (its modules imported, waiting
to be told to serve), and the connections it had not yet accepted stay in the
queue for the others (with ``SO_REUSEPORT`` each process would have a queue of its own, and
those connections would be reset with it).  A stop sends each ``SIGTERM``: each
stops accepting and finishes its requests in flight, as a lone gateway does.

The processes count in shared files (:mod:`taskoffload.shared_metrics`), so
``/status`` and ``/metrics`` say the same whichever process answers; with the
pool in the same tree (role all) this process writes the pool's state there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from typing import Any, Final

from prometheus_client import multiprocess
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload._gateway_child import LISTEN_FD
from taskoffload.shared_metrics import MULTIPROCESS_DIRECTORY, write_pool_status
from taskoffload.slots import MAX_RESTART_DELAY, MIN_RESTART_DELAY, STABLE_SECONDS
from taskoffload.sockets import bind_never_accepting

__all__ = ["POOL_STATUS_INTERVAL", "SERVE", "GatewayProcesses"]

_log = Logger(namespace="taskoffload.gateway")

#: Seconds between writes of the pool's state for the gateway processes (role all).
POOL_STATUS_INTERVAL: Final = 0.5

#: The line that tells a started process to serve (the spare waits for it).
SERVE: Final = b"serve\n"


class _ChildProtocol(ProcessProtocol):
    """One gateway process: its output logged, its exit told to the parent."""

    def __init__(self, index: int, ended: Callable[[_ChildProtocol, Failure], None]) -> None:
        self.index = index
        self._ended = ended
        self._partial = b""
        self.exited: Deferred[None] = Deferred()
        #: Its process id, once spawned, and when (reactor time).
        self.pid: int | None = None
        self.started = 0.0

    def outReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                _log.info(
                    "gateway {index}: {line}",
                    index=self.index,
                    line=line.decode("utf-8", "replace"),
                )

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.exited.callback(None)
        self._ended(self, reason)


class GatewayProcesses(Service):
    """
    Run ``count`` gateway processes on the port ``listen``.

    :param config: returns the configuration line of process ``index`` (see
        :func:`~taskoffload._gateway_child.child_config`), given the
        directory of the shared counters; called when the process starts.
    :param pool_status: the pool's state, for a pool in this process tree.
    :param stop_timeout: seconds a stopping process may take before it is killed.
    """

    def __init__(
        self,
        listen: str,
        count: int,
        config: Callable[[int, str, int], bytes],
        pool_status: Callable[[], dict[str, Any]] | None = None,
        stop_timeout: float = 30.0,
        reactor: Any = None,
    ) -> None:
        self.listen = listen
        self.count = count
        self._config = config
        self._pool_status = pool_status
        self.stop_timeout = stop_timeout
        self._reactor = reactor
        self.port: IListeningPort | None = None
        self.directory: str | None = None
        self.children: dict[int, _ChildProtocol] = {}
        self.replaced = 0
        self._stopping = False
        self._writer: task.LoopingCall | None = None
        #: A process started and waiting to take a dead one's place.
        self._spare: _ChildProtocol | None = None
        self._delay = 0.0

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def privilegedStartService(self) -> None:
        """Bind the port (before twistd drops privileges, if it does)."""
        super().privilegedStartService()
        if self.port is None:
            self.port = bind_never_accepting(self.reactor, self.listen)

    def startService(self) -> None:
        super().startService()
        self.privilegedStartService()
        self._stopping = False
        self.directory = tempfile.mkdtemp(prefix="taskoffload-gateway-")
        if self._pool_status is not None:
            self._writer = task.LoopingCall(self._write_pool_status)
            self._writer.clock = self.reactor
            self._writer.start(POOL_STATUS_INTERVAL)
        assert self.port is not None
        _log.info(
            "Gateway listening on {address} in {count} processes",
            address=self.port.getHost(),
            count=self.count,
        )
        for index in range(self.count):
            self._spawn(index)
        self._spawn(self.count, spare=True)

    def _write_pool_status(self) -> None:
        if self.directory is not None and self._pool_status is not None:
            write_pool_status(self.directory, self._pool_status())

    def _family(self) -> int:
        listening: socket.socket = self.port.socket  # type: ignore[union-attr]  # a tcp.Port or unix.Port
        return listening.family

    def _spawn(self, index: int, spare: bool = False) -> _ChildProtocol:
        """
        Start gateway process ``index``: serving at once, or, as the ``spare``,
        started (its modules imported, its service built) and waiting to be told
        to serve, so that a dead process is replaced in milliseconds rather than
        the second a Python process takes to start.
        """
        assert self.port is not None and self.directory is not None
        if self._pool_status is not None:
            self._write_pool_status()
        env = dict(os.environ)
        env[MULTIPROCESS_DIRECTORY] = self.directory
        env["PYTHONUNBUFFERED"] = "1"
        protocol = _ChildProtocol(index, self._ended)
        transport = self.reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", "taskoffload._gateway_child"],
            env=env,
            childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: self.port.fileno()},  # type: ignore[attr-defined]
        )
        protocol.pid = transport.pid
        protocol.started = self.reactor.seconds()
        transport.write(self._config(index, self.directory, self._family()))
        if spare:
            self._spare = protocol
            _log.info("Spare gateway process started (pid {pid})", pid=protocol.pid)
        else:
            self._serve(protocol)
        return protocol

    def _serve(self, protocol: _ChildProtocol) -> None:
        """Tell ``protocol``'s process to serve, as gateway process ``protocol.index``."""
        assert protocol.transport is not None
        protocol.transport.write(SERVE)
        self.children[protocol.index] = protocol
        _log.info(
            "Gateway process {index} (pid {pid}) serves", index=protocol.index, pid=protocol.pid
        )

    def _ended(self, protocol: _ChildProtocol, reason: Failure) -> None:
        was_spare = protocol is self._spare
        if was_spare:
            self._spare = None
        elif self.children.get(protocol.index) is protocol:
            del self.children[protocol.index]
        if self.directory is not None and protocol.pid is not None:
            # Its counters stay (totals never fall); its gauges (clients, in
            # flight) go with it.
            multiprocess.mark_process_dead(protocol.pid, self.directory)
        if self._stopping:
            return
        # One that dies young (a broken start) is started again after a pause
        # that doubles, so a crash loop does not flood the machine and the log.
        young = self.reactor.seconds() - protocol.started < STABLE_SECONDS
        self._delay = (
            min(max(self._delay * 2, MIN_RESTART_DELAY), MAX_RESTART_DELAY) if young else 0.0
        )
        if was_spare:
            _log.warn("The spare gateway process ended; starting another")
            self._later(self._delay, lambda: self._spawn(protocol.index, spare=True))
            return
        how = "exited" if reason.check(ProcessDone) else f"ended ({reason.getErrorMessage()})"
        _log.warn("Gateway process {index} {how}; replacing it", index=protocol.index, how=how)
        self.replaced += 1
        spare = self._spare
        if spare is not None and spare.transport is not None:
            self._spare = None
            spare.index = protocol.index
            self._serve(spare)
            self._later(self._delay, lambda: self._spawn(protocol.index, spare=True))
        else:
            self._later(self._delay, lambda: self._spawn(protocol.index))

    def _later(self, delay: float, start: Callable[[], object]) -> None:
        """Call ``start`` after ``delay`` seconds (at once for 0), unless stopping by then."""
        if not delay:
            start()
            return

        def unless_stopping() -> None:
            if not self._stopping:
                start()

        self.reactor.callLater(delay, unless_stopping)

    def _wait_or_kill(self, children: list[_ChildProtocol]) -> Deferred[None]:
        """
        :return: a Deferred firing once every one of ``children`` has exited, or
            when those left are killed, ``--stop-timeout`` + 2 s from now.
        """
        done: Deferred[None] = Deferred()

        def ended(_: object) -> None:
            if not done.called:
                timer.cancel()
                done.callback(None)

        def overdue() -> None:
            _log.warn("Gateway processes still running after the stop timeout; killing them")
            for protocol in children:
                if protocol.pid is not None and not protocol.exited.called:
                    os.kill(protocol.pid, signal.SIGKILL)
            done.callback(None)

        timer = self.reactor.callLater(self.stop_timeout + 2.0, overdue)
        defer.gatherResults([p.exited for p in children]).addBoth(ended)
        return done

    def pids(self) -> list[int]:
        """:return: the process ids of the gateway processes running."""
        pids = []
        for protocol in self.children.values():
            pid = protocol.transport.pid if protocol.transport is not None else None  # type: ignore[attr-defined]
            if pid is not None:
                pids.append(pid)
        return pids

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._writer is not None and self._writer.running:
            self._writer.stop()
        children = list(self.children.values())
        if self._spare is not None:
            children.append(self._spare)
        for protocol in children:
            if protocol.transport is not None:
                protocol.transport.signalProcess("TERM")
        if children:
            await self._wait_or_kill(children)
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
