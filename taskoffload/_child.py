"""
The worker process: what a forked child runs.

It installs a fresh reactor (none exists before the fork), serves the shared
listening socket with :class:`~taskoffload.acceptor.SharedSocketAcceptor`, and
reports its log events to the supervisor over the events pipe, one JSON line per
``write`` so that lines from many processes never interleave.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, NoReturn

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReadDescriptor
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload.acceptor import SharedSocketAcceptor
from taskoffload.config import PoolConfig
from taskoffload.events import (
    Deadline,
    EventWriter,
    Recycling,
    Serving,
    Stats,
    Stopped,
)
from taskoffload.registry import TaskRegistry, load_tasks
from taskoffload.running import DeadlineExceeded, ISyncDeadlines
from taskoffload.settings import WorkerSettings
from taskoffload.worker import TaskServerFactory

__all__ = ["AlarmDeadlines", "Lifeline", "WorkerProcess", "recycle_reason", "run_worker"]

_log = Logger(namespace="taskoffload.worker")

#: The longest alarm set (about three years); a longer deadline is as good as none.
MAX_ALARM_SECONDS = 1e8

#: Seconds a stopping worker waits for its connections to close once drained.
CLOSE_TIMEOUT = 2.0

#: Seconds between two looks at whether the worker's counts changed.
STATS_INTERVAL = 1.0

#: Least seconds between two reports of the worker's busy count when it changes
#: (a balancer's agent check reads it; see :mod:`taskoffload.agent`).
BUSY_INTERVAL = 0.25


@implementer(IReadDescriptor)
class Lifeline:
    """
    Calls ``on_close``, once, when the supervisor's end of the lifeline pipe closes.

    :param fd: this process's end of the pipe.
    :param reactor: the reactor the lifeline is a reader of.
    """

    def __init__(self, fd: int, on_close: Callable[[], None], reactor: IReactorFDSet) -> None:
        self._fd = fd
        self._on_close: Callable[[], None] | None = on_close
        self._reactor = reactor

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "lifeline"

    def connectionLost(self, reason: Failure) -> None:
        # epoll reports a pipe whose writer closed as a hang-up, and the reactor
        # calls this instead of doRead.
        self._closed()

    def doRead(self) -> None:
        try:
            data = os.read(self._fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._reactor.removeReader(self)
            self._closed()

    def _closed(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def _set_alarm(seconds: float) -> None:
    signal.setitimer(signal.ITIMER_REAL, seconds)


@implementer(ISyncDeadlines)
class AlarmDeadlines:
    """
    Holds synchronous tasks to their deadline with ``SIGALRM``: the handler raises
    :class:`DeadlineExceeded` in the task.  Code the signal cannot interrupt (a C
    call holding the interpreter) is the supervisor's to end: it is told each
    deadline, and kills the process ``grace`` seconds after it.

    :param events: the pipe to the supervisor.
    :param set_alarm: sets the process's alarm to ring in that many seconds
        (``0``: not at all).
    :param monotonic: the system-wide monotonic clock the supervisor reads too.
    """

    def __init__(
        self,
        events: EventWriter,
        grace: float,
        *,
        set_alarm: Callable[[float], None] = _set_alarm,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._events = events
        self._grace = grace
        self._set_alarm = set_alarm
        self._monotonic = monotonic
        self._armed = False

    def install(self) -> None:
        """Make ``SIGALRM`` interrupt the task it was armed for."""
        signal.signal(signal.SIGALRM, self._expired)

    def _expired(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False
            raise DeadlineExceeded("the task ran past its deadline")

    def arm(self, seconds: float) -> None:
        # setitimer overflows on huge values; a deadline years away is none.
        seconds = min(seconds, MAX_ALARM_SECONDS)
        self._events.send(
            Deadline(
                index=self._events.index,
                pid=self._events.pid,
                kill_at=self._monotonic() + seconds + self._grace,
            )
        )
        self._set_alarm(seconds)
        self._armed = True

    def disarm(self) -> None:
        self._set_alarm(0)
        if self._armed:
            self._armed = False
        self._events.send(Deadline(index=self._events.index, pid=self._events.pid))


def resident_mib() -> float:
    """This process's resident memory, in MiB (Linux)."""
    with open("/proc/self/statm", "rb") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def recycle_reason(config: PoolConfig, tasks_done: int, memory: Callable[[], float]) -> str | None:
    """
    Why a worker should replace itself now, if it should.

    :param tasks_done: how many tasks it has run.
    :param memory: its resident memory in MiB, read only if a limit is set and
        the task count is not due.
    :return: the reason, for the logs, or ``None`` to go on.
    """
    max_tasks = config.max_tasks_per_child
    max_rss = config.max_memory_per_child
    if max_tasks and tasks_done >= max_tasks:
        return f"ran {tasks_done} tasks (--max-tasks-per-child {max_tasks})"
    if max_rss and (rss := memory()) >= max_rss:
        return f"uses {rss:.0f} MiB (--max-memory-per-child {max_rss})"
    return None


class WorkerProcess:
    """
    One worker process: it serves the pool's shared socket until a signal, the
    supervisor's going or its own recycling stops it, then finishes its tasks
    within the stop timeout.

    :param config: the pool's configuration.
    :param index: this worker's slot number, for logs.
    :param events: the pipe to the supervisor.
    :param reactor: this process's reactor: it must provide ``IReactorCore``,
        ``IReactorTime``, ``IReactorFDSet``, ``IReactorThreads`` and
        ``IReactorSocket``, as the global reactor does.
    :param memory: this process's resident memory, in MiB.
    :ivar stopping: the process has begun to stop.
    """

    def __init__(
        self,
        config: PoolConfig,
        index: int,
        events: EventWriter,
        reactor: Any,
        *,
        memory: Callable[[], float] = resident_mib,
    ) -> None:
        self.config = config
        self.index = index
        self.events = events
        self.reactor = reactor
        self._memory = memory
        self.stopping = False
        self._factory: TaskServerFactory | None = None
        self._acceptor: SharedSocketAcceptor | None = None
        # The last report's (tasks done, memory, busy), and when it was sent.
        self._last_stats: tuple[int, float, int] | None = None
        self._stats_sent_at = 0.0
        self._busy_report: IDelayedCall | None = None

    @classmethod
    def install(cls, config: PoolConfig, index: int, events: EventWriter) -> WorkerProcess:
        """
        Install this process's reactor (a forked child has none) and send its log
        events, and what it writes to standard output and error, to the supervisor.
        """
        # Imported here, not at the top: the reactor must be installed first.
        from twisted.internet import default

        default.install()
        from twisted.internet import reactor

        globalLogBeginner.beginLoggingTo(
            [events.log_observer],  # type: ignore[list-item]  # a plain callable is an ILogObserver
            discardBuffer=True,
            redirectStandardIO=True,
        )
        return cls(config, index, events, reactor)

    def adopt_socket(self, listen_fd: int, registry: TaskRegistry) -> None:
        """Serve the tasks of ``registry`` on this process's copy of the shared socket."""
        listening = socket.socket(fileno=os.dup(listen_fd))
        listening.setblocking(False)
        deadlines = AlarmDeadlines(self.events, grace=self.config.kill_grace)
        deadlines.install()
        factory = TaskServerFactory(
            registry,
            self.reactor,
            WorkerSettings.from_config(self.config, worker_id=os.getpid(), index=self.index),
            sync_deadlines=deadlines,
            capacity_changed=self.capacity_changed,
            after_task=self.task_ended,
        )
        self.serve(factory, SharedSocketAcceptor(self.reactor, listening, factory))

    def serve(self, factory: TaskServerFactory, acceptor: SharedSocketAcceptor) -> None:
        """Serve with ``factory``, whose connections ``acceptor`` takes."""
        self._factory = factory
        self._acceptor = acceptor

    def _server(self) -> tuple[TaskServerFactory, SharedSocketAcceptor]:
        if self._factory is None or self._acceptor is None:
            raise RuntimeError("the worker has no socket to serve yet")
        return self._factory, self._acceptor

    def capacity_changed(self, has_capacity: bool) -> None:
        """The task server gained or lost room for a connection: tell the acceptor."""
        if self._acceptor is not None:
            self._acceptor.set_capacity(has_capacity)
        self.busy_changed()

    def task_ended(self) -> None:
        """After a task: report the busy count if it changed, and recycle if due."""
        self.busy_changed()
        self.recycle_if_due()

    def run(self, lifeline_fd: int) -> None:
        """
        Run the reactor until the worker stops, and tell the supervisor its final count.

        :param lifeline_fd: a pipe that reads end-of-file when the supervisor is gone.
        """
        factory, _ = self._server()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.graceful_stop)
        self.reactor.callWhenRunning(self._started, lifeline_fd)
        self.reactor.run()
        self.events.send(
            Stopped(index=self.index, pid=self.events.pid, tasks_done=factory.tasks_done)
        )

    def _started(self, lifeline_fd: int) -> None:
        _, acceptor = self._server()
        acceptor.resume()
        stats = LoopingCall(self.report_stats)
        stats.clock = self.reactor
        stats.start(STATS_INTERVAL, now=True)
        self.install_signals()
        self.reactor.addReader(Lifeline(lifeline_fd, self.supervisor_gone, self.reactor))
        self.events.send(Serving(index=self.index, pid=self.events.pid))

    def install_signals(self) -> None:
        """Stop on ``SIGTERM`` and ``SIGINT``, however many come."""
        # Replace Twisted's handlers, which would stop an already stopping reactor
        # when a second signal comes (say, one to the whole process group).
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum: int, frame: Any) -> None:
        """A signal handler: stop, from the reactor's thread."""
        self.reactor.callFromThread(self.stop)

    def stop(self) -> None:
        """Stop the reactor, unless already stopping; it then stops gracefully."""
        if not self.stopping:
            self.stopping = True
            self.reactor.stop()

    def supervisor_gone(self) -> None:
        """The lifeline closed: stop, unless already stopping."""
        # (The reactor also reports the lifeline lost when it shuts down.)
        if not self.stopping:
            _log.warn("Supervisor is gone; stopping")
            self.stop()

    def recycle_if_due(self) -> None:
        """After a task: stop, telling the supervisor why, if the worker should be replaced."""
        if self.stopping:
            return
        factory, _ = self._server()
        reason = recycle_reason(self.config, factory.tasks_done, self._memory)
        if reason is not None:
            _log.info("Recycling: {reason}", reason=reason)
            self.events.send(Recycling(index=self.index, pid=self.events.pid, reason=reason))
            self.stop()

    def report_stats(self) -> None:
        """Send the supervisor this worker's counts if they changed since the last report."""
        # What `status` shows per worker.
        factory, _ = self._server()
        self._send_stats(factory, round(self._memory(), 1))

    def _send_stats(self, factory: TaskServerFactory, rss_mib: float) -> None:
        stats = (factory.tasks_done, rss_mib, factory.busy_connections)
        if stats != self._last_stats:
            self._last_stats = stats
            self._stats_sent_at = self.reactor.seconds()
            self.events.send(
                Stats(
                    index=self.index,
                    pid=self.events.pid,
                    tasks_done=stats[0],
                    rss_mib=stats[1],
                    busy=stats[2],
                )
            )

    def busy_changed(self) -> None:
        """
        The task server's capacity changed, or a task ended: if its busy count
        differs from the last report's, report it now, or, if the last report is
        younger than :data:`BUSY_INTERVAL`, once it is that old (with the count
        then, and only if that still differs).  A busy count that rises without
        reaching the concurrency limit goes with the next :meth:`report_stats`.
        """
        factory, last = self._factory, self._last_stats
        if factory is None or last is None or self._busy_report is not None:
            return
        if factory.busy_connections == last[2]:
            return  # the hot path: a task ended, the count is as reported
        delay = self._stats_sent_at + BUSY_INTERVAL - self.reactor.seconds()
        if delay > 0:
            self._busy_report = self.reactor.callLater(delay, self._busy_report_due)
        else:
            self._send_stats(factory, last[1])

    def _busy_report_due(self) -> None:
        self._busy_report = None
        factory, last = self._factory, self._last_stats
        if factory is not None and last is not None and factory.busy_connections != last[2]:
            self._send_stats(factory, last[1])

    def graceful_stop(self) -> Deferred[None]:
        """
        Take no more connections, let the running tasks finish within the stop
        timeout, then close every connection.

        :return: a Deferred that fires when that is done.
        """
        return Deferred.fromCoroutine(self._stop_serving())

    async def _stop_serving(self) -> None:
        factory, acceptor = self._server()
        acceptor.stop()
        factory.begin_stop()
        running = factory.running
        if running:
            _log.info("Stopping: finishing {running} task(s)", running=running)
        timeout = self.config.stop_timeout
        drained = factory.drain()
        drained.addTimeout(timeout, self.reactor)
        try:
            await drained
        except TimeoutError:
            _log.warn("Stop timeout ({timeout} s) passed with tasks running", timeout=timeout)
        closed = factory.close_all()
        closed.addTimeout(CLOSE_TIMEOUT, self.reactor)
        try:
            await closed
        except TimeoutError:
            pass


def run_worker(
    config: PoolConfig, index: int, events_fd: int, listen_fd: int, lifeline_fd: int
) -> NoReturn:
    """
    Serve tasks until told to stop, then exit the process.

    :param config: the pool's configuration, as the fork server read it.
    :param index: this worker's slot number, for logs.
    :param events_fd: the pipe to the supervisor.
    :param listen_fd: the shared listening socket of the worker's lane.
    :param lifeline_fd: a pipe that reads end-of-file when the supervisor is gone.
    """
    process = WorkerProcess.install(config, index, EventWriter(events_fd, index))
    process.adopt_socket(listen_fd, load_tasks(config.tasks))
    process.run(lifeline_fd)
    os._exit(0)
