"""
Unit tests for :mod:`taskoffload.agent`, the pool's answer to HAProxy's agent
check: the line for each state of a pool (its slots set up by hand on a
``Clock``), the protocol on a ``StringTransport``, the service on a
``MemoryReactorClock``; and what feeds it: the ``busy`` count of the ``Stats``
event, of the worker slot and of the pool's status, the pool's ``draining``, and
``--agent-listen`` in :mod:`taskoffload.tap`.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage

from taskoffload import events, tap
from taskoffload.agent import (
    FULL_POOL_WEIGHT,
    STOP_MARGIN,
    AgentFactory,
    AgentService,
    agent_line,
    free_slots,
    pool_line,
)
from taskoffload.config import PoolConfig
from taskoffload.forkserver_client import ForkServerProtocol
from taskoffload.lanes import Lane
from taskoffload.slots import WorkerSlot
from taskoffload.supervisor import WorkerPoolService
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl, ProcessStringTransport


class FakePool:
    """
    What the agent reads of a pool: ``count`` worker slots, serving with pids
    100, 101..., on a ``Clock``; ``draining`` set by hand.
    """

    def __init__(
        self,
        count: int = 2,
        concurrency: int = 1,
        stop_timeout: float = 10.0,
        lanes: tuple[Lane, ...] = (),
    ) -> None:
        self.config = PoolConfig(
            count=count, concurrency=concurrency, stop_timeout=stop_timeout, lanes=lanes
        )
        self.clock = Clock()
        processes = FakeProcessControl()
        self.workers = {
            i: WorkerSlot(index=i, clock=self.clock, processes=processes, fork=lambda slot: None)
            for i in range(count)
        }
        for slot in self.workers.values():
            slot.process_reported(100 + slot.index)
            slot.process_serving()
        self.draining = False
        self.exited: Deferred[None] = Deferred()

    def wait_for_exit(self) -> Deferred[None]:
        return self.exited

    def busy(self, *counts: int) -> None:
        """Each slot's process reports that many of its task slots taken."""
        for slot, busy in zip(self.workers.values(), counts, strict=True):
            slot.stats(0, 10.0, busy)


def check(pool: FakePool) -> StringTransport:
    """One agent check on ``pool``: :return: the transport it wrote to."""
    protocol = AgentFactory(lambda: pool_line(pool)).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return transport


# The line


def test_an_idle_pool_answers_its_full_weight() -> None:
    """Every worker serving, none busy: ``up ready 100%``, one line, and the close."""
    transport = check(FakePool(count=2))
    assert transport.value() == b"up ready 100%\n"
    assert transport.disconnecting


def test_the_weight_is_the_share_of_free_task_slots() -> None:
    """100 task slots (4 workers x 25), 63 taken: ``up ready 37%``."""
    pool = FakePool(count=4, concurrency=25)
    pool.busy(25, 20, 18, 0)
    transport = check(pool)
    assert transport.value() == b"up ready 37%\n"
    assert transport.disconnecting


def test_only_the_default_lanes_slots_count() -> None:
    """A pool of 4 with lane interactive=2: the balancer's connections go to the
    default lane's 2 workers, so the weight is their free share only; the lane's
    busy workers do not lower it, and its idle ones do not raise it."""
    pool = FakePool(count=4, lanes=(Lane("interactive", 2),))
    pool.busy(1, 0, 1, 1)
    assert check(pool).value() == b"up ready 50%\n"
    pool.busy(1, 1, 0, 0)
    assert check(pool).value() == b"up ready 1%\n"


def test_a_fully_busy_pool_answers_the_floor_not_zero() -> None:
    """No task slot free: ``up ready 1%``, so HAProxy keeps the pool in its farm."""
    pool = FakePool(count=2, concurrency=3)
    pool.busy(3, 3)
    assert FULL_POOL_WEIGHT == 1
    assert check(pool).value() == b"up ready 1%\n"


def test_a_share_below_one_percent_answers_the_floor() -> None:
    """1 free slot of 300 rounds down to 0%: the floor, 1%, is answered."""
    assert agent_line(False, 1, 300) == b"up ready 1%\n"
    assert agent_line(False, 299, 300) == b"up ready 99%\n"


def test_a_draining_pool_answers_drain() -> None:
    """A stopping or reloading pool answers ``drain``, however idle, and closes."""
    pool = FakePool(count=2)
    pool.draining = True
    transport = check(pool)
    assert transport.value() == b"drain\n"
    assert transport.disconnecting


def test_the_line_is_read_at_each_check() -> None:
    """The same factory answers each check with the pool as it is then."""
    pool = FakePool(count=2)
    factory = AgentFactory(lambda: pool_line(pool))
    answers = []
    for busy in [(0, 0), (1, 0), (1, 1)]:
        pool.busy(*busy)
        transport = StringTransport()
        factory.buildProtocol(None).makeConnection(transport)
        answers.append(transport.value())
    assert answers == [b"up ready 100%\n", b"up ready 50%\n", b"up ready 1%\n"]


def test_only_serving_workers_that_stay_have_free_slots() -> None:
    """A starting worker, one about to exit and a dead one free no slot; a worker
    reporting more than its concurrency frees none, and takes none from others."""
    pool = FakePool(count=5, concurrency=2)
    slots = list(pool.workers.values())
    slots[0].process_reported(200)  # a new process, not serving yet
    slots[1].retire()  # told to stop: it takes no new connection
    slots[2].exited(0, restart=False)
    slots[3].stats(0, 1.0, 5)
    assert free_slots(slots, 2) == 2  # slot 4's
    assert pool_line(pool) == b"up ready 20%\n"


# The service


def test_service_binds_in_privileged_start() -> None:
    """The port is bound in ``privilegedStartService`` (``twistd --uid``), with the
    agent's factory answering about the pool."""
    reactor = MemoryReactorClock()
    pool = FakePool(count=2)
    service = AgentService("tcp:9091:interface=127.0.0.1", pool, reactor=reactor)
    with capturedLogs() as logged:
        service.privilegedStartService()
    [(port, factory, _, interface)] = reactor.tcpServers
    assert (port, interface) == (9091, "127.0.0.1")
    transport = StringTransport()
    factory.buildProtocol(None).makeConnection(transport)
    assert transport.value() == b"up ready 100%\n"
    assert service.port is not None
    assert any("HAProxy agent on" in formatEvent(e) for e in logged)


def test_stop_answers_on_until_the_workers_exit() -> None:
    """At stop the port stays open (the pool says ``drain`` meanwhile) until the
    pool's workers have exited, then closes."""
    reactor = MemoryReactorClock()
    pool = FakePool(count=1)
    service = AgentService("tcp:9091", pool, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    closed: list[bool] = []
    assert service.port is not None
    service.port.stopListening = lambda: closed.append(True)  # type: ignore[method-assign]  # a recorder
    stopped = service.stopService()
    reactor.advance(5)
    assert closed == [] and not stopped.called
    pool.exited.callback(None)
    assert closed == [True] and stopped.called
    assert service.port is None


def test_stop_closes_the_port_when_workers_outlive_the_stop_timeout() -> None:
    """Workers that never exit keep the port open no longer than ``--stop-timeout``
    plus the margin; that is logged."""
    reactor = MemoryReactorClock()
    pool = FakePool(count=1, stop_timeout=10.0)
    service = AgentService("tcp:9091", pool, reactor=reactor)
    service.privilegedStartService()
    service.startService()
    closed: list[bool] = []
    assert service.port is not None
    service.port.stopListening = lambda: closed.append(True)  # type: ignore[method-assign]  # a recorder
    with capturedLogs() as logged:
        stopped = service.stopService()
        reactor.advance(10.0 + STOP_MARGIN - 0.5)
        assert closed == []
        reactor.advance(0.5)
    assert closed == [True] and stopped.called
    assert any("stops answering" in formatEvent(e) for e in logged)


class RefusingReactor(MemoryReactorClock):
    """A reactor on which every port is taken."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError("address in use"))


def test_a_port_it_cannot_bind_is_logged_and_stops_the_reactor() -> None:
    """A pool asked to answer agent checks does not run unseen: a port that cannot be
    bound is logged, and the reactor stops once it runs (at once if it does)."""
    reactor = RefusingReactor()
    service = AgentService("tcp:9091", FakePool(), reactor=reactor)
    with capturedLogs() as logged:
        service.privilegedStartService()
    assert service.port is None
    assert "The pool cannot answer agent checks on tcp:9091" in [formatEvent(e) for e in logged]
    assert [hook for hook, _, _ in reactor.whenRunningHooks] == [reactor.stop]
    running = RefusingReactor()
    running.running = True
    with capturedLogs():
        AgentService("tcp:9091", FakePool(), reactor=running).privilegedStartService()
    assert running.hasStopped


# What feeds it: the Stats event, the slot, the pool


def test_stats_carry_busy_through_the_pipe() -> None:
    """``busy`` survives encoding and decoding; a line without it (an older
    worker's) reads as 0."""
    event = events.Stats(index=1, pid=7, tasks_done=4, rss_mib=12.5, busy=3)
    assert orjson.loads(events.encode(event))["busy"] == 3
    assert events.decode(events.encode(event)) == event
    old = b'{"event":"stats","index":1,"pid":7,"tasks_done":4,"rss_mib":12.5}\n'
    decoded = events.decode(old)
    assert isinstance(decoded, events.Stats) and decoded.busy == 0


class Pool:
    """A ``WorkerPoolService`` with ``count`` slots, fed event lines by hand."""

    def __init__(self, count: int = 2) -> None:
        self.processes = FakeProcessControl()
        self.service = WorkerPoolService(
            PoolConfig(count=count), reactor=MemoryReactorClock(), processes=self.processes
        )
        self.service.workers = self.service._new_slots()
        fork_server = ForkServerProtocol(self.service._fork_servers)
        fork_server.transport = ProcessStringTransport()
        self.service._fork_servers.current = fork_server

    def event(self, kind: str, **fields: Any) -> None:
        self.service.event_received(orjson.dumps({"event": kind, **fields}))


def test_busy_reaches_the_slot_the_status_and_the_agent() -> None:
    """A worker's reported ``busy`` is its slot's, shown per worker and summed in the
    pool's status, and the agent answers from it; a process that exits takes its
    count with it."""
    pool = Pool(count=2)
    for index, pid in [(0, 100), (1, 101)]:
        pool.event("forked", index=index, pid=pid)
        pool.event("serving", index=index, pid=pid)
    pool.event("stats", index=0, pid=100, tasks_done=5, rss_mib=10.0, busy=1)
    assert pool.service.workers[0].busy == 1
    status = pool.service.status()
    assert [w["busy"] for w in status["workers"]] == [1, 0]
    assert status["busy"] == 1
    assert pool_line(pool.service) == b"up ready 50%\n"
    pool.event("stats", index=1, pid=101, tasks_done=0, rss_mib=10.0, busy=1)
    assert pool.service.status()["busy"] == 2
    assert pool_line(pool.service) == b"up ready 1%\n"
    pool.event("exited", index=1, pid=101, code=0)
    assert pool.service.workers[1].busy == 0
    assert pool.service.status()["busy"] == 1


def test_a_stale_processs_busy_is_ignored() -> None:
    """Stats from a process no longer in the slot do not set its busy count."""
    pool = Pool(count=1)
    pool.event("forked", index=0, pid=100)
    pool.event("serving", index=0, pid=100)
    pool.event("stats", index=0, pid=99, tasks_done=0, rss_mib=1.0, busy=1)
    assert pool.service.workers[0].busy == 0


def test_the_pool_drains_while_it_stops() -> None:
    """``draining`` is false while the pool serves, true once it stops."""
    pool = Pool(count=1)
    pool.event("forked", index=0, pid=100)
    pool.event("serving", index=0, pid=100)
    assert not pool.service.draining
    pool.service.stopService()
    assert pool.service.draining
    assert pool_line(pool.service) == b"drain\n"


def test_the_pool_drains_while_a_reload_is_under_way() -> None:
    """``draining`` is true from a reload's start until it is aborted (or completes)."""
    pool = Pool(count=1)
    pool.event("forked", index=0, pid=100)
    pool.event("serving", index=0, pid=100)
    pool.service._fork_servers.start(99)  # a current fork server, spawned (as a fake)
    pool.service._reload.start()
    assert pool.service.draining
    assert pool_line(pool.service) == b"drain\n"
    fresh = pool.processes.spawned[-1].protocol
    assert isinstance(fresh, ForkServerProtocol)
    # The fresh fork server cannot import the task modules: the reload is aborted.
    pool.service.event_received(orjson.dumps({"event": "failed", "pid": 51, "text": "boom"}), fresh)
    assert not pool.service.draining
    assert pool_line(pool.service) == b"up ready 100%\n"
    for spawned in pool.processes.spawned:
        assert isinstance(spawned.protocol, ForkServerProtocol)
        spawned.protocol.close_lifeline()


# --agent-listen


def parse(*args: str) -> tap.Options:
    """Options parsed from ``args``, as twistd would."""
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_agent_listen_is_refused_for_the_gateway() -> None:
    """A gateway runs no pool, so it has no free slots to report."""
    with pytest.raises(usage.UsageError, match="--agent-listen is for --role=worker or all"):
        parse("--role=gateway", "--agent-listen=tcp:9091")


@pytest.mark.parametrize(
    "listen", ["9091", "unix:/run/agent.sock", "ssl:9091", "tcp:http", "tcp:9091:colour=red"]
)
def test_agent_listen_that_is_no_tcp_endpoint_is_refused(listen: str) -> None:
    """HAProxy's agent check connects over TCP: anything else is refused, with an example."""
    with pytest.raises(usage.UsageError, match=r"expected a TCP endpoint such as tcp:9091"):
        parse("--role=worker", f"--agent-listen={listen}")


@pytest.mark.parametrize("role", ["worker", "all"])
def test_agent_listen_runs_the_agent_on_the_pool(role: str) -> None:
    """Roles worker and all run the agent beside their pool, answering about it."""
    top = tap.makeService(parse(f"--role={role}", "--count=2", "--agent-listen=tcp6:9091"))
    [pool] = [s for s in top if isinstance(s, WorkerPoolService)]
    [agent] = [s for s in top if isinstance(s, AgentService)]
    assert agent.listen == "tcp6:9091"
    assert agent.pool is pool


def test_no_agent_without_the_option() -> None:
    """Without ``--agent-listen`` no agent runs."""
    for role in ("worker", "all"):
        assert not [
            s for s in tap.makeService(parse(f"--role={role}")) if isinstance(s, AgentService)
        ]


testSuite = pytest_module(__file__)
