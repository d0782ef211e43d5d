"""
Unit tests for :mod:`taskoffload.forkserver_client`: spawning fork servers through a
``FakeProcessControl``, the commands written to them, and what is told of their
readiness, failure and death, on a ``Clock``.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from taskoffload.config import PoolConfig
from taskoffload.forkserver_client import ForkServerClient, ForkServerProtocol
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl, ProcessStringTransport

LISTEN_FD = 99


class Owner:
    """Records what a client tells its pool, and what a fresh fork server's watcher hears."""

    def __init__(self) -> None:
        self.told: list[tuple[str, Any]] = []

    def event_received(self, line: bytes, source: ForkServerProtocol | None = None) -> None:
        self.told.append(("event", line))

    def raw_output(self, line: bytes) -> None:
        self.told.append(("raw", line))

    def fork_server_ready(self) -> None:
        self.told.append(("ready", None))

    def fork_server_failed(self, text: str) -> None:
        self.told.append(("failed", text))

    def fork_server_lost(self) -> None:
        self.told.append(("lost", None))

    def fresh_code_ready(self) -> None:
        self.told.append(("fresh ready", None))

    def fresh_code_failed(self, text: str) -> None:
        self.told.append(("fresh failed", text))

    def fresh_code_exited(self, reason: Failure) -> None:
        self.told.append(("fresh exited", reason.getErrorMessage()))


class Client:
    """A started client with its fake processes, clock and owner."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.processes = FakeProcessControl()
        self.owner = Owner()
        self.config = PoolConfig(count=2)
        self.client = ForkServerClient(self.config, self.clock, self.processes, self.owner)
        self.client.start(LISTEN_FD)

    def transport(self, n: int = -1) -> ProcessStringTransport:
        """The transport of the ``n``-th fork server spawned."""
        return self.processes.spawned[n].transport


def ended(protocol: ForkServerProtocol, code: int = 0) -> None:
    """``protocol``'s fork server exits with ``code``."""
    reason = ProcessDone(0) if code == 0 else ProcessTerminated(code)
    protocol.processEnded(Failure(reason))


def test_start_spawns_with_the_socket_and_a_lifeline() -> None:
    """The first fork server gets the listening socket, a lifeline pipe and the config line."""
    c = Client()
    [spawned] = c.processes.spawned
    assert spawned.protocol is c.client.current
    assert (spawned.listen_fd, spawned.lifeline_was_pipe) == (LISTEN_FD, True)
    assert spawned.transport.value() == c.config.to_json()
    ended(c.client.current)


def test_processEnded_closes_the_lifeline() -> None:
    """A fork server's end closes the supervisor's end of its lifeline and fires ``ended``."""
    c = Client()
    protocol = c.client.current
    assert protocol is not None and protocol.lifeline is not None
    lifeline = protocol.lifeline
    os.fstat(lifeline)
    c.client.stop()
    ended(protocol)
    assert protocol.lifeline is None and protocol.ended.called
    with pytest.raises(OSError):
        os.fstat(lifeline)


def test_fork_writes_a_command_to_the_current_fork_server() -> None:
    """Each fork is one JSON command line to the current fork server."""
    c = Client()
    c.transport().clear()
    c.client.fork(0)
    c.client.fork(1)
    lines = c.transport().value().splitlines()
    assert [orjson.loads(line) for line in lines] == [
        {"cmd": "fork", "index": 0},
        {"cmd": "fork", "index": 1},
    ]
    ended(c.client.current)


def test_fork_without_a_fork_server_does_nothing() -> None:
    """A fork asked for while there is no current fork server is dropped."""
    c = Client()
    c.client.stop()
    ended(c.client.current)
    c.client.fork(0)
    assert c.client.current is None


def test_lines_go_to_the_owner() -> None:
    """Event lines (fd 1) go to the owner whole; standard error (fd 2) as raw lines."""
    c = Client()
    protocol = c.client.current
    protocol.childDataReceived(1, b'{"event":"ready"')
    protocol.childDataReceived(1, b',"pid":5}\n')
    protocol.childDataReceived(2, b"oops\n\n")
    assert c.owner.told == [("event", b'{"event":"ready","pid":5}'), ("raw", b"oops")]
    ended(protocol)


def test_ready_and_failed_of_the_current_fork_server() -> None:
    """The current fork server's readiness and failure go to the owner."""
    c = Client()
    c.client.ready(c.client.current)
    c.client.failed(c.client.current, "ImportError")
    assert c.owner.told == [("ready", None), ("failed", "ImportError")]
    ended(c.client.current)


def test_unasked_death_is_restarted_with_backoff() -> None:
    """A fork server that dies young is restarted after 1 s, then 2 s; workers are lost."""
    c = Client()
    for attempt, delay in enumerate([1.0, 2.0], start=2):
        with capturedLogs() as events:
            ended(c.client.current, code=1)
        assert c.owner.told[-1] == ("lost", None)
        assert f"restarting the pool in {delay} s" in formatEvent(events[0])
        c.clock.advance(delay - 1 / 64)
        assert len(c.processes.spawned) == attempt - 1
        c.clock.advance(1 / 64)
        assert len(c.processes.spawned) == attempt
    ended(c.client.current)


def test_a_stable_fork_server_is_restarted_at_once() -> None:
    """A fork server that ran 5 s or more is restarted with no delay."""
    c = Client()
    c.clock.advance(5.0)
    ended(c.client.current, code=1)
    c.clock.advance(0)
    assert len(c.processes.spawned) == 2
    ended(c.client.current)


def test_no_restart_once_stopped() -> None:
    """A fork server that exits after stop() is not restarted, and stop() cancels a restart."""
    c = Client()
    ended(c.client.current, code=1)
    c.client.stop()
    assert c.clock.getDelayedCalls() == []
    c.client.start(LISTEN_FD)
    c.client.stop()
    ended(c.client.current)
    assert c.clock.getDelayedCalls() == []
    assert len(c.processes.spawned) == 2


def test_fresh_fork_server_becomes_current_once_ready() -> None:
    """A reload's fork server replaces the current one when ready; the old one is kept."""
    c = Client()
    first = c.client.current
    c.client.spawn(fresh=c.owner)
    fresh = c.client.fresh
    assert fresh is not None and c.client.current is first
    c.client.ready(fresh)
    assert (c.client.current, c.client.fresh, c.client.old) == (fresh, None, [first])
    assert c.owner.told == [("fresh ready", None)]
    c.client.retire_old()
    assert c.transport(0).stdin_closed and not c.transport(1).stdin_closed
    ended(first)
    assert c.client.old == []
    assert c.owner.told == [("fresh ready", None)]
    ended(fresh)


def test_fresh_fork_server_failing_or_exiting_leaves_the_current_one() -> None:
    """A reload's fork server that fails, or exits, is told to its watcher; nothing else changes."""
    c = Client()
    first = c.client.current
    c.client.spawn(fresh=c.owner)
    c.client.failed(c.client.fresh, "SyntaxError")
    c.client.spawn(fresh=c.owner)
    ended(c.client.fresh, code=3)
    [failed, (exited, reason)] = c.owner.told
    assert failed == ("fresh failed", "SyntaxError")
    assert exited == "fresh exited" and "exit code 3" in reason
    assert (c.client.current, c.client.fresh) == (first, None)
    ended(c.processes.spawned[1].protocol)
    ended(first)


def test_close_waits_for_each_fork_server() -> None:
    """Closing closes each fork server's input and finishes once they have exited."""
    c = Client()
    done: list[object] = []
    c.client.stop()
    ensureDeferred(c.client.close()).addBoth(done.append)
    assert c.transport().stdin_closed and done == []
    ended(c.client.current)
    assert done == [None]


def test_close_kills_a_fork_server_that_does_not_exit() -> None:
    """A fork server still running 5 s after its input closed is killed."""
    c = Client()
    done: list[object] = []
    c.client.stop()
    ensureDeferred(c.client.close()).addBoth(done.append)
    c.clock.advance(5.0)
    assert c.transport().signals == ["KILL"]
    assert done == [None]
    assert c.client.current is not None and c.client.current.lifeline is None


testSuite = pytest_module(__file__)
