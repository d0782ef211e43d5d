"""
Unit tests for :mod:`taskoffload._child`, the worker process's own logic, without
forking or installing a reactor: a ``WorkerProcess`` over a fake reactor (a
``Clock`` that records what it is asked), a fake task server and acceptor, and an
events pipe that records the events instead of writing them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from taskoffload._child import (
    BUSY_INTERVAL,
    CLOSE_TIMEOUT,
    MAX_ALARM_SECONDS,
    AlarmDeadlines,
    Lifeline,
    WorkerProcess,
    recycle_reason,
    resident_mib,
)
from taskoffload.config import PoolConfig
from taskoffload.events import Deadline, EventWriter, Recycling, Stats, Stopped
from taskoffload.running import DeadlineExceeded, ISyncDeadlines
from tests._trial_bridge import pytest_module

INDEX = 2


class RecordedEvents(EventWriter):
    """An events pipe that keeps what is sent, in order."""

    def __init__(self) -> None:
        super().__init__(-1, INDEX)
        self.sent: list[Any] = []

    def send(self, event: Any) -> None:
        self.sent.append(event)


class FakeReactor(Clock):
    """A clock that records stops, readers, triggers and calls from other threads."""

    def __init__(self) -> None:
        super().__init__()
        self.stops = 0
        self.readers: list[Any] = []
        self.removed: list[Any] = []
        self.triggers: list[tuple[str, str, Callable[[], Any]]] = []
        self.when_running: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def stop(self) -> None:
        self.stops += 1

    def run(self) -> None:
        pass

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.removed.append(reader)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], Any]) -> None:
        self.triggers.append((phase, event, f))

    def callWhenRunning(self, f: Callable[..., Any], *args: Any) -> None:
        self.when_running.append((f, args))


class FakeServer:
    """The task server and the acceptor of a worker, recording what they are asked."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.tasks_done = 0
        self.running = 0
        self.busy_connections = 0
        self.drained: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def begin_stop(self) -> None:
        self.calls.append("begin_stop")

    def drain(self) -> Deferred[None]:
        self.calls.append("drain")
        return self.drained

    def close_all(self) -> Deferred[None]:
        self.calls.append("close_all")
        return self.closed


class FakeAcceptor:
    """Records the acceptor calls, in the same list as the server's."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def stop(self) -> None:
        self.calls.append("acceptor.stop")

    def resume(self) -> None:
        self.calls.append("acceptor.resume")

    def set_capacity(self, has_capacity: bool) -> None:
        self.calls.append(f"capacity {has_capacity}")


class Worker:
    """A ``WorkerProcess`` serving with fakes, and the fakes."""

    def __init__(self, config: PoolConfig | None = None, rss: float = 100.0) -> None:
        self.rss = rss
        self.calls: list[str] = []
        self.events = RecordedEvents()
        self.reactor = FakeReactor()
        self.server = FakeServer(self.calls)
        self.process = WorkerProcess(
            config or PoolConfig(stop_timeout=10.0),
            INDEX,
            self.events,
            self.reactor,
            memory=lambda: self.rss,
        )
        self.process.serve(self.server, FakeAcceptor(self.calls))  # type: ignore[arg-type]  # fakes

    def sent(self, kind: type) -> list[Any]:
        """The events of one kind sent so far."""
        return [e for e in self.events.sent if isinstance(e, kind)]


def fired(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(results.append)
    assert not any(isinstance(r, Failure) for r in results), results
    return bool(results)


# Recycling


def never_read() -> float:
    raise AssertionError("memory was read")


def test_recycle_after_max_tasks() -> None:
    """A worker is due for replacement once it has run --max-tasks-per-child tasks."""
    config = PoolConfig(max_tasks_per_child=3)
    assert recycle_reason(config, 2, never_read) is None
    assert recycle_reason(config, 3, never_read) == "ran 3 tasks (--max-tasks-per-child 3)"


def test_recycle_over_max_memory() -> None:
    """A worker is due for replacement once its memory reaches --max-memory-per-child."""
    config = PoolConfig(max_memory_per_child=200)
    assert recycle_reason(config, 5, lambda: 199.9) is None
    assert recycle_reason(config, 5, lambda: 250.4) == "uses 250 MiB (--max-memory-per-child 200)"


def test_memory_not_read_without_a_limit() -> None:
    """Without a memory limit, the worker's memory is not read to decide."""
    assert recycle_reason(PoolConfig(), 1000, never_read) is None


def test_recycling_tells_the_supervisor_and_stops_once() -> None:
    """A worker due for replacement logs why, tells the supervisor, and stops; later
    tasks do not tell it again."""
    worker = Worker(PoolConfig(max_tasks_per_child=3))
    worker.server.tasks_done = 3
    with capturedLogs() as logged:
        worker.process.recycle_if_due()
        worker.server.tasks_done = 4
        worker.process.recycle_if_due()
    reason = "ran 3 tasks (--max-tasks-per-child 3)"
    assert worker.sent(Recycling) == [Recycling(index=INDEX, pid=worker.events.pid, reason=reason)]
    assert [formatEvent(e) for e in logged] == [f"Recycling: {reason}"]
    assert worker.reactor.stops == 1


def test_no_recycling_once_stopping() -> None:
    """A worker already stopping is not recycled on top."""
    worker = Worker(PoolConfig(max_tasks_per_child=1))
    worker.server.tasks_done = 1
    worker.process.stop()
    worker.process.recycle_if_due()
    assert worker.sent(Recycling) == []
    assert worker.reactor.stops == 1


# Stats


def test_stats_sent_only_on_change() -> None:
    """Counts go to the supervisor when the task count or the memory (to 0.1 MiB)
    changed since the last report, and not otherwise."""
    worker = Worker(rss=100.04)
    worker.process.report_stats()
    worker.process.report_stats()
    worker.rss = 100.01  # the same to 0.1 MiB
    worker.process.report_stats()
    worker.server.tasks_done = 1
    worker.process.report_stats()
    worker.rss = 120.0
    worker.process.report_stats()
    pid = worker.events.pid
    assert worker.sent(Stats) == [
        Stats(index=INDEX, pid=pid, tasks_done=0, rss_mib=100.0),
        Stats(index=INDEX, pid=pid, tasks_done=1, rss_mib=100.0),
        Stats(index=INDEX, pid=pid, tasks_done=1, rss_mib=120.0),
    ]


def busy_reports(worker: Worker) -> list[int]:
    """The busy count of each Stats event sent so far."""
    return [e.busy for e in worker.sent(Stats)]


def test_a_changed_busy_count_is_reported_at_once() -> None:
    """When the capacity changes and the busy count with it, the count goes to the
    supervisor at once (the last report being older than the interval)."""
    worker = Worker()
    worker.process.report_stats()
    worker.reactor.advance(BUSY_INTERVAL)
    worker.server.busy_connections = 1
    worker.process.capacity_changed(False)
    assert busy_reports(worker) == [0, 1]
    assert worker.calls == ["capacity False"]
    worker.reactor.advance(BUSY_INTERVAL)
    worker.server.busy_connections = 0
    worker.server.tasks_done = 1
    worker.process.task_ended()
    assert worker.sent(Stats)[-1] == Stats(
        index=INDEX, pid=worker.events.pid, tasks_done=1, rss_mib=100.0, busy=0
    )


def test_busy_reports_are_rate_limited_and_coalesced() -> None:
    """Changes within the interval of the last report wait for it to pass, and then
    the count at that moment is sent, once."""
    worker = Worker()
    worker.process.report_stats()
    worker.server.busy_connections = 1
    worker.process.capacity_changed(False)
    worker.reactor.advance(BUSY_INTERVAL / 2)
    worker.server.busy_connections = 2
    worker.process.task_ended()
    assert busy_reports(worker) == [0]
    worker.reactor.advance(BUSY_INTERVAL / 2)
    assert busy_reports(worker) == [0, 2]
    assert worker.reactor.getDelayedCalls() == []


def test_a_busy_count_back_where_it_was_is_not_reported() -> None:
    """A count that changed and changed back before the delayed report is not sent,
    nor is the task that ran meanwhile (it goes with the periodic report)."""
    worker = Worker()
    worker.process.report_stats()
    worker.server.busy_connections = 1
    worker.process.capacity_changed(False)
    worker.server.busy_connections = 0
    worker.server.tasks_done = 1
    worker.process.capacity_changed(True)
    worker.reactor.advance(BUSY_INTERVAL)
    assert busy_reports(worker) == [0]


def test_a_task_that_leaves_the_count_as_reported_writes_nothing() -> None:
    """The hot path: a task ends, the busy count is the one last reported: no event,
    nothing scheduled."""
    worker = Worker()
    worker.server.busy_connections = 1
    worker.process.report_stats()
    for done in range(1, 4):
        worker.server.tasks_done = done
        worker.process.task_ended()
    assert busy_reports(worker) == [1]
    assert worker.reactor.getDelayedCalls() == []
    worker.process.report_stats()  # the task count goes with the next periodic report
    assert worker.sent(Stats)[-1].tasks_done == 3


def test_busy_rising_below_the_limit_goes_with_the_periodic_report() -> None:
    """A count no hook saw change (a task started below the concurrency limit) is
    reported by the next look at the counts."""
    worker = Worker()
    worker.process.report_stats()
    worker.server.busy_connections = 1
    worker.process.report_stats()
    assert busy_reports(worker) == [0, 1]


def test_a_task_ending_still_recycles() -> None:
    """The end of a task is also when a worker due for replacement recycles itself."""
    worker = Worker(PoolConfig(max_tasks_per_child=1))
    worker.server.tasks_done = 1
    worker.process.task_ended()
    assert len(worker.sent(Recycling)) == 1
    assert worker.reactor.stops == 1


def test_resident_memory_is_read() -> None:
    """The worker's memory reads as a positive number of MiB."""
    assert resident_mib() > 0


# Stopping


def test_graceful_stop_sequence() -> None:
    """Stopping takes no more connections, asks the server to stop, waits for its tasks,
    then closes every connection; it is done when they are closed."""
    worker = Worker()
    worker.server.running = 2
    with capturedLogs() as logged:
        stopped = worker.process.graceful_stop()
    assert worker.calls == ["acceptor.stop", "begin_stop", "drain"]
    assert [formatEvent(e) for e in logged] == ["Stopping: finishing 2 task(s)"]
    worker.server.drained.callback(None)
    assert worker.calls[-1] == "close_all"
    assert not fired(stopped)
    worker.server.closed.callback(None)
    assert fired(stopped)


def test_graceful_stop_gives_up_waiting_at_the_stop_timeout() -> None:
    """Tasks still running at the stop timeout are logged and their connections closed;
    connections that do not close are given up on too."""
    worker = Worker(PoolConfig(stop_timeout=10.0))
    stopped = worker.process.graceful_stop()
    worker.reactor.advance(9.9)
    assert "close_all" not in worker.calls
    with capturedLogs() as logged:
        worker.reactor.advance(0.1)
    assert worker.calls[-1] == "close_all"
    [warning] = logged
    assert warning["log_level"] == LogLevel.warn
    assert formatEvent(warning) == "Stop timeout (10.0 s) passed with tasks running"
    worker.reactor.advance(CLOSE_TIMEOUT)
    assert fired(stopped)


def test_run_stops_gracefully_and_reports_the_final_count() -> None:
    """Running registers the graceful stop for the reactor's shutdown, starts serving
    once the reactor runs, and sends the final task count once the reactor returns."""
    worker = Worker()
    worker.server.tasks_done = 7
    worker.process.run(lifeline_fd=9)
    assert worker.reactor.triggers == [("before", "shutdown", worker.process.graceful_stop)]
    assert [args for _, args in worker.reactor.when_running] == [(9,)]
    assert worker.sent(Stopped) == [Stopped(index=INDEX, pid=worker.events.pid, tasks_done=7)]


def test_signal_stops_from_the_reactor_thread_once() -> None:
    """A signal stops the reactor through callFromThread; a second does nothing more."""
    worker = Worker()
    worker.process.on_signal(signal.SIGTERM, None)
    worker.process.on_signal(signal.SIGINT, None)
    assert worker.process.stopping
    assert worker.reactor.stops == 1


def test_capacity_changes_reach_the_acceptor() -> None:
    """The task server's capacity changes start and stop the acceptor's reading."""
    worker = Worker()
    worker.process.capacity_changed(False)
    worker.process.capacity_changed(True)
    assert worker.calls == ["capacity False", "capacity True"]


# The lifeline


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_lifeline_close_stops_the_worker_once(pipe: tuple[int, int]) -> None:
    """When the supervisor's end closes, the worker warns and stops; the lifeline lost
    again at the reactor's shutdown stops nothing more."""
    r, w = pipe
    worker = Worker()
    lifeline = Lifeline(r, worker.process.supervisor_gone, worker.reactor)
    os.close(w)
    with capturedLogs() as logged:
        lifeline.doRead()
        lifeline.connectionLost(Failure(ConnectionDone()))
    assert worker.reactor.removed == [lifeline]
    assert worker.reactor.stops == 1
    assert [formatEvent(e) for e in logged] == ["Supervisor is gone; stopping"]


def test_lifeline_hang_up_stops_the_worker(pipe: tuple[int, int]) -> None:
    """A hang-up reported as the lifeline lost stops the worker, as end-of-file does."""
    r, _ = pipe
    worker = Worker()
    Lifeline(r, worker.process.supervisor_gone, worker.reactor).connectionLost(
        Failure(ConnectionDone())
    )
    assert worker.reactor.stops == 1


def test_lifeline_open_does_nothing(pipe: tuple[int, int]) -> None:
    """A wake-up with nothing to read, or with bytes, is not the supervisor's going."""
    r, w = pipe
    worker = Worker()
    lifeline = Lifeline(r, worker.process.supervisor_gone, worker.reactor)
    lifeline.doRead()
    os.write(w, b"x")
    lifeline.doRead()
    assert worker.reactor.stops == 0
    assert lifeline.fileno() == r


def test_supervisor_gone_while_stopping_is_quiet() -> None:
    """The lifeline lost while the worker already stops logs nothing and stops nothing more."""
    worker = Worker()
    worker.process.stop()
    with capturedLogs() as logged:
        worker.process.supervisor_gone()
    assert list(logged) == []
    assert worker.reactor.stops == 1


# AlarmDeadlines


class Alarm:
    """A fake alarm and monotonic clock for :class:`AlarmDeadlines`."""

    def __init__(self) -> None:
        self.set: list[float] = []
        self.now = 1000.0
        self.events = RecordedEvents()
        self.deadlines = AlarmDeadlines(
            self.events, grace=1.5, set_alarm=self.set.append, monotonic=lambda: self.now
        )


def test_alarm_deadlines_tell_the_supervisor_each_deadline() -> None:
    """Arming sets the alarm and tells the supervisor when to kill the worker (deadline
    plus grace); disarming clears the alarm and tells it the task ended."""
    alarm = Alarm()
    verifyObject(ISyncDeadlines, alarm.deadlines)
    alarm.deadlines.arm(2.0)
    alarm.deadlines.disarm()
    pid = alarm.events.pid
    assert alarm.set == [2.0, 0]
    assert alarm.events.sent == [
        Deadline(index=INDEX, pid=pid, kill_at=1003.5),
        Deadline(index=INDEX, pid=pid),
    ]


def test_alarm_for_a_huge_deadline_is_capped() -> None:
    """A deadline years away sets the longest alarm instead of overflowing."""
    alarm = Alarm()
    alarm.deadlines.arm(1e300)
    assert alarm.set == [MAX_ALARM_SECONDS]


@pytest.fixture
def alarm_handler() -> Iterator[None]:
    """Puts back the ``SIGALRM`` handler a test installs."""
    previous = signal.getsignal(signal.SIGALRM)
    yield
    signal.signal(signal.SIGALRM, previous)


def test_alarm_interrupts_only_an_armed_task(alarm_handler: None) -> None:
    """The installed ``SIGALRM`` handler raises DeadlineExceeded while a task is armed,
    once, and not after it was disarmed."""
    alarm = Alarm()
    alarm.deadlines.install()
    ring = signal.getsignal(signal.SIGALRM)
    assert callable(ring)
    alarm.deadlines.arm(2.0)
    with pytest.raises(DeadlineExceeded):
        ring(signal.SIGALRM, None)
    ring(signal.SIGALRM, None)  # the first ring disarmed it
    alarm.deadlines.arm(2.0)
    alarm.deadlines.disarm()
    ring(signal.SIGALRM, None)


testSuite = pytest_module(__file__)
