"""
Unit tests for lanes on the pool's side: the ``--lane`` option and the names
(:mod:`taskoffload.lanes`), the slots each lane's workers take in the pool's
configuration, ``@task(lane=...)`` and the registry's routes, the lane fields of
the session acknowledgement, a worker that runs only its lane's tasks, the fd
each worker slot listens on, the supervisor's sockets and status, and the tap's
``--lane`` and ``--pool LANE=ADDRESS``.

Nothing is spawned; the one test of the supervisor's sockets binds real
loopback sockets, driven by a ``MemoryReactorClock``.
"""

from __future__ import annotations

import socket
from typing import Any

import orjson
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure

from taskoffload import tap, wire
from taskoffload._forkserver import FIRST_LANE_FD, LISTEN_FD, listen_fd
from taskoffload.catalogue import catalogue
from taskoffload.config import PoolConfig
from taskoffload.forkserver_client import ForkServerProtocol
from taskoffload.lanes import (
    DEFAULT_LANE,
    Lane,
    LaneInfo,
    check_lane_name,
    lane_listen,
    read_ack_lanes,
)
from taskoffload.registry import TaskRegistry, task
from taskoffload.running import TaskRunner
from taskoffload.settings import WorkerSettings
from taskoffload.supervisor import WorkerPoolService
from taskoffload.targets import parse_lane_address
from taskoffload.worker import TaskServerFactory, TaskServerProtocol
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl, ProcessStringTransport
from tests.socket_reactor import SocketReactor

#: A pool of 5 workers: 2 on the default lane, 1 on "interactive", 2 on "batch".
LANES = (Lane("interactive", 1, port=40123), Lane("batch", 2, path="/run/pool.sock.batch"))


def lane_pool(**fields: Any) -> PoolConfig:
    """A pool configuration with :data:`LANES` and 5 workers."""
    return PoolConfig(**{"count": 5, "concurrency": 3, "lanes": LANES, **fields})


# check_lane_name


@pytest.mark.parametrize("name", ["interactive", "a", "A9_-x", "x" * 32, DEFAULT_LANE])
def test_lane_names_accepted(name: str) -> None:
    """A letter, then up to 31 letters, digits, _ or -, is a lane name, returned as given."""
    assert check_lane_name(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "_a", "-a", "a b", "a.b", "x" * 33, "é", None, 3])
def test_lane_names_refused(name: object) -> None:
    """Anything else is refused, with what a lane name is."""
    with pytest.raises(ValueError, match="is not a lane name: a letter, then up to 31"):
        check_lane_name(name)


# Lane.parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("interactive=4", Lane("interactive", 4)),
        ("interactive=4:", Lane("interactive", 4)),
        (
            "interactive=4:tcp:12346:interface=127.0.0.1",
            Lane("interactive", 4, listen="tcp:12346:interface=127.0.0.1"),
        ),
        ("batch=12:unix:/run/batch.sock", Lane("batch", 12, listen="unix:/run/batch.sock")),
    ],
)
def test_lane_option_read(text: str, expected: Lane) -> None:
    """``--lane NAME=COUNT`` and ``NAME=COUNT:ENDPOINT``: the endpoint is all after COUNT."""
    lane = Lane.parse(text)
    assert lane == expected
    assert (lane.port, lane.path) == (None, None)


@pytest.mark.parametrize(
    "text",
    ["interactive", "interactive=", "interactive=:tcp:1", "interactive=x", "interactive=-1"],
)
def test_lane_option_without_count_refused(text: str) -> None:
    """A ``--lane`` without a count says which forms it takes."""
    with pytest.raises(ValueError) as caught:
        Lane.parse(text)
    assert str(caught.value) == (
        f"--lane {text!r}: expected NAME=COUNT or NAME=COUNT:ENDPOINT, "
        "e.g. interactive=4 or interactive=4:tcp:12346:interface=127.0.0.1"
    )


def test_lane_option_with_zero_workers_refused() -> None:
    """A lane reserves at least one worker."""
    with pytest.raises(ValueError, match=r"^--lane 'interactive=0': expected NAME=COUNT"):
        Lane.parse("interactive=0")


@pytest.mark.parametrize("text", ["1fast=2", "=2", "a b=2", "x.y=1:tcp:1"])
def test_lane_option_with_bad_name_refused(text: str) -> None:
    """The name must be a lane name."""
    with pytest.raises(ValueError, match="is not a lane name"):
        Lane.parse(text)


def test_lane_option_naming_the_default_lane_refused() -> None:
    """The default lane is the workers no lane reserves: --count sets them, not --lane."""
    with pytest.raises(ValueError) as caught:
        Lane.parse("default=2")
    assert str(caught.value) == (
        "--lane 'default=2': the 'default' lane is the workers no lane reserves; --count sets them"
    )


def test_lane_info_is_its_workers_times_concurrency() -> None:
    """What workers tell of a lane: its slots (workers x concurrency) and where it listens."""
    assert Lane("interactive", 4, port=40123).info(3) == LaneInfo("interactive", 12, port=40123)
    assert Lane("batch", 1, path="/p").info(2) == LaneInfo("batch", 2, path="/p")


# lane_listen


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ("tcp:12345:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),
        ("tcp:12345:interface=127.0.0.1:backlog=50", "tcp:0:interface=127.0.0.1"),
        ("tcp:port=12345:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"),
        ("tcp:12345", "tcp:0"),
        ("tcp6:12345:interface=\\:\\:1", "tcp6:0:interface=\\:\\:1"),
    ],
)
def test_lane_beside_a_tcp_pool(pool: str, expected: str) -> None:
    """On TCP, a lane listens on the pool's interface, on a port the system picks
    (port 0), without the pool's backlog (the supervisor adds its own)."""
    assert lane_listen(pool, "interactive") == expected


def test_lane_beside_a_tcp_pool_keeps_an_interface_given_first() -> None:
    """The interface is kept when the pool's endpoint names it before its port.

    Fails today: ``lane_listen`` drops the first field as the port, so the lane of
    a pool on ``tcp:interface=127.0.0.1:port=12345`` listens on every interface.
    """
    assert lane_listen("tcp:interface=127.0.0.1:port=12345", "interactive") == (
        "tcp:0:interface=127.0.0.1"
    )


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ("unix:/run/pool.sock", "unix:/run/pool.sock.interactive"),
        ("unix:/run/pool.sock:mode=600", "unix:/run/pool.sock.interactive:mode=600"),
        ("unix:address=/run/pool.sock", "unix:address=/run/pool.sock.interactive"),
    ],
)
def test_lane_beside_a_unix_pool(pool: str, expected: str) -> None:
    """On a UNIX socket, a lane listens on the pool's path with ``.NAME`` added."""
    assert lane_listen(pool, "interactive") == expected


@pytest.mark.parametrize("pool", ["ssl:443:privateKey=k.pem", "systemd:domain=INET:index=0"])
def test_lane_beside_another_kind_of_pool_refused(pool: str) -> None:
    """For any other kind of endpoint the lane needs its own, and the error says how."""
    with pytest.raises(ValueError) as caught:
        lane_listen(pool, "interactive")
    message = str(caught.value)
    assert message.startswith(f"lane 'interactive': the pool listens on {pool!r}")
    assert "--lane interactive=COUNT:tcp:PORT" in message


# PoolConfig


def test_default_lane_has_the_workers_no_lane_reserves() -> None:
    """``default_count`` is ``count`` less every lane's workers; without lanes, all."""
    assert lane_pool().default_count == 2
    assert PoolConfig(count=5).default_count == 5


def test_slots_of_the_default_lane_come_first_then_each_lane_in_order() -> None:
    """Slots 0-1 serve the default lane, 2 the first lane, 3-4 the second."""
    config = lane_pool()
    assert [config.lane_of_slot(i) for i in range(5)] == [None, None, 0, 1, 1]
    assert [config.lane_name(i) for i in range(5)] == [
        "default",
        "default",
        "interactive",
        "batch",
        "batch",
    ]


def test_without_lanes_every_slot_serves_the_default_lane() -> None:
    """A pool without lanes has only default-lane slots."""
    config = PoolConfig(count=3)
    assert [config.lane_name(i) for i in range(3)] == ["default"] * 3


def test_lane_infos() -> None:
    """What workers tell clients: each lane (not the default), its slots and address."""
    assert lane_pool().lane_infos() == (
        LaneInfo("interactive", 3, port=40123),
        LaneInfo("batch", 6, path="/run/pool.sock.batch"),
    )
    assert PoolConfig().lane_infos() == ()


def test_lanes_read_back_from_the_configuration_line() -> None:
    """``from_json`` gives back the lanes ``to_json`` sent: names, counts, endpoints,
    and the ports and paths they were bound on."""
    lanes = (
        Lane("interactive", 1, listen="tcp:0:interface=127.0.0.1", port=40123),
        Lane("batch", 2, path="/run/pool.sock.batch"),
    )
    read = PoolConfig.from_json(lane_pool(lanes=lanes).to_json())
    assert read.lanes == lanes
    assert read == lane_pool(lanes=lanes, import_path=read.import_path)


# @task(lane=...) and the registry


def test_task_names_its_lane() -> None:
    """``@task(lane=...)`` puts the task on that lane; without it, on the default one."""

    @task(lane="interactive")
    def quick() -> None: ...

    @task
    def slow() -> None: ...

    registry = TaskRegistry.from_functions([quick, slow])
    assert registry.lookup("quick").lane == "interactive"
    assert registry.lookup("slow").lane == DEFAULT_LANE


@pytest.mark.parametrize("lane", ["1fast", "", "a b"])
def test_bad_lane_refused_at_decoration(lane: str) -> None:
    """A lane that is not a lane name is refused when ``@task`` is applied, not later."""
    with pytest.raises(ValueError, match="is not a lane name"):
        task(lane=lane)


def test_routes_name_the_tasks_off_the_default_lane() -> None:
    """``routes()`` gives each task's lane, leaving out the default lane's tasks."""

    @task(lane="interactive")
    def quick() -> None: ...

    @task(lane="batch", name="crunch")
    def big() -> None: ...

    def plain() -> None: ...

    registry = TaskRegistry.from_functions([quick, big, plain])
    assert registry.routes() == {"quick": "interactive", "crunch": "batch"}


def test_check_lanes_names_each_stray_task_and_how_to_serve_it() -> None:
    """A task on a lane the pool does not reserve is refused by name and lane, and
    the message says which ``--lane`` options would serve them."""

    @task(lane="interactive")
    def quick() -> None: ...

    @task(lane="interactive")
    def quicker() -> None: ...

    @task(lane="batch")
    def big() -> None: ...

    @task(lane="served")
    def fine() -> None: ...

    registry = TaskRegistry.from_functions([quick, quicker, big, fine])
    with pytest.raises(ValueError) as caught:
        registry.check_lanes(["served"])
    assert str(caught.value) == (
        "the pool has no workers for the lane of big (lane 'batch'), quick (lane "
        "'interactive'), quicker (lane 'interactive'): start it with "
        "--lane batch=COUNT --lane interactive=COUNT"
    )


def test_check_lanes_passes_when_every_lane_is_served() -> None:
    """Tasks on the default lane or a reserved lane pass."""

    @task(lane="interactive")
    def quick() -> None: ...

    def plain() -> None: ...

    TaskRegistry.from_functions([quick, plain]).check_lanes(["interactive"])
    TaskRegistry.from_functions([plain]).check_lanes([])


def test_tasks_mapping_keeps_the_lane_of_a_task() -> None:
    """A ``@task`` registered under another name in a ``TASKS`` mapping keeps its lane."""

    @task(lane="interactive", timeout=3)
    def quick() -> None: ...

    registry = TaskRegistry.from_mapping({"ping": quick, "same": quick})
    assert registry.lookup("ping").lane == "interactive"
    assert registry.lookup("same").lane == "interactive"
    assert registry.routes() == {"ping": "interactive", "same": "interactive"}


# The session acknowledgement


def test_session_ack_with_lanes_round_trip() -> None:
    """A worker's lane, the pool's lanes and the routes read back as written."""
    ack = wire.SessionAck(
        worker=4242,
        slots=6,
        concurrency=3,
        lane="default",
        lanes=(LaneInfo("interactive", 3, port=40123), LaneInfo("batch", 6, path="/p.batch")),
        routes={"quick": "interactive", "crunch": "batch"},
    )
    line = wire.encode_session_ack(ack)
    assert orjson.loads(line)["session"] == {
        "worker": 4242,
        "slots": 6,
        "concurrency": 3,
        "lane": "default",
        "lanes": {
            "interactive": {"slots": 3, "port": 40123},
            "batch": {"slots": 6, "path": "/p.batch"},
        },
        "routes": {"quick": "interactive", "crunch": "batch"},
    }
    assert wire.decode_reply(line[:-1]) == ack


def test_session_ack_of_a_worker_on_a_lane_names_it_without_other_lanes() -> None:
    """A worker on a non-default lane says its lane even with no lanes listed."""
    ack = wire.SessionAck(worker=1, lane="interactive", routes={"quick": "interactive"})
    session = orjson.loads(wire.encode_session_ack(ack))["session"]
    assert (session["lane"], session["lanes"], session["routes"]) == (
        "interactive",
        {},
        {"quick": "interactive"},
    )
    assert wire.decode_reply(wire.encode_session_ack(ack)[:-1]) == ack


def test_session_ack_of_a_pool_without_lanes_writes_no_lane_fields() -> None:
    """A default-lane worker of a pool without lanes writes none of lane, lanes, routes,
    even if handed routes; reading it back gives the defaults."""
    ack = wire.SessionAck(worker=7, slots=4, concurrency=1, routes={"quick": "interactive"})
    session = orjson.loads(wire.encode_session_ack(ack))["session"]
    assert session == {"worker": 7, "slots": 4, "concurrency": 1}
    read = wire.decode_reply(wire.encode_session_ack(ack)[:-1])
    assert isinstance(read, wire.SessionAck)
    assert (read.lane, read.lanes, read.routes) == (DEFAULT_LANE, (), {})


def test_garbled_lane_fields_are_dropped_not_fatal() -> None:
    """Lane fields a client cannot read are left out; the rest of the ack still counts."""
    line = orjson.dumps(
        {
            "session": {
                "worker": 5,
                "slots": 4,
                "lane": 7,
                "lanes": {
                    "zero": {"slots": 0},
                    "text": "x",
                    "boolean": {"slots": True},
                    "odd_where": {"slots": 2, "port": 70000, "path": 5},
                    "good": {"slots": 1, "port": 40123},
                },
                "routes": {"quick": "good", "broken": 3, "other": None},
            }
        }
    )
    assert wire.decode_reply(line) == wire.SessionAck(
        worker=5,
        slots=4,
        lanes=(LaneInfo("odd_where", 2), LaneInfo("good", 1, port=40123)),
        routes={"quick": "good"},
    )


@pytest.mark.parametrize(
    "session",
    [
        {"lanes": ["interactive"], "routes": ["quick"], "lane": ""},
        {"lanes": None, "routes": "quick", "lane": None},
        {"lanes": 3, "routes": 3, "lane": ["interactive"]},
    ],
)
def test_lane_fields_of_the_wrong_type_read_as_none(session: dict[str, Any]) -> None:
    """Lanes or routes that are not objects, and a lane that is not a name, read as absent."""
    assert read_ack_lanes(session) == {"lane": DEFAULT_LANE, "lanes": (), "routes": {}}
    assert wire.decode_reply(orjson.dumps({"session": {"worker": 1, **session}})) == (
        wire.SessionAck(worker=1)
    )


# TaskRunner on a lane


class LaneTasks:
    """One task on the default lane and one on lane interactive, recording their runs."""

    def __init__(self) -> None:
        self.ran: list[str] = []

        @task(lane="interactive")
        def quick() -> str:
            self.ran.append("quick")
            return "quick done"

        def slow() -> str:
            self.ran.append("slow")
            return "slow done"

        self.registry = TaskRegistry.from_functions([quick, slow])


def run(runner: TaskRunner, function: str) -> Any:
    """What ``runner`` answers a request for ``function`` with (it answers at once)."""
    seen: list[Any] = []
    runner.run(wire.Request(id=1, function=function), lambda _: None).addBoth(seen.append)
    [reply] = seen
    return reply


def test_runner_on_the_default_lane_refuses_another_lanes_task() -> None:
    """A request for lane interactive's task, on a default-lane worker, is answered
    with ``wrong_lane`` naming both lanes, and the task does not run."""
    tasks = LaneTasks()
    reply = run(TaskRunner(tasks.registry, Clock(), lane=DEFAULT_LANE), "quick")
    assert isinstance(reply, wire.ErrorReply)
    assert (reply.id, reply.code) == (1, wire.WRONG_LANE)
    assert reply.message == (
        "quick runs on lane 'interactive', and this worker serves lane 'default': "
        "send it to a worker of its lane"
    )
    assert tasks.ran == []


def test_runner_on_the_default_lane_runs_its_own() -> None:
    """The default lane's task runs on a default-lane worker, as it always did."""
    tasks = LaneTasks()
    runner = TaskRunner(tasks.registry, Clock())
    assert runner.lane == DEFAULT_LANE
    assert run(runner, "slow") == wire.Result(id=1, result="slow done")
    assert tasks.ran == ["slow"]


def test_runner_on_a_lane_runs_only_that_lanes_tasks() -> None:
    """A worker of lane interactive runs its task and refuses the default lane's."""
    tasks = LaneTasks()
    runner = TaskRunner(tasks.registry, Clock(), lane="interactive")
    assert run(runner, "quick") == wire.Result(id=1, result="quick done")
    reply = run(runner, "slow")
    assert isinstance(reply, wire.ErrorReply) and reply.code == wire.WRONG_LANE
    assert tasks.ran == ["quick"]


def test_runner_without_a_lane_runs_every_lanes_tasks() -> None:
    """``lane=None`` (the fake pool's) runs the tasks of every lane."""
    tasks = LaneTasks()
    runner = TaskRunner(tasks.registry, Clock(), lane=None)
    assert run(runner, "quick") == wire.Result(id=1, result="quick done")
    assert run(runner, "slow") == wire.Result(id=1, result="slow done")
    assert tasks.ran == ["quick", "slow"]


# WorkerSettings and the worker's acknowledgement


def test_settings_of_a_default_lane_worker() -> None:
    """A default-lane slot serves lane default, tells clients that lane's slots
    (its workers x concurrency) and the pool's other lanes."""
    settings = WorkerSettings.from_config(lane_pool(), worker_id=77, index=1)
    assert (settings.lane, settings.pool_slots) == ("default", 2 * 3)
    assert settings.lanes == lane_pool().lane_infos()
    assert settings.worker_id == 77


@pytest.mark.parametrize(("index", "lane", "slots"), [(2, "interactive", 3), (4, "batch", 6)])
def test_settings_of_a_lane_worker(index: int, lane: str, slots: int) -> None:
    """A lane's slot serves that lane and tells clients that lane's slots."""
    settings = WorkerSettings.from_config(lane_pool(), worker_id=77, index=index)
    assert (settings.lane, settings.pool_slots) == (lane, slots)
    assert settings.lanes == lane_pool().lane_infos()


def test_settings_without_lanes_tell_the_whole_pool() -> None:
    """Without lanes, every worker tells the whole pool's slots and no lanes."""
    settings = WorkerSettings.from_config(PoolConfig(count=3, concurrency=2), worker_id=1, index=2)
    assert (settings.lane, settings.lanes, settings.pool_slots) == ("default", (), 6)


def test_interactive_worker_acknowledges_its_lane_and_refuses_others() -> None:
    """A worker of lane interactive acknowledges a session line with its lane, the
    pool's lanes and the routes; on that connection, the default lane's task gets
    ``wrong_lane`` and does not run, its own task runs."""
    tasks = LaneTasks()
    settings = WorkerSettings.from_config(lane_pool(), worker_id=42, index=2)
    factory = TaskServerFactory(tasks.registry, Clock(), settings)
    protocol = factory.buildProtocol(None)
    assert isinstance(protocol, TaskServerProtocol)  # the worker port's protocol
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"session": {"reject_when_busy": true}}\n')
    assert orjson.loads(transport.value()) == {
        "session": {
            "worker": 42,
            "slots": 3,
            "concurrency": 3,
            "lane": "interactive",
            "lanes": {
                "interactive": {"slots": 3, "port": 40123},
                "batch": {"slots": 6, "path": "/run/pool.sock.batch"},
            },
            "routes": {"quick": "interactive"},
            "tasks": catalogue(tasks.registry.tasks),
        }
    }
    transport.clear()
    protocol.dataReceived(b'{"id": 1, "function": "slow"}\n')
    [reply] = [orjson.loads(line) for line in transport.value().splitlines()]
    assert reply["id"] == 1 and reply["error"]["code"] == "wrong_lane"
    transport.clear()
    protocol.dataReceived(b'{"id": 2, "function": "quick"}\n')
    assert orjson.loads(transport.value()) == {"id": 2, "result": "quick done"}
    assert tasks.ran == ["quick"]


# The fork server's fds


def test_each_slot_listens_on_its_lanes_socket() -> None:
    """Default slots get fd 3; lane slots FIRST_LANE_FD (5) plus their lane's position."""
    config = lane_pool()
    assert (LISTEN_FD, FIRST_LANE_FD) == (3, 5)
    assert [listen_fd(config, i) for i in range(5)] == [3, 3, 5, 6, 6]
    assert [listen_fd(PoolConfig(count=2), i) for i in range(2)] == [3, 3]


# The supervisor


def bound_port(fd: int) -> int:
    """The TCP port the socket ``fd`` is bound to, as the system says."""
    with socket.socket(fileno=socket.dup(fd)) as bound:
        port: int = bound.getsockname()[1]
    return port


def fired(d: Deferred[Any]) -> list[Any]:
    """A list that receives what ``d`` fires with."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def test_supervisor_binds_a_socket_per_lane_and_tells_the_workers() -> None:
    """The pool binds its own socket and one per lane (beside it, or on the lane's
    own endpoint); the configuration line sent to the fork server carries each
    lane's port, and the lanes' sockets are handed to the fork server after the
    default one.

    FakeProcessControl does not record the ``lane_fds`` it is given, so this reads
    what the fork-server client was started with."""
    loopback = "tcp:0:interface=127.0.0.1"
    reactor = SocketReactor()
    processes = FakeProcessControl()
    service = WorkerPoolService(
        PoolConfig(
            listen=loopback,
            count=4,
            lanes=(Lane("interactive", 1), Lane("batch", 1, listen=loopback)),
        ),
        reactor=reactor,
        processes=processes,
    )
    service.privilegedStartService()
    try:
        assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
            (0, "127.0.0.1")
        ] * 3
        default_fd, lane_fds = service._sockets.fds()
        ports = [bound_port(fd) for fd in [default_fd, *lane_fds]]
        assert len(set(ports)) == 3 and 0 not in ports
        assert [lane.port for lane in service.config.lanes] == ports[1:]
        assert [lane.name for lane in service.config.lanes] == ["interactive", "batch"]
        service.startService()
        [spawned] = processes.spawned
        assert spawned.listen_fd == default_fd
        assert service._fork_servers._lane_fds == tuple(lane_fds)
        line = spawned.transport.value().splitlines()[0]
        assert [lane.port for lane in PoolConfig.from_json(line).lanes] == ports[1:]
    finally:
        stopped = fired(service.stopService())
        fork_server = service._fork_servers.current
        if fork_server is not None:
            fork_server.processEnded(Failure(ProcessDone(0)))
        reactor.advance(0)
    assert stopped == [None]
    assert service.port is None


def test_lane_ports_reach_the_workers_when_status_was_read_before_binding() -> None:
    """The configuration line carries the lanes' bound ports even if the pool's
    status was read before it bound its sockets.

    Fails today: ``status()`` (like ``draining`` and ``reloads``) builds the
    fork-server client, which keeps the configuration of that moment; binding
    later replaces ``service.config`` only, so the workers are told lanes without
    a port, and clients answer those lanes' calls with ``wrong_lane``."""
    reactor = SocketReactor()
    processes = FakeProcessControl()
    service = WorkerPoolService(
        PoolConfig(listen="tcp:0:interface=127.0.0.1", count=2, lanes=(Lane("interactive", 1),)),
        reactor=reactor,
        processes=processes,
    )
    service.status()
    service.privilegedStartService()
    try:
        service.startService()
        [lane] = service.config.lanes
        assert lane.port is not None
        line = processes.spawned[0].transport.value().splitlines()[0]
        assert [read.port for read in PoolConfig.from_json(line).lanes] == [lane.port]
    finally:
        service.stopService()
        fork_server = service._fork_servers.current
        if fork_server is not None:
            fork_server.processEnded(Failure(ProcessDone(0)))
        reactor.advance(0)


class StatusPool:
    """A pool service with :data:`LANES` and a stand-in fork server, as the supervisor tests make."""

    def __init__(self) -> None:
        self.service = WorkerPoolService(
            lane_pool(), reactor=MemoryReactorClock(), processes=FakeProcessControl()
        )
        self.service.workers = self.service._new_slots()
        fork_server = ForkServerProtocol(self.service._fork_servers)
        fork_server.transport = ProcessStringTransport()  # type: ignore[assignment]  # a stand-in
        self.service._fork_servers.current = fork_server

    def serve(self, index: int, pid: int) -> None:
        """Worker ``index`` is forked as ``pid`` and serves."""
        for kind in ("forked", "serving"):
            self.service.event_received(orjson.dumps({"event": kind, "index": index, "pid": pid}))


def test_status_shows_each_lane_and_each_workers_lane() -> None:
    """``status()`` gives each lane's workers, how many serve and where a lane
    listens, and the lane of each worker."""
    pool = StatusPool()
    pool.serve(0, 100)
    pool.serve(2, 102)
    pool.serve(3, 103)
    pool.serve(4, 104)
    status = pool.service.status()
    assert status["lanes"] == {
        "default": {"count": 2, "serving": 1},
        "interactive": {"count": 1, "serving": 1, "port": 40123},
        "batch": {"count": 2, "serving": 2, "path": "/run/pool.sock.batch"},
    }
    assert [w["lane"] for w in status["workers"]] == [
        "default",
        "default",
        "interactive",
        "batch",
        "batch",
    ]


# The tap


def parse(*args: str) -> tap.Options:
    """Options parsed from ``args``, as twistd would."""
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_tap_lane_option_reaches_the_pool_config() -> None:
    """``--lane`` options become the pool's lanes, in order."""
    options = parse(
        "--role=worker",
        "--count=6",
        "--lane=interactive=2",
        "--lane",
        "batch=1:tcp:12346:interface=127.0.0.1",
    )
    assert options.pool_config(options["listen"]).lanes == (
        Lane("interactive", 2),
        Lane("batch", 1, listen="tcp:12346:interface=127.0.0.1"),
    )


def test_tap_lanes_of_role_all_reach_its_pool() -> None:
    """Role all gives its own pool the lanes."""
    options = parse("--count=3", "--lane=interactive=1")
    assert options.pool_config(options["pool-listen"]).lanes == (Lane("interactive", 1),)


def test_tap_without_lanes() -> None:
    """No ``--lane``: a pool without lanes."""
    options = parse("--role=worker", "--count=2")
    assert options.pool_config(options["listen"]).lanes == ()


@pytest.mark.parametrize(
    "lanes", [["--lane=interactive=4"], ["--lane=interactive=2", "--lane=batch=2"]]
)
def test_tap_lanes_leave_the_default_lane_a_worker(lanes: list[str]) -> None:
    """Lanes reserving as many workers as ``--count`` (or more) are refused."""
    with pytest.raises(usage.UsageError, match=r"--lane reserves 4 of the 4 workers \(--count\)"):
        parse("--role=worker", "--count=4", *lanes)


def test_tap_lane_given_twice_refused() -> None:
    """A lane named twice is refused."""
    with pytest.raises(usage.UsageError, match="each lane is given once"):
        parse("--role=worker", "--count=8", "--lane=interactive=1", "--lane=interactive=2")


def test_tap_lane_for_a_gateway_refused() -> None:
    """A gateway has no workers to reserve: ``--lane`` is refused, pointing at ``--pool``."""
    with pytest.raises(usage.UsageError, match="--lane is for a pool") as caught:
        parse("--role=gateway", "--count=8", "--lane=interactive=1")
    assert "--pool LANE=ADDRESS" in str(caught.value)


@pytest.mark.parametrize("text", ["interactive", "default=1", "9=1", "interactive=0"])
def test_tap_bad_lane_option_refused(text: str) -> None:
    """A ``--lane`` that cannot be read is a usage error, not a traceback."""
    with pytest.raises(usage.UsageError, match="lane"):
        parse("--role=worker", "--count=8", f"--lane={text}")


def test_tap_lane_address_accepted_for_a_gateway() -> None:
    """A gateway takes ``--pool LANE=ADDRESS`` beside the pool's own address."""
    options = parse(
        "--role=gateway", "--pool", "tcp:127.0.0.1:12345", "--pool", "interactive=tcp:127.0.0.1:1"
    )
    assert options["pool"] == ["tcp:127.0.0.1:12345", "interactive=tcp:127.0.0.1:1"]


def test_tap_lane_address_with_a_bad_lane_refused() -> None:
    """``--pool 1nope=...`` is refused: ``1nope`` is not a lane name."""
    with pytest.raises(usage.UsageError, match=r"--pool '1nope=tcp:x:1': '1nope' is not a lane"):
        parse("--role=gateway", "--pool", "1nope=tcp:x:1")


def test_tap_gateway_with_only_lane_addresses_has_a_pool_address() -> None:
    """A gateway given only ``LANE=ADDRESS`` pools is refused at once, or given the
    default pool: its client needs an address that names no lane.

    Fails today: the options are accepted as they are, and the gateway's
    ``TaskClient`` raises ``ValueError`` when the service starts."""
    try:
        options = parse("--role=gateway", "--pool", "interactive=tcp:127.0.0.1:1")
    except usage.UsageError:
        return
    lanes = [parse_lane_address(address)[0] for address in options["pool"]]
    assert None in lanes, options["pool"]


def test_tap_lane_endpoint_beyond_loopback_needs_a_secret() -> None:
    """A lane's own endpoint reachable beyond this machine runs its tasks for anyone
    who reaches it, as the pool's would: without ``--secret-file`` or
    ``--insecure``, it is refused as a pool endpoint beyond loopback is.

    Fails today: only the pool's own endpoint is checked."""
    with pytest.raises(usage.UsageError, match="reachable beyond this machine"):
        parse("--role=worker", "--count=2", "--lane=interactive=1:tcp:12346")


@pytest.mark.parametrize(
    "endpoint", ["bogus:1", "udp:12346", "ssl:12346:privateKey=k.pem:interface=127.0.0.1"]
)
def test_tap_lane_endpoint_of_another_kind_refused(endpoint: str) -> None:
    """A lane's own endpoint is held to what ``--listen`` is: workers listen on a
    tcp:, tcp6: or unix: endpoint, and one of another kind is refused at once.

    Fails today: the endpoint after ``NAME=COUNT:`` is not checked, so the pool
    fails only when it binds (or, for ``ssl:``, serves its lane unencrypted)."""
    with pytest.raises(usage.UsageError):
        parse("--role=worker", "--count=2", f"--lane=interactive=1:{endpoint}")


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
