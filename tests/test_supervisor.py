"""
Unit tests for :mod:`taskoffload.supervisor`, without spawning anything: the
service runs on a ``MemoryReactorClock``, its worker slots are set up by hand, a
fork-server protocol on a ``StringTransport`` stands in for the fork server, and a
``FakeProcessControl`` records the signals sent.  The tests feed it the fork
server's event lines and read back the commands it writes.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from taskoffload import slots
from taskoffload.forkserver_client import ForkServerProtocol
from taskoffload.slots import MAX_RESTART_DELAY
from taskoffload.sockets import _with_backlog
from taskoffload.supervisor import PoolConfig, WorkerPoolService
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl, ProcessStringTransport

#: A moment, exact in binary floating point so that clock sums stay exact.
EPSILON = 1 / 64
#: The stand-in fork server's pid, in the events it sends about itself.
FORK_SERVER_PID = 50


class Pool:
    """A worker pool service with ``count`` slots and a stand-in fork server."""

    def __init__(self, count: int = 2, **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        #: The signals the supervisor sends, recorded instead of sent.
        self.processes = FakeProcessControl()
        self.service = WorkerPoolService(
            PoolConfig(count=count, **config), reactor=self.reactor, processes=self.processes
        )
        self.service.workers = self.service._new_slots()
        self.fork_server = ForkServerProtocol(self.service._fork_servers)
        self.transport = ProcessStringTransport()
        self.fork_server.transport = self.transport
        self.service._fork_servers.current = self.fork_server

    def event(self, kind: str, **fields: Any) -> None:
        """The fork server (or a worker) reports one event."""
        self.service.event_received(orjson.dumps({"event": kind, **fields}))

    def start_worker(self, index: int, pid: int) -> None:
        """Worker ``index`` is forked as ``pid`` and serves."""
        self.event("forked", index=index, pid=pid)
        self.event("serving", index=index, pid=pid)

    def forks(self) -> list[int]:
        """The slot of every fork command written to the fork server so far, in order."""
        commands = [orjson.loads(line) for line in self.transport.value().splitlines()]
        assert all(c["cmd"] == "fork" for c in commands), commands
        return [c["index"] for c in commands]

    def status(self) -> dict[str, Any]:
        return self.service.status()


def outcome(d: Deferred[Any]) -> list[Any]:
    """A list that receives what ``d`` fires with."""
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def texts(events: list[LogEvent]) -> list[str]:
    """The formatted text of captured log events."""
    return [formatEvent(e) for e in events]


# Starting


def test_ready_forks_every_worker() -> None:
    """When the fork server is ready, one fork command is written per worker slot."""
    pool = Pool(count=3)
    pool.event("ready", pid=FORK_SERVER_PID)
    assert pool.forks() == [0, 1, 2]


def test_all_serving() -> None:
    """wait_until_serving() fires, with seconds since start, once all workers serve."""
    pool = Pool(count=2)
    serving = outcome(pool.service.wait_until_serving())
    pool.reactor.advance(0.25)
    pool.start_worker(0, 100)
    assert serving == []
    assert pool.status()["serving"] == 1
    pool.event("forked", index=1, pid=101)
    assert serving == []
    assert [w["state"] for w in pool.status()["workers"]] == ["serving", "starting"]
    pool.event("serving", index=1, pid=101)
    assert serving == [0.25]
    status = pool.status()
    assert (status["count"], status["alive"], status["serving"]) == (2, 2, 2)
    assert [w["pid"] for w in status["workers"]] == [100, 101]


def test_wait_until_serving_after_the_fact() -> None:
    """``wait_until_serving()`` called once every worker serves fires at once."""
    pool = Pool(count=1)
    pool.reactor.advance(0.5)
    pool.start_worker(0, 100)
    assert outcome(pool.service.wait_until_serving()) == [0.5]


def test_serving_before_forked() -> None:
    """A "serving" event that overtakes its "forked" counts; the late "forked" is a no-op."""
    pool = Pool(count=1)
    serving = outcome(pool.service.wait_until_serving())
    pool.event("serving", index=0, pid=100)
    assert serving == [0.0]
    pool.event("forked", index=0, pid=100)
    [worker] = pool.status()["workers"]
    assert (worker["pid"], worker["state"]) == (100, "serving")


def test_unknown_slot_ignored() -> None:
    """Events for a slot the pool does not have change nothing."""
    pool = Pool(count=1)
    pool.event("forked", index=7, pid=100)
    pool.event("serving", index=7, pid=100)
    pool.event("exited", index=7, pid=100, code=0)
    pool.event("exited", index=None, pid=100, code=0)
    assert pool.status()["alive"] == 0
    assert pool.forks() == []


def test_failed_logged() -> None:
    """A fork server that cannot start is logged as an error with its reason."""
    pool = Pool()
    with capturedLogs() as events:
        pool.event("failed", pid=FORK_SERVER_PID, text="ImportError: No module named 'mytasks'")
    [event] = events
    assert event["log_level"] == LogLevel.error
    assert "No module named 'mytasks'" in formatEvent(event)


# Restarting


def test_stable_worker_restarted_at_once() -> None:
    """A worker that exits after running a second or more is re-forked at once."""
    pool = Pool(count=2)
    pool.start_worker(0, 100)
    pool.start_worker(1, 101)
    pool.reactor.advance(1.0)
    with capturedLogs() as events:
        pool.event("exited", index=1, pid=101, code=-9)
    assert pool.forks() == [1]
    assert pool.status()["restarts"] == 1
    assert pool.status()["workers"][1]["state"] == "down"
    assert any("Worker 1 (pid 101) exited with -9" in t for t in texts(events))


def crash(pool: Pool, pid: int, runs: float = 0.25) -> None:
    """Worker 0 is forked as ``pid`` and exits ``runs`` seconds later."""
    pool.event("forked", index=0, pid=pid)
    pool.reactor.advance(runs)
    pool.event("exited", index=0, pid=pid, code=1)


def test_crash_loop_backs_off() -> None:
    """A worker exiting within 1 s is re-forked after 0.5, 1, 2 ... s, capped at 30 s."""
    pool = Pool(count=1)
    expected = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_RESTART_DELAY, MAX_RESTART_DELAY]
    assert MAX_RESTART_DELAY == 30.0
    for attempt, delay in enumerate(expected, start=1):
        crash(pool, pid=100 + attempt)
        pool.reactor.advance(delay - EPSILON)
        assert len(pool.forks()) == attempt - 1, f"re-forked before {delay} s"
        pool.reactor.advance(EPSILON)
        assert len(pool.forks()) == attempt, f"not re-forked after {delay} s"
    assert pool.status()["restarts"] == len(expected)


def test_stable_run_resets_backoff() -> None:
    """After a worker has run for a second or more, its next crash waits 0.5 s again."""
    pool = Pool(count=1)
    crash(pool, pid=101)
    pool.reactor.advance(0.5)
    crash(pool, pid=102)
    pool.reactor.advance(1.0)
    assert len(pool.forks()) == 2
    crash(pool, pid=103, runs=5.0)
    assert len(pool.forks()) == 3
    crash(pool, pid=104)
    pool.reactor.advance(0.5 - EPSILON)
    assert len(pool.forks()) == 3
    pool.reactor.advance(EPSILON)
    assert len(pool.forks()) == 4


def test_young_worker_that_served_is_restarted_at_once() -> None:
    """A worker SIGKILLed 0.1 s after it began serving (and ran a task) is re-forked
    with no delay, every time."""
    pool = Pool(count=1)
    for n in range(4):
        pid = 500 + n
        pool.start_worker(0, pid)
        pool.event("stats", index=0, pid=pid, tasks_done=1, rss_mib=10.0)
        pool.reactor.advance(0.1)
        with capturedLogs() as events:
            pool.event("exited", index=0, pid=pid, code=-9)
        assert pool.forks() == [0] * (n + 1), f"kill {n + 1} was not re-forked at once"
        assert pool.reactor.getDelayedCalls() == []
        assert any(t.endswith("restarting in 0.0 s") for t in texts(events)), texts(events)
    assert pool.status()["restarts"] == 4


def test_young_worker_that_served_after_crashes_is_restarted_at_once() -> None:
    """Serving clears a crash loop's backoff: the next young death is re-forked at once."""
    pool = Pool(count=1)
    crash(pool, pid=101)
    pool.reactor.advance(0.5)
    crash(pool, pid=102)
    pool.reactor.advance(1.0)
    assert len(pool.forks()) == 2
    pool.start_worker(0, 103)
    pool.reactor.advance(0.1)
    pool.event("exited", index=0, pid=103, code=-9)
    assert len(pool.forks()) == 3
    assert pool.reactor.getDelayedCalls() == []
    crash(pool, pid=104)
    pool.reactor.advance(0.5 - EPSILON)
    assert len(pool.forks()) == 3
    pool.reactor.advance(EPSILON)
    assert len(pool.forks()) == 4


def test_young_worker_that_never_served_is_backed_off() -> None:
    """A worker that dies just under STABLE_SECONDS after its fork without serving waits
    0.5 s, then 1 s."""
    pool = Pool(count=1)
    for attempt, delay in enumerate([0.5, 1.0], start=1):
        crash(pool, pid=600 + attempt, runs=slots.STABLE_SECONDS - EPSILON)
        assert len(pool.forks()) == attempt - 1
        assert [c.getTime() for c in pool.reactor.getDelayedCalls()] == [
            pool.reactor.seconds() + delay
        ]
        pool.reactor.advance(delay)
        assert len(pool.forks()) == attempt


def test_worker_that_ran_exactly_a_second_is_restarted_at_once() -> None:
    """A worker that dies STABLE_SECONDS after its fork, never having served, is no crash loop."""
    pool = Pool(count=1)
    crash(pool, pid=101, runs=slots.STABLE_SECONDS)
    assert pool.forks() == [0]
    assert pool.reactor.getDelayedCalls() == []


def test_replacement_of_a_recycled_worker_is_backed_off_when_it_crash_loops() -> None:
    """After a recycle, a replacement that dies young without serving waits 0.5 s, then 1 s."""
    pool = Pool(count=1)
    crash(pool, pid=101)
    pool.reactor.advance(0.5)
    pool.start_worker(0, 102)
    pool.event("recycling", index=0, pid=102, reason="ran 3 tasks")
    pool.event("exited", index=0, pid=102, code=0)
    assert len(pool.forks()) == 2
    for attempt, delay in enumerate([0.5, 1.0], start=3):
        crash(pool, pid=100 + attempt)
        pool.reactor.advance(delay - EPSILON)
        assert len(pool.forks()) == attempt - 1, f"re-forked before {delay} s"
        pool.reactor.advance(EPSILON)
        assert len(pool.forks()) == attempt, f"not re-forked after {delay} s"
    assert (pool.status()["restarts"], pool.status()["recycled"]) == (3, 1)


def test_restart_due_while_the_fork_server_is_away_happens_when_it_is_ready() -> None:
    """A backed-off restart that comes due with no fork server is made once one is ready."""
    pool = Pool(count=1)
    crash(pool, pid=101)
    pool.service._fork_servers.current = None
    with capturedLogs() as events:
        pool.reactor.advance(0.5)
    assert not [e for e in events if e.get("log_failure") is not None]
    assert pool.forks() == []
    pool.service._fork_servers.current = pool.fork_server
    pool.event("ready", pid=FORK_SERVER_PID)
    assert pool.forks() == [0]


def test_slot_task_count_adds_up_over_several_processes() -> None:
    """A slot's tasks_done sums its processes' final counts; a down slot shows no memory."""
    pool = Pool(count=1)
    for n, done in enumerate([3, 4, 5]):
        pid = 700 + n
        pool.start_worker(0, pid)
        pool.event("stats", index=0, pid=pid, tasks_done=done - 1, rss_mib=12.0)
        pool.reactor.advance(2.0)
        pool.event("stopped", index=0, pid=pid, tasks_done=done)
        pool.event("exited", index=0, pid=pid, code=0)
    [worker] = pool.status()["workers"]
    assert (worker["state"], worker["tasks_done"], worker["rss_mib"]) == ("down", 12, None)


def test_stale_exit_ignored() -> None:
    """An exit reported for a pid no longer in the slot changes nothing."""
    pool = Pool(count=1)
    pool.start_worker(0, 100)
    pool.event("exited", index=0, pid=99, code=0)
    assert pool.forks() == []
    assert pool.status()["workers"][0]["state"] == "serving"


def test_restart_waits_for_serving_again() -> None:
    """A restarted worker counts as serving only once its new process says so."""
    pool = Pool(count=1)
    pool.start_worker(0, 100)
    pool.reactor.advance(2.0)
    pool.event("exited", index=0, pid=100, code=0)
    serving = outcome(pool.service.wait_until_serving())
    pool.event("forked", index=0, pid=200)
    assert serving == []
    pool.event("serving", index=0, pid=200)
    assert serving == [2.0]


# Logs and raw output


def test_worker_log_reemitted() -> None:
    """A worker's log event is re-logged at its level with [worker N pid P]."""
    pool = Pool()
    with capturedLogs() as events:
        pool.event(
            "log", index=2, pid=4242, level="warn", namespace="mytasks", text="disk {almost} full"
        )
    [event] = events
    assert formatEvent(event) == "[worker 2 pid 4242] disk {almost} full"
    assert event["log_level"] == LogLevel.warn
    assert event["log_namespace"] == "taskoffload.worker"
    assert event["worker_namespace"] == "mytasks"


def test_worker_log_unknown_level() -> None:
    """A worker log event with an unknown level is logged at info."""
    pool = Pool()
    with capturedLogs() as events:
        pool.event("log", index=0, pid=1, level="loud", text="hello")
    [event] = events
    assert event["log_level"] == LogLevel.info
    assert formatEvent(event) == "[worker 0 pid 1] hello"


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (b"Traceback (most recent call last):", "Traceback (most recent call last):"),
        (b"{not json", "{not json"),
        (b"[1, 2]", "[1, 2]"),
        (b'"event"', '"event"'),
        (b'{"kind": "forked"}', '{"kind": "forked"}'),
        (b"caf\xe9", "caf\ufffd"),
    ],
    ids=["text", "bad-json", "array", "string", "no-event", "invalid-utf8"],
)
def test_unparseable_line_logged_raw(line: bytes, logged: str) -> None:
    """A line that is not an event is logged as it is; the pool carries on."""
    pool = Pool(count=1)
    with capturedLogs() as events:
        pool.service.event_received(line)
    assert texts(events) == [logged]
    pool.start_worker(0, 100)
    assert pool.status()["serving"] == 1


def test_unknown_event_warned() -> None:
    """An event of an unknown kind is logged as a warning, not acted on."""
    pool = Pool()
    with capturedLogs() as events:
        pool.event("teleported", index=0)
    [event] = events
    assert event["log_level"] == LogLevel.warn
    assert "teleported" in formatEvent(event)


def test_events_split_across_reads() -> None:
    """Event lines that arrive in pieces, or several in one read, are each handled once."""
    pool = Pool(count=2)
    data = b'{"event":"forked","index":0,"pid":100}\n{"event":"serving","index":0,"pid":100}\n'
    pool.fork_server.childDataReceived(1, data[:10])
    assert pool.status()["alive"] == 0
    pool.fork_server.childDataReceived(1, data[10:] + b'{"event":"forked","index":1,')
    assert pool.status()["serving"] == 1
    assert pool.status()["alive"] == 1
    pool.fork_server.childDataReceived(1, b'"pid":101}\n')
    assert pool.status()["alive"] == 2


def test_standard_error_logged() -> None:
    """Standard error is logged line by line, blank lines left out."""
    pool = Pool()
    with capturedLogs() as events:
        pool.fork_server.childDataReceived(2, b"Traceback (most\n\n  rec")
        pool.fork_server.childDataReceived(2, b"ent call last)\n")
    assert texts(events) == ["Traceback (most", "  recent call last)"]


# Stopping


def test_stop_cancels_restart() -> None:
    """Stopping cancels pending restarts and fires once the fork server exits."""
    pool = Pool(count=1)
    kills = pool.processes.signals
    crash(pool, pid=100)
    stopped = outcome(pool.service.stopService())
    assert pool.transport.stdin_closed
    assert stopped == []
    pool.fork_server.processEnded(Failure(ProcessDone(0)))
    assert stopped == [None]
    pool.reactor.advance(60)
    assert pool.forks() == []
    assert pool.reactor.getDelayedCalls() == []
    assert kills == []


def test_stop_signals_workers() -> None:
    """Stopping SIGTERMs workers and closes the fork server after they exit."""
    pool = Pool(count=2)
    kills = pool.processes.signals
    pool.start_worker(0, 100)
    pool.start_worker(1, 101)
    stopped = outcome(pool.service.stopService())
    assert sorted(kills) == [(100, signal.SIGTERM), (101, signal.SIGTERM)]
    pool.event("exited", index=0, pid=100, code=0)
    assert not pool.transport.stdin_closed
    pool.event("exited", index=1, pid=101, code=0)
    assert pool.transport.stdin_closed
    pool.fork_server.processEnded(Failure(ProcessDone(0)))
    assert stopped == [None]
    assert pool.forks() == []
    assert pool.status()["restarts"] == 0


def test_stop_kills_stuck_workers() -> None:
    """Workers still running 2 s after the stop timeout are killed."""
    pool = Pool(count=1, stop_timeout=10.0)
    kills = pool.processes.signals
    pool.start_worker(0, 100)
    stopped = outcome(pool.service.stopService())
    pool.reactor.advance(12.0 - EPSILON)
    assert kills == [(100, signal.SIGTERM)]
    pool.reactor.advance(EPSILON)
    assert kills == [(100, signal.SIGTERM), (100, signal.SIGKILL)]
    assert pool.transport.stdin_closed
    pool.fork_server.processEnded(Failure(ProcessDone(0)))
    assert stopped == [None]


def test_stop_kills_stuck_fork_server() -> None:
    """A fork server still running 5 s after its input closed is killed."""
    pool = Pool(count=1)
    stopped = outcome(pool.service.stopService())
    pool.reactor.advance(5.0)
    assert pool.transport.signals == ["KILL"]
    assert stopped == [None]


def test_worker_forked_while_stopping() -> None:
    """A worker whose fork is reported after stopping began is told to stop at once."""
    pool = Pool(count=1)
    kills = pool.processes.signals
    pool.service.stopService()
    pool.event("forked", index=0, pid=100)
    assert kills == [(100, signal.SIGTERM)]


# Configuration


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:12345", "tcp:12345:backlog=1024"),
        (
            "tcp:12345:interface=127.0.0.1",
            "tcp:12345:interface=127.0.0.1:backlog=1024",
        ),
        ("tcp6:12345:interface=\\:\\:1", "tcp6:12345:interface=\\:\\:1:backlog=1024"),
        ("unix:/run/taskoffload.sock", "unix:/run/taskoffload.sock:backlog=1024"),
        ("tcp:12345:backlog=64", "tcp:12345:backlog=64"),
        ("unix:/run/t.sock:backlog=5:mode=600", "unix:/run/t.sock:backlog=5:mode=600"),
        ("ssl:443:privateKey=key.pem", "ssl:443:privateKey=key.pem"),
    ],
)
def test_with_backlog(description: str, expected: str) -> None:
    """tcp/unix endpoints get backlog=1024 unless they set one; others are kept."""
    assert _with_backlog(description) == expected


def test_with_backlog_listens_with_it() -> None:
    """The amended endpoint string still parses and listens with the larger backlog."""
    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, _with_backlog("tcp:12345:interface=127.0.0.1"))
    endpoint.listen(Factory())
    [(port, _, backlog, interface)] = reactor.tcpServers
    assert (port, backlog, interface) == (12345, 1024, "127.0.0.1")
    endpoint = serverFromString(reactor, _with_backlog("unix:/run/taskoffload.sock"))
    endpoint.listen(Factory())
    [(address, _, backlog, *_)] = reactor.unixServers
    assert (address, backlog) == ("/run/taskoffload.sock", 1024)


def test_pool_config_to_json() -> None:
    """The configuration line carries everything the fork server reads, on one line."""
    config = PoolConfig(
        count=3,
        concurrency=2,
        tasks=("mytasks", "othertasks"),
        max_message=4096,
        stop_timeout=7.5,
        env={"TASKOFFLOAD_SMTP_HOST": "mail.example.org"},
    )
    line = config.to_json()
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    read = orjson.loads(line)
    assert read["tasks"] == ["mytasks", "othertasks"]
    assert read["concurrency"] == 2
    assert read["max_message"] == 4096
    assert read["stop_timeout"] == 7.5
    assert read["env"] == {"TASKOFFLOAD_SMTP_HOST": "mail.example.org"}
    assert read["path"] == [p for p in sys.path if p]


def test_service_init_does_no_work() -> None:
    """Creating the service neither listens, spawns, nor schedules anything."""
    reactor = MemoryReactorClock()
    WorkerPoolService(PoolConfig(), reactor=reactor)
    assert reactor.tcpServers == []
    assert reactor.unixServers == []
    assert reactor.getDelayedCalls() == []


def test_recycling_worker_replaced_at_once_without_backoff() -> None:
    """A worker that recycles itself is re-forked at once, however short its life."""
    pool = Pool(count=1)
    for n in range(3):
        pid = 200 + n
        pool.start_worker(0, pid)
        pool.reactor.advance(0.1)
        pool.event("recycling", index=0, pid=pid, reason="ran 3 tasks")
        pool.event("exited", index=0, pid=pid, code=0)
        assert pool.forks() == [0] * (n + 1)
    status = pool.status()
    assert status["recycled"] == 3
    assert status["restarts"] == 0


def test_recycling_limits_reach_the_workers() -> None:
    """The recycling and idle limits are part of the configuration the workers read."""
    config = PoolConfig(idle_timeout=5.0, max_tasks_per_child=10, max_memory_per_child=200)
    sent = orjson.loads(config.to_json())
    assert (sent["idle_timeout"], sent["max_tasks_per_child"], sent["max_memory_per_child"]) == (
        5.0,
        10,
        200,
    )


def test_worker_past_deadline_killed() -> None:
    """A worker still in a task ``kill_grace`` after its deadline is SIGKILLed."""
    import signal as signals
    import time

    pool = Pool(count=1)
    killed = pool.processes.signals
    pool.start_worker(0, 300)
    pool.event("deadline", index=0, pid=300, kill_at=time.monotonic() + 2.0)
    pool.reactor.advance(1.0)
    assert killed == []
    pool.reactor.advance(1.5)
    assert killed == [(300, signals.SIGKILL)]
    assert pool.status()["killed_past_deadline"] == 1


def test_deadline_cleared_when_task_returns() -> None:
    """A task that returns in time cancels its kill."""
    import time

    pool = Pool(count=1)
    killed = pool.processes.signals
    pool.start_worker(0, 301)
    pool.event("deadline", index=0, pid=301, kill_at=time.monotonic() + 2.0)
    pool.event("deadline", index=0, pid=301, kill_at=None)
    pool.reactor.advance(10.0)
    assert killed == []


def test_worker_stats_in_status_and_kept_across_restarts() -> None:
    """Workers' reported task counts and memory show in status; a slot's count
    survives its process."""
    pool = Pool(count=1)
    pool.start_worker(0, 400)
    pool.event("stats", index=0, pid=400, tasks_done=7, rss_mib=12.5)
    [worker] = pool.status()["workers"]
    assert (worker["tasks_done"], worker["rss_mib"]) == (7, 12.5)
    pool.reactor.advance(2.0)
    pool.event("stopped", index=0, pid=400, tasks_done=9)
    pool.event("exited", index=0, pid=400, code=0)
    pool.start_worker(0, 401)
    pool.event("stats", index=0, pid=401, tasks_done=1, rss_mib=11.0)
    [worker] = pool.status()["workers"]
    assert (worker["tasks_done"], worker["rss_mib"]) == (10, 11.0)


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
