"""
Unit tests for lanes on the client's and the gateway's side: ``LANE=ADDRESS``
(:func:`~taskoffload.targets.parse_lane_address`), where a lane listens
(:func:`~taskoffload.routing.lane_address`), a ``TaskClient`` sending each call to
its lane's workers (:class:`~taskoffload.routing.LaneRouter`), and the gateway's
fair share kept per lane (:class:`~taskoffload.fairshare.LaneShares`).

The client runs on a ``MemoryReactorClock``, which records each connection
attempt; the tests play the workers by building the protocol, attaching a
``StringTransport`` and feeding it the session acknowledgement and replies.  The
fair share runs over a :class:`~taskoffload.testing.FakeTaskPool` and a ``Clock``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from taskoffload import task, wire
from taskoffload.client import TaskClient, TaskError
from taskoffload.fairshare import ClientLanes, FairShare, LaneShares
from taskoffload.lanes import DEFAULT_LANE, LaneInfo
from taskoffload.routing import lane_address
from taskoffload.targets import PoolAddress, parse_lane_address
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module

POOL = "tcp:127.0.0.1:12345"
#: The port the pool's acknowledgement says lane interactive listens on.
LANE_PORT = 40123
#: The pool's lanes as its workers tell them.
LANES = (LaneInfo("interactive", 2, port=LANE_PORT),)
#: Which tasks run off the default lane, as the workers tell it.
ROUTES = {"noop": "interactive"}


def lane_ack(
    worker: int = 1,
    lane: str = DEFAULT_LANE,
    slots: int = 4,
    lanes: Sequence[LaneInfo] = LANES,
    routes: dict[str, str] | None = None,
) -> wire.SessionAck:
    """A worker's acknowledgement of a pool with lane interactive."""
    return wire.SessionAck(
        worker=worker,
        slots=slots,
        concurrency=1,
        lane=lane,
        lanes=tuple(lanes),
        routes=ROUTES if routes is None else routes,
    )


class Worker:
    """The worker's end of one client connection."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def requests(self) -> list[str]:
        """The task of each request the client wrote after its session line."""
        lines = [orjson.loads(line) for line in self.transport.value().splitlines()]
        assert lines[0] == {"session": {"reject_when_busy": True}}
        return [message["function"] for message in lines[1:] if "function" in message]

    def answer(self, result: Any = None) -> None:
        """Send a result for the last request the client wrote."""
        lines = [orjson.loads(line) for line in self.transport.value().splitlines()]
        request_id = [m for m in lines if "function" in m][-1]["id"]
        self.protocol.dataReceived(orjson.dumps({"id": request_id, "result": result}) + b"\n")


class Client:
    """A ``TaskClient`` over a memory reactor, and the means to play its workers."""

    def __init__(self, addresses: Sequence[str] = (POOL,), **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.client = TaskClient(self.reactor, list(addresses), **options)

    @property
    def attempts(self) -> list[str]:
        """``host:port`` of every TCP connection attempt so far, in order."""
        return [f"{host}:{port}" for host, port, *_ in self.reactor.tcpClients]

    def accept(self, index: int, ack: wire.SessionAck) -> Worker:
        """Let TCP connection attempt ``index`` succeed, its worker acknowledging with ``ack``."""
        host, port, factory, *_ = self.reactor.tcpClients[index]
        return self._accept(factory, IPv4Address("TCP", host, port), ack)

    def accept_unix(self, index: int, ack: wire.SessionAck) -> Worker:
        """Let UNIX connection attempt ``index`` succeed, acknowledged with ``ack``."""
        path, factory, *_ = self.reactor.unixClients[index]
        return self._accept(factory, UNIXAddress(path), ack)

    def _accept(self, factory: Any, address: Any, ack: wire.SessionAck) -> Worker:
        protocol = factory.buildProtocol(address)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.encode_session_ack(ack))
        return Worker(protocol, transport)

    def learnt(self) -> Worker:
        """The first connection, to the pool's own address, acknowledged by a
        default-lane worker of a pool with lane interactive: the client now knows
        the lane.  A call of ``add`` opened it, and now runs on it."""
        self.client.call("add")
        return self.accept(0, lane_ack())


class Outcome:
    """What a Deferred fired with, and how many times anything fired it."""

    def __init__(self, deferred: Deferred[Any]) -> None:
        self.seen: list[Any] = []
        deferred.addBoth(self.seen.append)

    @property
    def fired(self) -> bool:
        return bool(self.seen)

    @property
    def result(self) -> Any:
        """The result; fails the test if there is none."""
        [value] = self.seen
        assert not isinstance(value, Failure), value
        return value

    @property
    def error(self) -> TaskError:
        """The :class:`TaskError`; fails the test if there is none."""
        [value] = self.seen
        assert isinstance(value, Failure), f"fired with {value!r}"
        assert isinstance(value.value, TaskError), value
        return value.value


# parse_lane_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("interactive=tcp:127.0.0.1:5555", ("interactive", PoolAddress("tcp", "127.0.0.1", 5555))),
        (
            "interactive=pool-b.example:5555",
            ("interactive", PoolAddress("tcp", "pool-b.example", 5555)),
        ),
        (
            "batch=unix:/run/pool.sock.batch",
            ("batch", PoolAddress("unix", path="/run/pool.sock.batch")),
        ),
        ("fast=[::1]:7", ("fast", PoolAddress("tcp", "::1", 7))),
        ("tcp:127.0.0.1:12345", (None, PoolAddress("tcp", "127.0.0.1", 12345))),
        ("127.0.0.1:12345", (None, PoolAddress("tcp", "127.0.0.1", 12345))),
        ("unix:/run/a=b.sock", (None, PoolAddress("unix", path="/run/a=b.sock"))),
    ],
)
def test_parse_lane_address(text: str, expected: tuple[str | None, PoolAddress]) -> None:
    """``LANE=ADDRESS`` names the lane; a plain address (an ``=`` after a colon
    included) is a pool's own."""
    assert parse_lane_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1nope=tcp:x:1", "'1nope' is not a lane name"),
        ("=tcp:x:1", "'' is not a lane name"),
        ("interactive=nowhere", "'nowhere' is not a pool address"),
        ("interactive=", "'' is not a pool address"),
        ("interactive=unix:", "unix:PATH needs a path"),
    ],
)
def test_parse_lane_address_refuses(text: str, message: str) -> None:
    """A bad lane name or a bad address is refused, saying which."""
    with pytest.raises(ValueError, match=message):
        parse_lane_address(text)


# lane_address


def test_lane_address_of_a_tcp_pool_is_its_host_on_the_lanes_port() -> None:
    """On TCP, a lane listens on the pool's host, on the port the worker told."""
    pool = PoolAddress("tcp", "pool-b.example", 12345)
    assert lane_address(pool, LaneInfo("interactive", 2, port=LANE_PORT)) == PoolAddress(
        "tcp", "pool-b.example", LANE_PORT
    )


def test_lane_address_of_a_unix_pool_is_the_lanes_path() -> None:
    """On a UNIX socket, a lane listens on the path the worker told."""
    pool = PoolAddress("unix", path="/run/pool.sock")
    info = LaneInfo("interactive", 2, path="/run/pool.sock.interactive")
    assert lane_address(pool, info) == PoolAddress("unix", path="/run/pool.sock.interactive")


@pytest.mark.parametrize(
    ("pool", "info"),
    [
        (PoolAddress("tcp", "h", 1), LaneInfo("interactive", 2, path="/run/x")),
        (PoolAddress("unix", path="/run/p"), LaneInfo("interactive", 2, port=LANE_PORT)),
        (PoolAddress("tcp", "h", 1), LaneInfo("interactive", 2)),
    ],
)
def test_lane_address_that_does_not_fit_the_pools_kind(pool: PoolAddress, info: LaneInfo) -> None:
    """A lane told of without an address of the pool's kind has none."""
    assert lane_address(pool, info) is None


# TaskClient: routing by lane


def test_call_learnt_to_be_on_a_lane_moves_to_that_lanes_workers() -> None:
    """Before any acknowledgement, a call of noop goes to the pool's own address;
    when the default worker's ack says noop runs on lane interactive, on port
    LANE_PORT, the call is not written on that connection: one is opened to the
    pool's host on LANE_PORT, and the call is written there."""
    pool = Client()
    outcome = Outcome(pool.client.call("noop"))
    assert pool.attempts == ["127.0.0.1:12345"]
    assert pool.client.lane_of("noop") == DEFAULT_LANE
    default = pool.accept(0, lane_ack())
    assert default.requests() == []
    assert pool.client.lane_of("noop") == "interactive"
    assert pool.attempts == ["127.0.0.1:12345", f"127.0.0.1:{LANE_PORT}"]
    interactive = pool.accept(1, lane_ack(worker=2, lane="interactive", slots=2))
    assert interactive.requests() == ["noop"]
    assert default.requests() == []
    interactive.answer("pong")
    assert outcome.result == "pong"


def test_waiting_call_moves_to_its_lane_when_the_ack_comes() -> None:
    """A noop waiting behind a default-lane call when the ack comes moves to lane
    interactive then: it does not wait for a default-lane connection to free."""
    pool = Client()
    add = Outcome(pool.client.call("add"))
    noop = Outcome(pool.client.call("noop"))
    assert pool.attempts == ["127.0.0.1:12345", "127.0.0.1:12345"]
    default = pool.accept(0, lane_ack())
    assert default.requests() == ["add"]
    assert pool.attempts[-1] == f"127.0.0.1:{LANE_PORT}"
    interactive = pool.accept(2, lane_ack(worker=2, lane="interactive", slots=2))
    assert interactive.requests() == ["noop"]
    interactive.answer("pong")
    assert noop.result == "pong" and not add.fired


def test_call_handed_back_after_its_lane_changed_goes_to_its_new_lane() -> None:
    """A noop sent to the default lane while the pool had no lanes, handed back by
    its stopping worker after a new worker's ack (a reload) put noop on lane
    interactive, goes to lane interactive, not to the idle default connection."""
    pool = Client()
    noop = Outcome(pool.client.call("noop"))
    old = pool.accept(0, wire.SessionAck(worker=1, slots=4, concurrency=1))
    assert old.requests() == ["noop"]
    pool.client.call("add")
    new = pool.accept(1, lane_ack(worker=2))
    new.answer(1)
    assert new.requests() == ["add"]
    old.protocol.dataReceived(b'{"goodbye": "worker stopping"}\n')
    assert new.requests() == ["add"]
    assert pool.attempts[-1] == f"127.0.0.1:{LANE_PORT}"
    interactive = pool.accept(2, lane_ack(worker=3, lane="interactive", slots=2))
    assert interactive.requests() == ["noop"]
    interactive.answer("pong")
    assert noop.result == "pong"


def test_after_the_ack_calls_go_straight_to_their_lane() -> None:
    """Once the routes are known, noop goes to lane interactive's connection and
    every other task to the default lane's."""
    pool = Client()
    default = pool.learnt()
    default.answer(1)
    noop = Outcome(pool.client.call("noop"))
    assert pool.attempts == ["127.0.0.1:12345", f"127.0.0.1:{LANE_PORT}"]
    interactive = pool.accept(1, lane_ack(worker=2, lane="interactive", slots=2))
    add = Outcome(pool.client.call("add"))
    assert default.requests() == ["add", "add"]
    assert interactive.requests() == ["noop"]
    interactive.answer("pong")
    default.answer(3)
    assert (noop.result, add.result) == ("pong", 3)
    pool.client.call("noop")
    assert interactive.requests() == ["noop", "noop"]
    assert len(pool.attempts) == 2


def test_routes_follow_the_latest_ack() -> None:
    """A later acknowledgement that puts noop back on the default lane (a reload
    moved it) sends the next noop to the default lane."""
    pool = Client()
    pool.learnt().answer(1)
    pool.client.call("add")
    pool.client.call("add")
    second = pool.accept(1, lane_ack(worker=3, routes={}))
    second.answer(2)
    assert pool.client.lane_of("noop") == DEFAULT_LANE
    pool.client.call("noop")
    assert second.requests()[-1] == "noop"


def test_given_lane_address_is_used_instead_of_the_advertised_port() -> None:
    """With ``interactive=tcp:127.0.0.1:5555`` among the addresses, lane interactive's
    calls go there, not to the port the pool's acknowledgement tells."""
    pool = Client([POOL, "interactive=tcp:127.0.0.1:5555"])
    outcome = Outcome(pool.client.call("noop"))
    default = pool.accept(0, lane_ack())
    assert pool.attempts == ["127.0.0.1:12345", "127.0.0.1:5555"]
    interactive = pool.accept(1, lane_ack(worker=2, lane="interactive", slots=2))
    assert (default.requests(), interactive.requests()) == ([], ["noop"])
    interactive.answer(None)
    assert outcome.fired
    pool.client.call("noop")
    assert f"127.0.0.1:{LANE_PORT}" not in pool.attempts


def test_unix_pool_learns_the_lanes_path() -> None:
    """A client of a pool on a UNIX socket connects to the lane's path the ack tells."""
    pool = Client(["unix:/run/pool.sock"])
    pool.client.call("noop")
    lanes = [LaneInfo("interactive", 2, path="/run/pool.sock.interactive")]
    default = pool.accept_unix(0, lane_ack(lanes=lanes))
    assert [path for path, *_ in pool.reactor.unixClients] == [
        "/run/pool.sock",
        "/run/pool.sock.interactive",
    ]
    interactive = pool.accept_unix(1, lane_ack(worker=2, lane="interactive", lanes=lanes))
    assert (default.requests(), interactive.requests()) == ([], ["noop"])


def test_slots_and_capacity_per_lane() -> None:
    """``slots(lane)`` and ``capacity(lane)`` are what the pool said of that lane, then
    what its own workers say (times one more than ``prefetch``); without a lane,
    their sum."""
    pool = Client(prefetch=1)
    assert (pool.client.slots(), pool.client.capacity()) == (None, None)
    pool.learnt()
    assert (pool.client.slots(DEFAULT_LANE), pool.client.capacity(DEFAULT_LANE)) == (4, 8)
    # As the default worker told of the lane, before any of its own has said.
    assert (pool.client.slots("interactive"), pool.client.capacity("interactive")) == (2, 4)
    pool.client.call("noop")
    pool.accept(1, lane_ack(worker=2, lane="interactive", slots=3))
    assert (pool.client.slots("interactive"), pool.client.capacity("interactive")) == (3, 6)
    assert (pool.client.slots(DEFAULT_LANE), pool.client.capacity(DEFAULT_LANE)) == (4, 8)
    assert (pool.client.slots(), pool.client.capacity()) == (7, 14)
    assert (pool.client.slots("nosuch"), pool.client.capacity("nosuch")) == (None, None)


def test_call_on_a_lane_with_no_known_address_gets_wrong_lane() -> None:
    """A pool that routes noop to lane interactive but tells no address of it (its
    lane has neither port nor path): the noop waiting when the ack came, and a
    later one, are answered ``wrong_lane`` and written nowhere; the default lane's
    calls still go out."""
    pool = Client()
    add = Outcome(pool.client.call("add"))
    waiting = Outcome(pool.client.call("noop"))
    default = pool.accept(0, lane_ack(lanes=[LaneInfo("interactive", 2)]))
    assert waiting.error.code == wire.WRONG_LANE
    assert waiting.error.message == (
        "noop runs on lane 'interactive', and no address of that lane is known: "
        "give one as interactive=ADDRESS"
    )
    later = Outcome(pool.client.call("noop"))
    assert later.error.code == wire.WRONG_LANE
    assert default.requests() == ["add"]
    default.answer(3)
    assert add.result == 3
    pool.client.call("add")
    assert default.requests() == ["add", "add"]
    assert set(pool.attempts) == {"127.0.0.1:12345"}


def test_lane_told_without_a_fitting_address_is_logged() -> None:
    """A TCP pool telling only a path for its lane: the client warns, knows no
    address for the lane, and answers its calls ``wrong_lane``."""
    pool = Client()
    with capturedLogs() as events:
        pool.client.call("add")
        pool.accept(0, lane_ack(lanes=[LaneInfo("interactive", 2, path="/run/x")]))
    assert any("has lane interactive but says nowhere it listens" in formatEvent(e) for e in events)
    assert Outcome(pool.client.call("noop")).error.code == wire.WRONG_LANE


def with_interactive_call_waiting(
    **options: Any,
) -> tuple[Client, Worker, Deferred[Any], Outcome]:
    """A client that knows lane interactive, with a noop waiting in that lane's line
    (its connection attempt not accepted yet), and the default connection idle (and
    kept so as the clock moves)."""
    pool = Client(idle_timeout=600.0)
    default = pool.learnt()
    default.answer(1)
    deferred = pool.client.send_task("noop", **options)
    outcome = Outcome(deferred)
    assert pool.attempts[-1] == f"127.0.0.1:{LANE_PORT}"
    assert not outcome.fired
    return pool, default, deferred, outcome


def test_timeout_while_waiting_in_a_lanes_line() -> None:
    """A noop that times out in lane interactive's line is answered ``timeout`` once,
    is not sent when its connection comes, and the default lane's line is
    untouched: a later default call still goes out on the idle connection."""
    pool, default, _, outcome = with_interactive_call_waiting(timeout=5.0)
    pool.reactor.advance(5.0)
    assert outcome.error.code == wire.TIMEOUT
    later = Outcome(pool.client.call("add"))
    assert default.requests() == ["add", "add"]
    default.answer(7)
    assert later.result == 7
    interactive = pool.accept(1, lane_ack(worker=2, lane="interactive"))
    assert interactive.requests() == []
    pool.reactor.advance(60.0)
    assert len(outcome.seen) == 1


def test_cancel_while_waiting_in_a_lanes_line() -> None:
    """A noop cancelled in lane interactive's line is answered ``cancelled`` once, is
    not sent when its connection comes, and a later default call still goes out."""
    pool, default, deferred, outcome = with_interactive_call_waiting()
    deferred.cancel()
    assert outcome.error.code == wire.CANCELLED
    later = Outcome(pool.client.call("add"))
    assert default.requests() == ["add", "add"]
    default.answer(7)
    assert later.result == 7
    interactive = pool.accept(1, lane_ack(worker=2, lane="interactive"))
    assert interactive.requests() == []
    assert len(outcome.seen) == 1


def test_close_closes_every_lanes_connections() -> None:
    """``close()`` closes the default and the lane's connections, fails the calls
    waiting in either line, and fires once both are gone."""
    pool = Client()
    default = pool.learnt()
    default.answer(1)
    pool.client.call("noop")
    interactive = pool.accept(1, lane_ack(worker=2, lane="interactive"))
    waiting = Outcome(pool.client.call("noop"))
    closed = Outcome(pool.client.close())
    assert default.transport.disconnecting and interactive.transport.disconnecting
    assert waiting.error.code == wire.WORKER_LOST
    assert not closed.fired
    for worker in (default, interactive):
        worker.protocol.connectionLost(Failure(ConnectionError("closed")))
    assert closed.fired
    assert Outcome(pool.client.call("noop")).error.code == wire.WORKER_LOST


# The gateway's fair share, per lane


class Tasks:
    """A default-lane task and an interactive one, each running until the test ends it."""

    def __init__(self) -> None:
        self.running: list[Deferred[Any]] = []

        def work() -> Deferred[Any]:
            return self._run()

        @task(lane="interactive")
        def noop() -> Deferred[Any]:
            return self._run()

        self.tasks = {"work": work, "noop": noop}

    def _run(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.running.append(d)
        return d


def lane_pool() -> FakeTaskPool:
    """A pool of 2 default-lane slots and 1 on lane interactive."""
    return FakeTaskPool(Tasks().tasks, slots=2, lanes={"interactive": 1})


def submitted(pool: FakeTaskPool) -> list[str]:
    """The task of each call that reached the pool, in order."""
    return [call.function for call in pool.calls]


def call(line: Any, function: str) -> Deferred[Any]:
    """One call through a client's line, without arguments or progress."""
    return line.call(function, (), {}, None, None)


def shares_of(kind: str, pool: FakeTaskPool) -> LaneShares | FairShare:
    """The gateway's share of ``pool``: kept per lane, or (as before lanes) one for all."""
    return LaneShares(pool, Clock()) if kind == "lanes" else FairShare(pool, Clock())


@pytest.mark.parametrize(("kind", "at_once"), [("lanes", True), ("one share", False)])
def test_interactive_call_of_a_client_with_a_default_backlog(kind: str, at_once: bool) -> None:
    """A client with 50 default-lane calls beyond its share: its interactive call
    reaches the pool at once with a share per lane; with one share for the whole
    pool it would wait behind the 50."""
    pool = lane_pool()
    client = shares_of(kind, pool).client()
    for _ in range(50):
        call(client, "work")
    before = len(pool.calls)
    assert before == (2 if kind == "lanes" else 3)
    call(client, "noop")
    assert ("noop" in submitted(pool)) is at_once
    assert len(pool.calls) == before + at_once


@pytest.mark.parametrize(("kind", "at_once"), [("lanes", True), ("one share", False)])
def test_interactive_call_of_another_client_with_a_default_backlog(
    kind: str, at_once: bool
) -> None:
    """Two clients each with 50 default-lane calls beyond their shares: the second
    one's interactive call reaches the pool at once with a share per lane; with
    one share for the whole pool it would wait behind its own default calls."""
    pool = lane_pool()
    shares = shares_of(kind, pool)
    first, second = shares.client(), shares.client()
    for _ in range(50):
        call(first, "work")
        call(second, "work")
    call(second, "noop")
    assert ("noop" in submitted(pool)) is at_once


def test_interactive_calls_of_a_busy_and_an_idle_client_go_at_once() -> None:
    """Behind one client's 50 default-lane calls, an interactive call from it and one
    from another client both reach the pool at once, and the default burst stays
    at its share of the default lane."""
    pool = lane_pool()
    shares = LaneShares(pool, Clock())
    busy, idle = shares.client(), shares.client()
    for _ in range(50):
        call(busy, "work")
    call(busy, "noop")
    call(idle, "noop")
    assert submitted(pool) == ["work", "work", "noop", "noop"]
    assert shares.lanes[DEFAULT_LANE].held and not shares.lanes["interactive"].held


def test_each_lane_is_shared_by_its_own_capacity() -> None:
    """A lane's share divides that lane's capacity among the clients calling it."""
    pool = lane_pool()
    shares = LaneShares(pool, Clock())
    one, two = shares.client(), shares.client()
    call(one, "work")
    call(one, "noop")
    assert (shares.lane(DEFAULT_LANE).share(), shares.lane("interactive").share()) == (2, 1)
    call(two, "work")
    assert shares.lane(DEFAULT_LANE).share() == 1
    assert shares.lane("interactive").share() == 1
    assert shares.lane("interactive") is shares.lanes["interactive"]


def test_client_lanes_close_leaves_every_lane() -> None:
    """``ClientLanes.close()`` takes the client out of every lane it called."""
    pool = lane_pool()
    shares = LaneShares(pool, Clock())
    client = shares.client()
    assert isinstance(client, ClientLanes)
    for _ in range(5):
        call(client, "work")
        call(client, "noop")
    assert all(share.active and share.held for share in shares.lanes.values())
    client.close()
    assert set(shares.lanes) == {DEFAULT_LANE, "interactive"}
    for share in shares.lanes.values():
        assert (share.active, share.held) == (set(), set())


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
