"""
Unit tests for :mod:`taskoffload.reload`: a rolling reload over worker slots, with
fork servers spawned through a ``FakeProcessControl`` on a ``Clock``.
"""

from __future__ import annotations

import signal

import orjson
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from taskoffload.config import PoolConfig
from taskoffload.forkserver_client import ForkServerClient, ForkServerProtocol
from taskoffload.reload import RollingReload
from taskoffload.slots import WorkerSlot
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl


class Owner:
    """A pool that ignores what the fork servers tell it."""

    def event_received(self, line: bytes, source: ForkServerProtocol | None = None) -> None:
        pass

    def raw_output(self, line: bytes) -> None:
        pass

    def fork_server_ready(self) -> None:
        pass

    def fork_server_failed(self, text: str) -> None:
        pass

    def fork_server_lost(self) -> None:
        pass


class Pool:
    """``count`` serving slots, a current fork server and a reload over them."""

    def __init__(self, count: int = 3) -> None:
        self.clock = Clock()
        self.processes = FakeProcessControl()
        self.fork_servers = ForkServerClient(
            PoolConfig(count=count), self.clock, self.processes, Owner()
        )
        self.fork_servers.start(99)
        self.slots = {
            i: WorkerSlot(index=i, clock=self.clock, processes=self.processes, fork=self.fork)
            for i in range(count)
        }
        for slot in self.slots.values():
            slot.process_reported(100 + slot.index)
            slot.process_serving()
        self.reload = RollingReload(lambda: self.slots, self.fork_servers, self.fork, self.clock)

    def fork(self, slot: WorkerSlot) -> None:
        self.fork_servers.fork(slot.index)

    def forks(self, n: int) -> list[int]:
        """The slot of each fork command the ``n``-th fork server spawned was sent."""
        lines = self.processes.spawned[n].transport.value().splitlines()[1:]
        return [orjson.loads(line)["index"] for line in lines]

    def replaced(self, index: int, pid: int) -> None:
        """Slot ``index``'s process exits and ``pid`` replaces it, serving."""
        slot = self.slots[index]
        slot.exited(0)
        slot.process_reported(pid)
        slot.process_serving()
        self.reload.slot_serving(slot)

    def close(self) -> None:
        """End every fork server, closing their lifelines."""
        self.fork_servers.stop()
        for spawned in self.processes.spawned:
            if not spawned.protocol.ended.called:
                spawned.protocol.processEnded(Failure(ProcessTerminated(0)))


def test_start_spawns_a_fresh_fork_server() -> None:
    """A reload starts a fresh fork server and is under way; the workers are untouched."""
    pool = Pool()
    pool.reload.start()
    assert pool.fork_servers.fresh is pool.processes.spawned[1].protocol
    assert pool.reload.under_way
    assert pool.processes.signals == []
    pool.close()


def test_a_second_reload_is_ignored() -> None:
    """A reload asked for while one is under way is logged and ignored."""
    pool = Pool()
    pool.reload.start()
    with capturedLogs() as events:
        pool.reload.start()
    assert [formatEvent(e) for e in events] == ["A reload is already under way"]
    assert len(pool.processes.spawned) == 2
    pool.close()


def test_slots_are_replaced_one_at_a_time_from_the_fresh_fork_server() -> None:
    """Once the fresh fork server is ready, each slot is retired after the one before serves."""
    pool = Pool(count=2)
    pool.reload.start()
    pool.fork_servers.ready(pool.fork_servers.fresh)
    assert pool.processes.signals == [(100, signal.SIGTERM)]
    pool.replaced(0, 200)
    assert pool.processes.signals == [(100, signal.SIGTERM), (101, signal.SIGTERM)]
    assert pool.forks(1) == [0]
    with capturedLogs() as events:
        pool.replaced(1, 201)
    assert pool.forks(1) == [0, 1]
    assert pool.forks(0) == []
    assert (pool.reload.completed, pool.reload.under_way) == (1, False)
    assert pool.processes.spawned[0].transport.stdin_closed
    assert formatEvent(events[-1]).startswith("Reload complete: 2 workers replaced in")
    assert [s.recycled for s in pool.slots.values()] == [1, 1]
    pool.close()


def test_a_slot_that_is_down_is_forked_with_the_new_code() -> None:
    """A slot with no process when its turn comes is forked from the fresh fork server."""
    pool = Pool(count=1)
    pool.slots[0].exited(0, restart=False)
    pool.reload.start()
    pool.fork_servers.ready(pool.fork_servers.fresh)
    assert pool.processes.signals == []
    assert pool.forks(1) == [0]
    pool.close()


def test_a_failed_fresh_fork_server_aborts_the_reload() -> None:
    """New code that fails to import aborts the reload: an error, and the workers stay."""
    pool = Pool()
    pool.reload.start()
    with capturedLogs() as events:
        pool.fork_servers.failed(pool.fork_servers.fresh, "SyntaxError")
    [event] = events
    assert event["log_level"] == LogLevel.error
    assert formatEvent(event) == "Reload aborted, the workers keep the old code: SyntaxError"
    assert not pool.reload.under_way
    assert pool.processes.signals == []
    pool.close()


def test_a_fresh_fork_server_that_exits_aborts_the_reload() -> None:
    """A fresh fork server that exits before it is ready aborts the reload."""
    pool = Pool()
    pool.reload.start()
    # The reload started a second fork server, and that is the one that exits.
    [_, spawned] = pool.processes.spawned
    fresh = pool.fork_servers.fresh
    assert fresh is spawned.protocol
    with capturedLogs() as events:
        fresh.processEnded(Failure(ProcessTerminated(1)))
    assert formatEvent(events[0]).startswith("Reload aborted: the new fork server exited")
    assert not pool.reload.under_way
    pool.reload.slot_serving(pool.slots[0])
    assert pool.processes.signals == []
    pool.close()


testSuite = pytest_module(__file__)
