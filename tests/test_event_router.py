"""
Unit tests for :mod:`taskoffload.event_router`: each line of a pool's events pipe
goes to the slot it is about, the fork servers or the log; what cannot be routed
is logged and costs nothing else.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskoffload.config import PoolConfig
from taskoffload.event_router import EventRouter
from taskoffload.forkserver_client import ForkServerClient, ForkServerProtocol
from taskoffload.slots import SlotState, WorkerSlot
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl


class Pool:
    """Two slots, a fork-server client and a router, recording what the pool is told."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.told: list[tuple[str, Any]] = []
        processes = FakeProcessControl()
        self.fork_servers = ForkServerClient(PoolConfig(count=2), self.clock, processes, self)
        self.slots = {
            i: WorkerSlot(index=i, clock=self.clock, processes=processes, fork=lambda s: None)
            for i in range(2)
        }
        self.router = EventRouter(lambda: self.slots, self.fork_servers, self)

    def send(self, kind: str, **fields: Any) -> None:
        self.router.line_received(orjson.dumps({"event": kind, **fields}))

    # What the fork servers and the workers tell the pool

    def event_received(self, line: bytes, source: ForkServerProtocol | None = None) -> None:
        self.router.line_received(line, source)

    def raw_output(self, line: bytes) -> None:
        self.told.append(("raw", line))

    def fork_server_ready(self) -> None:
        self.told.append(("ready", None))

    def fork_server_failed(self, text: str) -> None:
        self.told.append(("failed", text))

    def fork_server_lost(self) -> None:
        self.told.append(("lost", None))

    def worker_forked(self, slot: WorkerSlot, pid: int) -> None:
        self.told.append(("forked", (slot.index, pid)))

    def worker_serving(self, slot: WorkerSlot) -> None:
        self.told.append(("serving", slot.index))

    def worker_exited(self, slot: WorkerSlot, code: int | None) -> None:
        self.told.append(("exited", (slot.index, code)))


def test_worker_lives_reach_the_slot_and_the_pool() -> None:
    """forked, serving and exited update the slot, and the pool hears of each."""
    pool = Pool()
    pool.send("forked", index=1, pid=100)
    assert (pool.slots[1].state, pool.slots[1].pid) == (SlotState.STARTING, 100)
    pool.send("serving", index=1, pid=100)
    assert pool.slots[1].state is SlotState.SERVING
    pool.send("exited", index=1, pid=100, code=-9)
    assert pool.told == [("forked", (1, 100)), ("serving", 1), ("exited", (1, -9))]


def test_fork_server_events_go_to_the_fork_servers() -> None:
    """ready and failed are the fork servers' to judge; with no source, the current one's."""
    pool = Pool()
    pool.send("ready", pid=50)
    pool.send("failed", pid=50, text="ImportError")
    pool.send("failed", pid=50)
    assert pool.told == [
        ("ready", None),
        ("failed", "ImportError"),
        ("failed", "(no reason given)"),
    ]


def test_events_about_another_process_are_ignored() -> None:
    """Stats, deadlines, recycling, stops and exits for a pid not in the slot change nothing."""
    pool = Pool()
    pool.send("serving", index=0, pid=100)
    for kind, fields in [
        ("stats", {"tasks_done": 3, "rss_mib": 9.0}),
        ("deadline", {"kill_at": 0.0}),
        ("recycling", {"reason": "ran 3 tasks"}),
        ("stopped", {"tasks_done": 3}),
        ("exited", {"code": 0}),
    ]:
        pool.send(kind, index=0, pid=99, **fields)
    slot = pool.slots[0]
    assert (slot.process_tasks, slot.retiring, slot.pid) == (0, False, 100)
    assert pool.clock.getDelayedCalls() == []
    assert pool.told == [("serving", 0)]


def test_current_process_events_reach_the_slot() -> None:
    """Stats, recycling and the final count of the slot's own process are recorded."""
    pool = Pool()
    pool.send("serving", index=0, pid=100)
    pool.send("stats", index=0, pid=100, tasks_done=3, rss_mib=9.5)
    assert (pool.slots[0].process_tasks, pool.slots[0].rss_mib) == (3, 9.5)
    pool.send("recycling", index=0, pid=100, reason="ran 3 tasks")
    pool.send("stopped", index=0, pid=100, tasks_done=4)
    assert (pool.slots[0].retiring, pool.slots[0].process_tasks) == (True, 4)


@pytest.mark.parametrize(
    "line",
    [
        b'{"event": "forked", "index": 0}',
        b'{"event": "serving", "index": 0, "pid": 1, "colour": "red"}',
        b'{"event": "stats", "index": 0, "pid": 100, "tasks_done": "many"}',
        b'{"event": "serving", "index": 1, "pid": null}',
    ],
    ids=["missing-field", "unknown-field", "garbled-field", "no-pid"],
)
def test_malformed_event_logged_and_the_pipe_survives(line: bytes) -> None:
    """A malformed event of a known kind is logged as a failure; later events still count."""
    pool = Pool()
    pool.send("forked", index=0, pid=100)
    with capturedLogs() as events:
        pool.router.line_received(line)
    [event] = events
    assert event["log_level"] == LogLevel.critical
    assert formatEvent(event).startswith("Bad event from the pool: ")
    assert event["log_failure"] is not None
    pool.send("serving", index=1, pid=101)
    assert pool.slots[1].state is SlotState.SERVING


def test_exit_of_no_process_is_ignored() -> None:
    """An exit naming no pid, for a slot with no process, is about no process: ignored."""
    pool = Pool()
    pool.send("exited", index=0, pid=None, code=0)
    assert pool.told == []
    assert pool.slots[0].state is SlotState.DOWN


def test_unknown_kind_warned_with_the_event() -> None:
    """An event of a kind the schema lacks is warned of, showing the event."""
    pool = Pool()
    with capturedLogs() as events:
        pool.router.line_received(b'{"event": ["teleported"], "index": 0}')
    [event] = events
    assert event["log_level"] == LogLevel.warn
    assert "teleported" in formatEvent(event)


testSuite = pytest_module(__file__)
