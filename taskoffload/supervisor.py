"""
The worker supervisor: owns the listening socket, the fork server and, through it,
every worker process; restarts what dies and stops everything gracefully.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import orjson
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from taskoffload.config import PoolConfig

__all__ = ["PoolConfig", "WorkerPoolService"]

_log = Logger(namespace="taskoffload.supervisor")
_worker_log = Logger(namespace="taskoffload.worker")

#: A worker that dies sooner than this after starting is crash-looping.
STABLE_SECONDS = 1.0
#: First and largest delay before restarting a crash-looping worker.
MIN_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0


def _with_backlog(description: str, backlog: int = 1024) -> str:
    """Add a generous ``backlog`` to a tcp/unix endpoint string that sets none."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


class _NeverAccept(Factory):
    """The supervisor's port never accepts; this only satisfies the endpoint API."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Protocol | None:
        return None


@attrs.define
class WorkerRecord:
    """One worker slot and the process currently in it."""

    index: int
    pid: int | None = None
    started: float = 0.0
    serving: bool = False
    restarts: int = 0
    delay: float = 0.0
    tasks_done: int = 0
    timer: IDelayedCall | None = None
    recycling: bool = False
    recycled: int = 0
    reloading: bool = False
    deadline_kill: IDelayedCall | None = None
    #: What the current process last reported (tasks it ran, resident MiB).
    process_tasks: int = 0
    rss_mib: float | None = None
    killed_for_deadline: int = 0


class _ForkServerProtocol(ProcessProtocol):
    """Reads the fork server's events (fd 1) and raw standard error (fd 2)."""

    def __init__(self, service: WorkerPoolService) -> None:
        self._service = service
        self._buffers = {1: b"", 2: b""}
        self.ended: Deferred[None] = Deferred()
        #: Write end of this fork server's lifeline, closed when it has ended.
        self.lifeline: int | None = None
        self.started = 0.0

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self._buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        self._buffers[childFD] = rest
        for line in lines:
            if childFD == 1:
                self._service.event_received(line, self)
            elif line.strip():
                self._service.raw_output(line)

    def processEnded(self, reason: Failure) -> None:
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None
        self.ended.callback(None)
        self._service.fork_server_ended(self, reason)


class WorkerPoolService(Service):
    """
    Run ``config.count`` worker processes serving one listening socket.

    :param config: the pool's configuration.
    :param reactor: provides ``IReactorProcess``, ``IReactorTime`` and
        ``IReactorSocket``; defaults to the global reactor.
    """

    def __init__(self, config: PoolConfig, reactor: Any = None) -> None:
        self.config = config
        self._reactor = reactor
        self.workers: dict[int, WorkerRecord] = {}
        self.port: IListeningPort | None = None
        self._fork_server: _ForkServerProtocol | None = None
        self._fork_server_delay = 0.0
        self._fork_server_timer: IDelayedCall | None = None
        # A fork server starting with fresh code, during a rolling reload.
        self._next_fork_server: _ForkServerProtocol | None = None
        # Fork servers whose workers are being replaced.
        self._old_fork_servers: list[_ForkServerProtocol] = []
        # Slots still to replace in the rolling reload under way, or None.
        self._reload_queue: list[int] | None = None
        self._reloading_slot: int | None = None
        self.reloads = 0
        self._stopping = False
        self._launched_at = 0.0
        self._all_serving: list[Deferred[float]] = []
        self._all_exited: list[Deferred[None]] = []
        self.serving_after: float | None = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # Lifecycle

    def privilegedStartService(self) -> None:
        """Bind the listening socket (before twistd drops privileges, if it does)."""
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        if self.port is not None:
            return
        endpoint = serverFromString(self.reactor, _with_backlog(self.config.listen))
        ports: list[IListeningPort] = []
        failures: list[Failure] = []
        endpoint.listen(_NeverAccept()).addCallbacks(ports.append, failures.append)
        if failures:
            failures[0].raiseException()
        if not ports:
            raise RuntimeError(f"{self.config.listen}: the endpoint did not listen at once")
        # The supervisor only holds the socket; its children accept on it.
        ports[0].stopReading()  # type: ignore[attr-defined]  # tcp.Port and unix.Port are FileDescriptors
        self.port = ports[0]

    def startService(self) -> None:
        super().startService()
        self.reactor.callWhenRunning(self._handle_sighup)
        self._stopping = False
        self._launched_at = self.reactor.seconds()
        self._listen()
        port = self.port
        assert port is not None
        _log.info(
            "Worker pool listening on {address}, starting {count} workers",
            address=port.getHost(),
            count=self.config.count,
        )
        self.workers = {i: WorkerRecord(index=i) for i in range(self.config.count)}
        self._spawn_fork_server()

    def _handle_sighup(self) -> None:
        # SIGTERM is taskoffload.signals.ExitZeroOnSigterm's, for every role.
        def on_sighup(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, on_sighup)

    def _spawn_fork_server(self, for_reload: bool = False) -> None:
        self._fork_server_timer = None
        if self._stopping or self.port is None:
            return
        # Each fork server has its own lifeline: its workers stop when its write
        # end closes, which happens when the supervisor dies.
        lifeline_r, lifeline_w = os.pipe()
        protocol = _ForkServerProtocol(self)
        protocol.lifeline = lifeline_w
        protocol.started = self.reactor.seconds()
        if for_reload:
            self._next_fork_server = protocol
        else:
            self._fork_server = protocol
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", "taskoffload._forkserver"],
            env=env,
            childFDs={
                0: "w",
                1: "r",
                2: "r",
                3: self.port.fileno(),  # type: ignore[attr-defined]  # ports are FileDescriptors
                4: lifeline_r,
            },
        )
        os.close(lifeline_r)
        protocol.transport.write(self.config.to_json())  # type: ignore[union-attr]  # set by spawnProcess

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._fork_server_timer is not None and self._fork_server_timer.active():
            self._fork_server_timer.cancel()
        for record in self.workers.values():
            if record.timer is not None and record.timer.active():
                record.timer.cancel()
            record.timer = None
        self._refuse_new_connections()
        alive = [r for r in self.workers.values() if r.pid is not None]
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
        servers = [self._fork_server, self._next_fork_server, *self._old_fork_servers]
        for fork_server in servers:
            if fork_server is None or fork_server.transport is None or fork_server.ended.called:
                continue
            fork_server.transport.closeStdin()  # type: ignore[attr-defined]  # IProcessTransport
            ended = fork_server.ended
            ended.addTimeout(5.0, self.reactor)
            try:
                await ended
            except defer.TimeoutError:
                try:
                    fork_server.transport.signalProcess("KILL")  # type: ignore[attr-defined]  # IProcessTransport
                except Exception:
                    pass
            if fork_server.lifeline is not None:
                os.close(fork_server.lifeline)
                fork_server.lifeline = None
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        _log.info("Worker pool stopped")

    def _refuse_new_connections(self) -> None:
        """
        Make the shared socket refuse connections from now on (the workers stop
        accepting anyway): a balancer or client then goes to another pool at
        once, instead of queueing where nobody will accept.
        """
        listening = getattr(self.port, "socket", None)
        if listening is not None:
            try:
                listening.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def _signal_workers(self, signum: int) -> None:
        for record in self.workers.values():
            if record.pid is not None:
                try:
                    os.kill(record.pid, signum)
                except ProcessLookupError:
                    pass

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
        if all(r.pid is None for r in self.workers.values()):
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._all_exited.append(d)
        return d

    def _fire_all_exited(self) -> None:
        if all(r.pid is None for r in self.workers.values()):
            waiters, self._all_exited = self._all_exited, []
            for d in waiters:
                d.callback(None)

    def _count_serving(self) -> int:
        return sum(1 for r in self.workers.values() if r.serving)

    # Events from the fork server and the workers

    def event_received(self, line: bytes, source: _ForkServerProtocol | None = None) -> None:
        """Handle one JSON event line from a fork server (``source``) or its workers."""
        try:
            event = orjson.loads(line)
            kind = event["event"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.raw_output(line)
            return
        handler: Callable[[dict[str, Any]], None] | None = getattr(self, f"_on_{kind}", None)
        if handler is None:
            _log.warn("Unknown event from the pool: {event!r}", event=event)
            return
        try:
            if kind in ("ready", "failed"):
                handler(event, source)  # type: ignore[call-arg]  # these two take the source
            else:
                handler(event)
        except (KeyError, TypeError, ValueError):
            # A malformed event must not cost us the pipe, and with it every
            # later exit notice.
            _log.failure("Bad event from the pool: {line!r}", line=line)

    def raw_output(self, line: bytes) -> None:
        """Log a line a worker or the fork server wrote to standard output or error."""
        _log.info("{output}", output=line.decode("utf-8", "replace"))

    def _on_log(self, event: dict[str, Any]) -> None:
        try:
            level = LogLevel.levelWithName(event.get("level", "info"))
        except Exception:
            level = LogLevel.info
        _worker_log.emit(
            level,
            "[worker {worker_index} pid {worker_pid}] {text}",
            worker_index=event.get("index"),
            worker_pid=event.get("pid"),
            worker_namespace=event.get("namespace"),
            text=event.get("text", ""),
        )

    def _on_ready(self, event: dict[str, Any], source: _ForkServerProtocol | None = None) -> None:
        if source is not None and source is self._next_fork_server:
            # The fresh code imported: replace the workers one slot at a time.
            self._next_fork_server = None
            if self._fork_server is not None:
                self._old_fork_servers.append(self._fork_server)
            self._fork_server = source
            self._reload_next()
            return
        for record in self.workers.values():
            if record.pid is None and record.timer is None:
                self._fork(record)

    def _on_failed(self, event: dict[str, Any], source: _ForkServerProtocol | None = None) -> None:
        text = event.get("text", "(no reason given)")
        if source is not None and source is self._next_fork_server:
            self._next_fork_server = None
            self._reload_queue = None
            _log.error("Reload aborted, the workers keep the old code: {text}", text=text)
            return
        _log.error("The worker pool cannot start: {text}", text=text)
        if self.serving_after is None and self.reactor.running:
            # It never served: retrying would leave the port open with nobody to
            # accept, and callers waiting in silence.  Stop, and say why (above).
            self.reactor.stop()

    # Rolling reload

    def reload(self) -> None:
        """
        Replace every worker with one running the task modules imported afresh,
        one slot at a time, each after its tasks finish: a code deploy without a
        failed request.  A reload asked for during another is ignored.
        """
        if self._stopping or self.port is None or self._fork_server is None:
            return
        if self._reload_queue is not None or self._next_fork_server is not None:
            _log.info("A reload is already under way")
            return
        _log.info("Reloading: starting a fork server with the task modules imported afresh")
        self._reload_queue = sorted(self.workers)
        self._reload_started = self.reactor.seconds()
        self._spawn_fork_server(for_reload=True)

    def _reload_next(self) -> None:
        queue = self._reload_queue
        if queue is None:
            return
        while queue:
            record = self.workers[queue.pop(0)]
            self._reloading_slot = record.index
            if record.pid is None:
                if record.timer is None:
                    self._fork(record)
                return  # (a slot waiting for a backoff restart gets new code then)
            record.reloading = True
            _log.info(
                "Reload: replacing worker {index} (pid {pid}) once its tasks finish",
                index=record.index,
                pid=record.pid,
            )
            os.kill(record.pid, signal.SIGTERM)
            return
        self._reload_queue = None
        self._reloading_slot = None
        self.reloads += 1
        for old in self._old_fork_servers:
            if old.transport is not None and not old.ended.called:
                old.transport.closeStdin()  # type: ignore[attr-defined]  # IProcessTransport
        self._old_fork_servers = [s for s in self._old_fork_servers if not s.ended.called]
        _log.info(
            "Reload complete: {count} workers replaced in {elapsed:.2f} s",
            count=self.config.count,
            elapsed=self.reactor.seconds() - self._reload_started,
        )

    def _fork(self, record: WorkerRecord) -> None:
        record.timer = None
        if self._stopping or self._fork_server is None or self._fork_server.transport is None:
            return
        command = orjson.dumps({"cmd": "fork", "index": record.index}) + b"\n"
        self._fork_server.transport.write(command)

    def _new_process(self, event: dict[str, Any]) -> WorkerRecord | None:
        """The slot of a "forked" or "serving" event, updated to the event's pid."""
        record = self.workers.get(event["index"])
        if record is not None and record.pid != event["pid"]:
            # The first of the two events for a new process: a fast worker's
            # "serving" may arrive before the fork server's "forked".
            record.pid = event["pid"]
            record.started = self.reactor.seconds()
            record.serving = False
        return record

    def _on_forked(self, event: dict[str, Any]) -> None:
        if self._new_process(event) is not None and self._stopping:
            os.kill(event["pid"], signal.SIGTERM)

    def _on_serving(self, event: dict[str, Any]) -> None:
        record = self._new_process(event)
        if record is None:
            return
        record.serving = True
        if self._reloading_slot == record.index:
            self._reload_next()
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

    def _on_stats(self, event: dict[str, Any]) -> None:
        record = self.workers.get(event["index"])
        if record is not None and record.pid == event["pid"]:
            record.process_tasks = int(event.get("tasks_done", 0))
            rss = event.get("rss_mib")
            record.rss_mib = float(rss) if rss is not None else None

    def _on_deadline(self, event: dict[str, Any]) -> None:
        record = self.workers.get(event["index"])
        if record is None or record.pid != event["pid"]:
            return
        if record.deadline_kill is not None and record.deadline_kill.active():
            record.deadline_kill.cancel()
        record.deadline_kill = None
        kill_at = event.get("kill_at")
        if kill_at is not None:
            # Both processes read the same system-wide monotonic clock.
            delay = max(float(kill_at) - time.monotonic(), 0.0)
            record.deadline_kill = self.reactor.callLater(
                delay, self._kill_overdue, record, record.pid
            )

    def _kill_overdue(self, record: WorkerRecord, pid: int) -> None:
        record.deadline_kill = None
        if record.pid != pid:
            return
        _log.warn(
            "Worker {index} (pid {pid}) is still running a task {grace} s past its deadline; "
            "killing it",
            index=record.index,
            pid=pid,
            grace=self.config.kill_grace,
        )
        record.killed_for_deadline += 1
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _on_recycling(self, event: dict[str, Any]) -> None:
        record = self.workers.get(event["index"])
        if record is not None and record.pid == event["pid"]:
            record.recycling = True
            _log.info(
                "Worker {index} (pid {pid}) recycles itself: {reason}",
                index=record.index,
                pid=record.pid,
                reason=event.get("reason", ""),
            )

    def _on_stopped(self, event: dict[str, Any]) -> None:
        record = self.workers.get(event["index"])
        if record is not None and record.pid == event["pid"]:
            # Its final count; added to the slot's total when it has exited.
            record.process_tasks = int(event.get("tasks_done", 0))

    def _on_exited(self, event: dict[str, Any]) -> None:
        record = self.workers.get(event["index"])
        if record is None or record.pid != event["pid"]:
            return
        self._worker_gone(record, event.get("code"))

    def _worker_gone(self, record: WorkerRecord, code: int | None) -> None:
        was_serving = record.serving
        # The slot's count goes on across processes; memory was the dead one's.
        record.tasks_done += record.process_tasks
        record.process_tasks = 0
        record.rss_mib = None
        pid, record.pid, record.serving = record.pid, None, False
        if record.deadline_kill is not None and record.deadline_kill.active():
            record.deadline_kill.cancel()
        record.deadline_kill = None
        if self._stopping:
            self._fire_all_exited()
            return
        if record.reloading or record.recycling:
            # A planned exit: replace it at once (from the current fork server,
            # with the new code during a reload), and it is no crash.
            record.reloading = False
            record.recycling = False
            record.recycled += 1
            record.delay = 0.0
            self._fork(record)
            return
        uptime = self.reactor.seconds() - record.started
        if uptime >= STABLE_SECONDS or was_serving:
            # It served, so it is no crash loop (it was killed, or a task took it
            # down): replace it at once.  Backoff is for workers that die before
            # they ever serve.
            record.delay = 0.0
        else:
            record.delay = min(max(record.delay * 2, MIN_RESTART_DELAY), MAX_RESTART_DELAY)
        record.restarts += 1
        _log.warn(
            "Worker {index} (pid {pid}) exited with {code} after {uptime:.2f} s; "
            "restarting in {delay} s",
            index=record.index,
            pid=pid,
            code=code,
            uptime=uptime,
            delay=record.delay,
        )
        if record.delay:
            record.timer = self.reactor.callLater(record.delay, self._fork, record)
        else:
            self._fork(record)

    def fork_server_ended(self, protocol: _ForkServerProtocol, reason: Failure) -> None:
        """The fork server exited; if that was not asked for, start another."""
        if protocol in self._old_fork_servers:
            self._old_fork_servers.remove(protocol)
        if protocol is self._next_fork_server:
            self._next_fork_server = None
            self._reload_queue = None
            _log.error(
                "Reload aborted: the new fork server exited ({reason})",
                reason=reason.getErrorMessage(),
            )
            return
        if protocol is not self._fork_server:
            return
        self._fork_server = None
        # Its workers die with it (parent-death signal); make sure, and mark them gone.
        for record in self.workers.values():
            if record.pid is not None:
                try:
                    os.kill(record.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                record.pid, record.serving = None, False
        if self._stopping:
            self._fire_all_exited()
            return
        uptime = self.reactor.seconds() - protocol.started
        if uptime >= STABLE_SECONDS * 5:
            self._fork_server_delay = 0.0
        else:
            self._fork_server_delay = min(
                max(self._fork_server_delay * 2, MIN_RESTART_DELAY * 2), MAX_RESTART_DELAY
            )
        _log.error(
            "The fork server exited ({reason}); restarting the pool in {delay} s",
            reason=reason.getErrorMessage(),
            delay=self._fork_server_delay,
        )
        self._fork_server_timer = self.reactor.callLater(
            self._fork_server_delay, self._spawn_fork_server
        )

    # Status

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary of the pool, for ``/status``."""
        now = self.reactor.seconds()
        return {
            "count": self.config.count,
            "alive": sum(1 for r in self.workers.values() if r.pid is not None),
            "serving": self._count_serving(),
            "restarts": sum(r.restarts for r in self.workers.values()),
            "recycled": sum(r.recycled for r in self.workers.values()),
            "reloads": self.reloads,
            "reloading": self._reload_queue is not None or self._next_fork_server is not None,
            "killed_past_deadline": sum(r.killed_for_deadline for r in self.workers.values()),
            "workers": [
                {
                    "index": r.index,
                    "pid": r.pid,
                    "state": "serving" if r.serving else ("starting" if r.pid else "down"),
                    "uptime": round(now - r.started, 3) if r.pid else None,
                    "restarts": r.restarts,
                    "recycled": r.recycled,
                    "tasks_done": r.tasks_done + r.process_tasks,
                    "rss_mib": r.rss_mib,
                }
                for r in self.workers.values()
            ],
        }
