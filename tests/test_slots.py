"""
Unit tests for :mod:`taskoffload.slots`: one worker slot's states, its restart
policy and its status, on a ``Clock`` with signals recorded by a
``FakeProcessControl``.
"""

from __future__ import annotations

import signal
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskoffload.slots import (
    MIN_RESTART_DELAY,
    STABLE_SECONDS,
    SlotState,
    SlotStateError,
    WorkerSlot,
)
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl


class Slot:
    """A slot on a ``Clock`` that records its fork requests and signals."""

    def __init__(self, kill_grace: float = 1.0) -> None:
        self.clock = Clock()
        self.processes = FakeProcessControl()
        self.forks: list[int] = []
        self.slot = WorkerSlot(
            index=3,
            clock=self.clock,
            processes=self.processes,
            fork=lambda slot: self.forks.append(slot.index),
            kill_grace=kill_grace,
        )

    def serve(self, pid: int) -> None:
        """``pid`` takes the slot and serves."""
        self.slot.process_reported(pid)
        self.slot.process_serving()


def test_a_new_slot_is_down() -> None:
    """A slot starts down, with no process and nothing counted."""
    slot = Slot().slot
    assert (slot.state, slot.pid, slot.restarts, slot.recycled) == (SlotState.DOWN, None, 0, 0)


def test_a_reported_process_starts_then_serves() -> None:
    """A reported pid takes the slot, starting; its serving makes the slot serving."""
    s = Slot()
    s.clock.advance(4.0)
    s.slot.process_reported(100)
    assert (s.slot.state, s.slot.pid, s.slot.started) == (SlotState.STARTING, 100, 4.0)
    s.slot.process_serving()
    assert s.slot.state is SlotState.SERVING


def test_the_same_pid_reported_again_changes_nothing() -> None:
    """A second report of the slot's own pid (its "forked" after its "serving") is a no-op."""
    s = Slot()
    s.serve(100)
    s.clock.advance(1.0)
    s.slot.process_reported(100)
    assert (s.slot.state, s.slot.started) == (SlotState.SERVING, 0.0)


def test_serving_without_a_process_is_refused() -> None:
    """A slot that is down cannot serve: the transition raises SlotStateError."""
    with pytest.raises(SlotStateError):
        Slot().slot.process_serving()


def test_a_young_death_waits_then_forks() -> None:
    """A process dying young without serving leaves the slot waiting, then forks it."""
    s = Slot()
    s.slot.process_reported(100)
    s.clock.advance(STABLE_SECONDS / 2)
    s.slot.exited(1)
    assert (s.slot.state, s.forks, s.slot.restarts) == (SlotState.WAITING, [], 1)
    s.clock.advance(MIN_RESTART_DELAY)
    assert (s.slot.state, s.forks) == (SlotState.DOWN, [3])


def test_a_served_process_is_replaced_at_once() -> None:
    """A process that served is replaced at once however young, with a restart counted."""
    s = Slot()
    s.serve(100)
    s.slot.exited(-9)
    assert (s.slot.state, s.forks, s.slot.restarts) == (SlotState.DOWN, [3], 1)
    assert s.clock.getDelayedCalls() == []


def test_exit_logs_the_restart() -> None:
    """An unplanned exit is warned of with its pid, code, uptime and restart delay."""
    s = Slot()
    s.slot.process_reported(100)
    s.clock.advance(0.25)
    with capturedLogs() as events:
        s.slot.exited(1)
    [event] = events
    assert event["log_level"] == LogLevel.warn
    assert formatEvent(event) == (
        "Worker 3 (pid 100) exited with 1 after 0.25 s; restarting in 0.5 s"
    )


def test_exit_without_restart_only_counts() -> None:
    """An exit while the pool stops adds up the counts and forks nothing."""
    s = Slot()
    s.serve(100)
    s.slot.stats(5, 20.0)
    s.slot.exited(0, restart=False)
    assert (s.slot.state, s.forks, s.slot.restarts) == (SlotState.DOWN, [], 0)
    assert (s.slot.tasks_done, s.slot.process_tasks, s.slot.rss_mib) == (5, 0, None)


def test_a_process_reported_while_waiting_takes_the_slot() -> None:
    """A process reported for a slot waiting to restart takes it; the restart is dropped."""
    s = Slot()
    s.slot.process_reported(100)
    s.slot.exited(1)
    assert s.slot.state is SlotState.WAITING
    s.slot.process_reported(101)
    assert (s.slot.state, s.slot.pid) == (SlotState.STARTING, 101)
    assert s.clock.getDelayedCalls() == []


def test_cancel_restart() -> None:
    """Cancelling a waiting restart leaves the slot down, and nothing is forked."""
    s = Slot()
    s.slot.process_reported(100)
    s.slot.exited(1)
    s.slot.cancel_restart()
    s.clock.advance(60)
    assert (s.slot.state, s.forks) == (SlotState.DOWN, [])


def test_recycling_is_a_planned_exit() -> None:
    """A process that recycles itself is replaced at once, counted as recycled, not restarted."""
    s = Slot()
    s.serve(100)
    with capturedLogs() as events:
        s.slot.recycling("ran 3 tasks")
    assert [formatEvent(e) for e in events] == ["Worker 3 (pid 100) recycles itself: ran 3 tasks"]
    s.slot.exited(0)
    assert (s.forks, s.slot.recycled, s.slot.restarts, s.slot.retiring) == ([3], 1, 0, False)


def test_retire_sends_sigterm_and_its_exit_is_planned() -> None:
    """Retiring a slot's process SIGTERMs it; its young exit is replaced at once."""
    s = Slot()
    s.slot.process_reported(100)
    s.slot.retire()
    assert s.processes.signals == [(100, signal.SIGTERM)]
    s.slot.exited(0)
    assert (s.forks, s.slot.recycled, s.slot.restarts) == ([3], 1, 0)


def test_lost_keeps_the_counts() -> None:
    """A process lost with its fork server leaves the slot down, its counts as they were."""
    s = Slot()
    s.serve(100)
    s.slot.stats(4, 11.0)
    s.slot.lost()
    assert (s.slot.state, s.slot.pid, s.forks) == (SlotState.DOWN, None, [])
    assert (s.slot.process_tasks, s.slot.rss_mib) == (4, 11.0)


def test_signal_only_a_process() -> None:
    """A slot signals its process; a slot without one signals nothing."""
    s = Slot()
    s.slot.signal(signal.SIGTERM)
    s.serve(100)
    s.slot.signal(signal.SIGKILL)
    assert s.processes.signals == [(100, signal.SIGKILL)]


def test_deadline_kills_the_process_it_was_set_for() -> None:
    """An overdue task's process is SIGKILLed and counted; a replacement process is not."""
    s = Slot(kill_grace=0.5)
    s.serve(100)
    s.slot.deadline(time.monotonic() + 1.0)
    with capturedLogs() as events:
        s.clock.advance(1.5)
    assert s.processes.signals == [(100, signal.SIGKILL)]
    assert s.slot.killed_for_deadline == 1
    assert "still running a task 0.5 s past its deadline" in formatEvent(events[0])
    s.slot.exited(-9)
    s.serve(101)
    s.slot.deadline(time.monotonic() + 1.0)
    s.slot.exited(-9)
    s.clock.advance(10)
    assert s.processes.signals == [(100, signal.SIGKILL)]


def test_status() -> None:
    """The status shows the state, uptime and the task count summed over processes."""
    s = Slot()
    assert s.slot.status(0.0)["state"] == "down"
    s.serve(100)
    s.slot.stats(2, 9.5)
    s.slot.exited(0)
    s.slot.process_reported(101)
    s.slot.stats(1, 8.0)
    assert s.slot.status(2.5) == {
        "index": 3,
        "pid": 101,
        "state": "starting",
        "uptime": 2.5,
        "restarts": 1,
        "recycled": 0,
        "tasks_done": 3,
        "rss_mib": 8.0,
        "busy": 0,
    }
    s.slot.process_serving()
    assert s.slot.status(2.5)["state"] == "serving"


testSuite = pytest_module(__file__)
