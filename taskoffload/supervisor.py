"""
The worker supervisor: owns the listening socket, the fork server and, through it,
every worker process; restarts what dies and stops everything gracefully.

:class:`WorkerPoolService` holds one :class:`~taskoffload.slots.WorkerSlot` per
worker, starts and stops the pool, and reports its status; its fork servers are a
:class:`~taskoffload.forkserver_client.ForkServerClient`'s, the events its
processes send go through an :class:`~taskoffload.event_router.EventRouter`, and
``SIGHUP`` starts a :class:`~taskoffload.reload.RollingReload`.
"""

from __future__ import annotations

import functools
import signal
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from taskoffload.config import PoolConfig
from taskoffload.deaths import JOURNAL_ENV, Deaths
from taskoffload.event_router import EventRouter, log_raw_output
from taskoffload.forkserver_client import ForkServerClient, ForkServerProtocol
from taskoffload.interfaces import IProcessControl
from taskoffload.processes import ProcessControl
from taskoffload.reload import RollingReload
from taskoffload.slots import SlotState, WorkerSlot
from taskoffload.sockets import PoolSockets, lane_status

__all__ = ["PoolConfig", "WorkerPoolService"]

_log = Logger(namespace="taskoffload.supervisor")


class WorkerPoolService(Service):
    """
    Run ``config.count`` worker processes serving one listening socket.

    :param config: the pool's configuration.
    :param reactor: provides ``IReactorProcess``, ``IReactorTime`` and
        ``IReactorSocket``; defaults to the global reactor.
    :param processes: what starts and signals the pool's processes; defaults to a
        :class:`~taskoffload.processes.ProcessControl` on ``reactor``.
    :ivar workers: one record per worker slot, by index.
    """

    def __init__(
        self, config: PoolConfig, reactor: Any = None, processes: IProcessControl | None = None
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._processes = processes
        self.workers: dict[int, WorkerSlot] = {}
        self._sockets = PoolSockets(lambda: self.reactor)
        self._stopping = False
        self._launched_at = 0.0
        self._all_serving: list[Deferred[float]] = []
        self._all_exited: list[Deferred[None]] = []
        self.serving_after: float | None = None
        #: Why its workers died: the journal its workers answer clients from.
        self.deaths = Deaths()

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def processes(self) -> IProcessControl:
        """What starts and signals the pool's processes."""
        if self._processes is None:
            self._processes = ProcessControl(self.reactor)
        return self._processes

    # The parts are built on first use, since the reactor is only looked up then.

    @functools.cached_property
    def _fork_servers(self) -> ForkServerClient:
        return ForkServerClient(self.config, self.reactor, self.processes, self)

    @functools.cached_property
    def _reload(self) -> RollingReload:
        return RollingReload(lambda: self.workers, self._fork_servers, self._fork, self.reactor)

    @functools.cached_property
    def _router(self) -> EventRouter:
        return EventRouter(lambda: self.workers, self._fork_servers, self)

    @property
    def reloads(self) -> int:
        """How many rolling reloads have completed."""
        return self._reload.completed

    @property
    def draining(self) -> bool:
        """Whether the pool wants no new work: it is stopping, or a reload is under way."""
        return self._stopping or self._reload.under_way

    # Lifecycle

    def privilegedStartService(self) -> None:
        """Bind the listening socket (before twistd drops privileges, if it does)."""
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        if self._sockets.port is None:
            # What the workers tell clients: where each lane listens.
            self.config = self._sockets.bind(self.config)

    @property
    def port(self) -> IListeningPort | None:
        """The default lane's listening socket, while the pool holds it."""
        return self._sockets.port

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._handle_sighup)
        self._stopping = False
        self._launched_at = self.reactor.seconds()
        self._listen()
        self._sockets.log_listening(self.config)
        env = {**self.config.env, JOURNAL_ENV: self.deaths.start()}
        self.config = attrs.evolve(self.config, env=env)
        self.workers = self._new_slots()
        # The configuration as bound: where each lane listens, for the workers to tell.
        self._fork_servers.start(*self._sockets.fds(), config=self.config)

    def _new_slots(self) -> dict[int, WorkerSlot]:
        return {
            index: WorkerSlot(
                index=index,
                clock=self.reactor,
                processes=self.processes,
                fork=self._fork,
                kill_grace=self.config.kill_grace,
            )
            for index in range(self.config.count)
        }

    def _handle_sighup(self) -> None:
        # SIGTERM is taskoffload.signals.ExitZeroOnSigterm's, for every role.
        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, on_sighup)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        self._fork_servers.stop()
        for slot in self.workers.values():
            slot.cancel_restart()
        self._sockets.refuse_new_connections()
        alive = [s for s in self.workers.values() if s.pid is not None]
        if alive:
            _log.info("Stopping {count} workers", count=len(alive))
            self._signal_workers(signal.SIGTERM)
            exited = self.wait_for_exit()
            exited.addTimeout(self.config.stop_timeout + 2.0, self.reactor)
            try:
                await exited
            except defer.TimeoutError:
                _log.warn("Workers still running after the stop timeout; killing them")
                self._signal_workers(signal.SIGKILL)
        await self._fork_servers.close()
        self.deaths.stop()
        await self._sockets.close()
        _log.info("Worker pool stopped")

    def _signal_workers(self, signum: int) -> None:
        for slot in self.workers.values():
            slot.signal(signum)

    # Waiting, for tests and the benchmark

    def wait_until_serving(self) -> Deferred[float]:
        """
        :return: a Deferred firing with the seconds from start until every worker
            served, once they all do.
        """
        if self.serving_after is not None and self._count_serving() == self.config.count:
            return defer.succeed(self.serving_after)
        d: Deferred[float] = Deferred()
        self._all_serving.append(d)
        return d

    def wait_for_exit(self) -> Deferred[None]:
        """:return: a Deferred firing once no worker process is alive."""
        if all(s.pid is None for s in self.workers.values()):
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._all_exited.append(d)
        return d

    def _fire_all_exited(self) -> None:
        if all(s.pid is None for s in self.workers.values()):
            waiters, self._all_exited = self._all_exited, []
            for d in waiters:
                d.callback(None)

    def _count_serving(self) -> int:
        return sum(1 for s in self.workers.values() if s.state is SlotState.SERVING)

    # Events from the fork server and the workers

    def event_received(self, line: bytes, source: ForkServerProtocol | None = None) -> None:
        """Handle one event line from a fork server (``source``) or its workers."""
        self._router.line_received(line, source)

    def raw_output(self, line: bytes) -> None:
        """Log a line a worker or the fork server wrote to standard output or error."""
        log_raw_output(line)

    def worker_forked(self, slot: WorkerSlot, pid: int) -> None:
        """``pid`` was forked into ``slot``: if the pool is stopping, tell it to stop."""
        if self._stopping:
            self.processes.kill(pid, signal.SIGTERM)

    def worker_serving(self, slot: WorkerSlot) -> None:
        """``slot``'s process serves; once every slot's does, the pool serves."""
        self._reload.slot_serving(slot)
        if self._count_serving() == self.config.count:
            elapsed = self.reactor.seconds() - self._launched_at
            if self.serving_after is None:
                self.serving_after = elapsed
                _log.info(
                    "All {count} workers serving, {elapsed:.3f} s after start",
                    count=self.config.count,
                    elapsed=elapsed,
                )
            waiters, self._all_serving = self._all_serving, []
            for d in waiters:
                d.callback(elapsed)

    def worker_exited(self, slot: WorkerSlot, code: int | None) -> None:
        """``slot``'s process exited: replace it, unless the pool is stopping."""
        if not self._stopping and not slot.retiring and slot.pid is not None:
            # Unplanned: why, for its clients (read before the slot forgets its memory).
            self.deaths.died(slot.index, slot.pid, code, slot.rss_mib)
        slot.exited(code, restart=not self._stopping)
        if self._stopping:
            self._fire_all_exited()

    # What the fork servers report (see ForkServerOwner)

    def fork_server_ready(self) -> None:
        """The current fork server takes fork commands: fork every slot that is down."""
        for slot in self.workers.values():
            if slot.state is SlotState.DOWN:
                self._fork(slot)

    def fork_server_failed(self, text: str) -> None:
        """The fork server could not import the task modules."""
        _log.error("The worker pool cannot start: {text}", text=text)
        if self.serving_after is None and self.reactor.running:
            # It never served: retrying would leave the port open with nobody to
            # accept, and callers waiting in silence.  Stop, and say why (above).
            self.reactor.stop()

    def fork_server_lost(self) -> None:
        """The current fork server died unasked, and its workers with it."""
        # They die by their parent-death signal; make sure, and mark them gone.
        for slot in self.workers.values():
            if slot.pid is not None:
                slot.signal(signal.SIGKILL)
                slot.lost()
        if self._stopping:
            self._fire_all_exited()

    # Reloading and forking

    def reload(self) -> None:
        """
        Replace every worker with one running the task modules imported afresh,
        one slot at a time, each after its tasks finish: a code deploy without a
        failed request.  A reload asked for during another is ignored.
        """
        if self._stopping or self.port is None or self._fork_servers.current is None:
            return
        self._reload.start()

    def _fork(self, slot: WorkerSlot) -> None:
        if not self._stopping:
            self._fork_servers.fork(slot.index)

    # Status

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary of the pool, for ``/status``."""
        now = self.reactor.seconds()
        slots = self.workers.values()
        return {
            "count": self.config.count,
            "alive": sum(1 for s in slots if s.pid is not None),
            "serving": self._count_serving(),
            "busy": sum(s.busy for s in slots),
            "restarts": sum(s.restarts for s in slots),
            "recycled": sum(s.recycled for s in slots),
            "reloads": self._reload.completed,
            "reloading": self._reload.under_way,
            "killed_past_deadline": sum(s.killed_for_deadline for s in slots),
            "lanes": lane_status(self.config, self.workers.values()),
            "workers": [{**s.status(now), "lane": self.config.lane_name(s.index)} for s in slots],
        }
