"""
The worker process: what a forked child runs.

It installs a fresh reactor (none exists before the fork), serves the shared
listening socket with :class:`~taskoffload.worker.SharedSocketAcceptor`, and
reports its log events to the supervisor over the events pipe, one JSON line per
``write`` so that lines from many processes never interleave.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any, NoReturn

from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from taskoffload.events import (
    Deadline,
    EventWriter,
    Recycling,
    Serving,
    Stats,
    Stopped,
)
from taskoffload.worker import DeadlineExceeded, ISyncDeadlines


@implementer(IReadDescriptor)
class _Lifeline:
    """Calls ``on_close`` when the supervisor's end of the lifeline pipe closes."""

    def __init__(self, fd: int, on_close: Any) -> None:
        self._fd = fd
        self._on_close = on_close

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "lifeline"

    def connectionLost(self, reason: Any) -> None:
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
            from twisted.internet import reactor

            reactor.removeReader(self)  # type: ignore[attr-defined]  # the global reactor provides IReactorFDSet
            self._closed()

    def _closed(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


#: The longest alarm set (about three years); a longer deadline is as good as none.
MAX_ALARM_SECONDS = 1e8


@implementer(ISyncDeadlines)
class AlarmDeadlines:
    """
    Holds synchronous tasks to their deadline with ``SIGALRM``: the handler raises
    :class:`DeadlineExceeded` in the task.  Code the signal cannot interrupt (a C
    call holding the interpreter) is the supervisor's to end: it is told each
    deadline, and kills the process ``grace`` seconds after it.
    """

    def __init__(self, events: EventWriter, grace: float) -> None:
        self._events = events
        self._grace = grace
        self._armed = False
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
                kill_at=time.monotonic() + seconds + self._grace,
            )
        )
        signal.setitimer(signal.ITIMER_REAL, seconds)
        self._armed = True

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self._armed:
            self._armed = False
        self._events.send(Deadline(index=self._events.index, pid=self._events.pid))


def resident_mib() -> float:
    """This process's resident memory, in MiB (Linux)."""
    with open("/proc/self/statm", "rb") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


def run_worker(
    config: dict[str, Any], index: int, events_fd: int, listen_fd: int, lifeline_fd: int
) -> NoReturn:
    """
    Serve tasks until told to stop, then exit the process.

    :param config: the pool's configuration (see ``supervisor.PoolConfig.to_json``).
    :param index: this worker's slot number, for logs.
    :param events_fd: the pipe to the supervisor.
    :param listen_fd: the shared listening socket.
    :param lifeline_fd: a pipe that reads end-of-file when the supervisor is gone.
    """
    from twisted.internet import default

    default.install()
    from twisted.internet import defer, reactor, task
    from twisted.logger import Logger, globalLogBeginner

    from taskoffload.registry import load_tasks
    from taskoffload.worker import SharedSocketAcceptor, TaskServerFactory

    events = EventWriter(events_fd, index)
    globalLogBeginner.beginLoggingTo(
        [events.log_observer],  # type: ignore[list-item]  # a plain callable is an ILogObserver
        discardBuffer=True,
        redirectStandardIO=True,
    )
    log = Logger(namespace="taskoffload.worker")
    registry = load_tasks(config["tasks"])
    listening = socket.socket(fileno=os.dup(listen_fd))
    listening.setblocking(False)
    acceptor: SharedSocketAcceptor | None = None

    def capacity_changed(has_capacity: bool) -> None:
        if acceptor is not None:
            acceptor.set_capacity(has_capacity)

    factory = TaskServerFactory(
        registry,
        reactor,  # type: ignore[arg-type]  # the global reactor provides IReactorTime
        concurrency=config["concurrency"],
        max_message=config["max_message"],
        capacity_changed=capacity_changed,
        worker_id=os.getpid(),
        idle_timeout=float(config.get("idle_timeout", 60.0)),
        task_timeout=config.get("task_timeout"),
        pool_slots=config.get("count", 0) * config["concurrency"] or None,
        secret=bytes.fromhex(config["secret"]) if config.get("secret") else None,
        sync_deadlines=AlarmDeadlines(events, grace=float(config.get("kill_grace", 1.0))),
        after_task=lambda: recycle_if_due(),
    )
    acceptor = SharedSocketAcceptor(reactor, listening, factory)
    stop_timeout = float(config["stop_timeout"])

    stopping = False

    def stop_once() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            reactor.stop()  # type: ignore[attr-defined]  # IReactorCore

    max_tasks = config.get("max_tasks_per_child")
    max_rss = config.get("max_memory_per_child")  # MiB

    def recycle_if_due() -> None:
        if stopping:
            return
        reason = None
        if max_tasks and factory.tasks_done >= max_tasks:
            reason = f"ran {factory.tasks_done} tasks (--max-tasks-per-child {max_tasks})"
        elif max_rss and (rss := resident_mib()) >= max_rss:
            reason = f"uses {rss:.0f} MiB (--max-memory-per-child {max_rss})"
        if reason is not None:
            log.info("Recycling: {reason}", reason=reason)
            events.send(Recycling(index=index, pid=events.pid, reason=reason))
            stop_once()

    def supervisor_gone() -> None:
        # (The reactor also reports the lifeline lost when it shuts down.)
        if not stopping:
            log.warn("Supervisor is gone; stopping")
            stop_once()

    def on_signal(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop_once)  # type: ignore[attr-defined]  # IReactorThreads

    @defer.inlineCallbacks
    def graceful_stop() -> Any:
        assert acceptor is not None
        acceptor.stop()
        factory.begin_stop()
        running = factory.running
        if running:
            log.info("Stopping: finishing {running} task(s)", running=running)
        drained = factory.drain()
        drained.addTimeout(stop_timeout, reactor)  # type: ignore[arg-type]  # IReactorTime
        try:
            yield drained
        except defer.TimeoutError:
            log.warn("Stop timeout ({timeout} s) passed with tasks running", timeout=stop_timeout)
        closed = factory.close_all()
        closed.addTimeout(2.0, reactor)  # type: ignore[arg-type]  # IReactorTime
        try:
            yield closed
        except defer.TimeoutError:
            pass

    last_report: list[Any] = [None]

    def report_stats() -> None:
        # Once a second at most, and only on change: what `status` shows per worker.
        stats = (factory.tasks_done, round(resident_mib(), 1))
        if stats != last_report[0]:
            last_report[0] = stats
            events.send(Stats(index=index, pid=events.pid, tasks_done=stats[0], rss_mib=stats[1]))

    def started() -> None:
        assert acceptor is not None
        acceptor.resume()
        task.LoopingCall(report_stats).start(1.0, now=True)
        # Replace Twisted's handlers, which would stop an already stopping reactor
        # when a second signal comes (say, one to the whole process group).
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        reactor.addReader(_Lifeline(lifeline_fd, supervisor_gone))  # type: ignore[attr-defined]  # IReactorFDSet
        events.send(Serving(index=index, pid=events.pid))

    reactor.addSystemEventTrigger("before", "shutdown", graceful_stop)  # type: ignore[attr-defined]  # IReactorCore
    reactor.callWhenRunning(started)  # type: ignore[attr-defined]  # IReactorCore
    reactor.run()  # type: ignore[attr-defined]  # IReactorCore
    events.send(Stopped(index=index, pid=events.pid, tasks_done=factory.tasks_done))
    os._exit(0)
