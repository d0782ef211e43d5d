"""
Unit tests for :mod:`taskoffload.gateway`.

Most tests drive a ``GatewayProtocol`` below the WebSocket layer: the protocol sits
on a ``StringTransport``, its ``sendMessage`` is replaced by a recorder of the decoded
replies, and the tests call ``onOpen``, ``onMessage`` and ``onClose`` as Autobahn
would, with a :class:`~taskoffload.testing.FakeTaskPool` behind it.  A few run real
Autobahn framing over the ``StringTransport``, with txaio's timers on a ``Clock``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

import orjson
import pytest
import txaio
from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from taskoffload import fairshare, ingest, wire
from taskoffload.gateway import GatewayFactory, GatewayLimits, GatewayProtocol, GatewayStats
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module


def echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs


class Peer:
    """One WebSocket client of the gateway, below the framing: replies decoded."""

    def __init__(self, factory: GatewayFactory) -> None:
        self.protocol: GatewayProtocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.transport = self.transport
        self.replies: list[dict[str, Any]] = []
        self.protocol.sendMessage = self._record  # type: ignore[method-assign]
        self.protocol.onOpen()

    def _record(self, payload: bytes, isBinary: bool = False, *args: Any, **kw: Any) -> None:
        assert not isBinary, "replies go in text frames"
        self.replies.append(orjson.loads(payload))

    def send(self, message: dict[str, Any] | bytes, binary: bool = False) -> None:
        """Deliver one frame's payload, a dict sent as JSON."""
        payload = message if isinstance(message, bytes) else orjson.dumps(message)
        self.protocol.onMessage(payload, binary)

    def take(self) -> list[dict[str, Any]]:
        """The replies received since the last take."""
        replies, self.replies = self.replies, []
        return replies

    def close(self) -> None:
        """The connection goes away."""
        self.protocol.onClose(False, 1006, "connection lost")


class Gateway:
    """
    A gateway factory over a scripted fake pool, a clock and its stats.  The
    default pool has not said its size, as a client not yet connected, and runs
    its timeouts on the gateway's clock.
    """

    def __init__(self, pool: FakeTaskPool | None = None, **limits: int) -> None:
        self.clock = Clock()
        self.pool = pool if pool is not None else FakeTaskPool(clock=self.clock)
        self.stats = GatewayStats()
        self.factory = GatewayFactory(
            self.pool, clock=self.clock, limits=GatewayLimits(**limits), stats=self.stats
        )

    def connect(self) -> Peer:
        """A new client."""
        return Peer(self.factory)


@pytest.fixture
def gateway() -> Gateway:
    """A gateway over a scripted pool, with default limits."""
    return Gateway()


def error(request_id: Any, code: str) -> dict[str, Any]:
    """A matcher for an error reply: compares id and code, not the message."""
    return {"id": request_id, "code": code}


def errors(replies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The id and code of each reply, which must all be errors."""
    return [{"id": r["id"], "code": r["error"]["code"]} for r in replies]


# Single requests


def test_result_reply_carries_id() -> None:
    """A request's result comes back with its id."""
    peer = Gateway(FakeTaskPool(tasks={"echo": echo})).connect()
    peer.send({"id": "a1", "function": "echo", "args": {"x": 1}})
    assert peer.take() == [{"id": "a1", "result": {"x": 1}}]


def test_a_burst_on_one_connection_does_not_hold_another_connections_message() -> None:
    """200 messages on one connection in one turn, then one on another: the other's
    call reaches the pool right after the turn's share (taskoffload.ingest), long
    before the burst's last, and every message is still answered, in order."""
    gateway = Gateway(FakeTaskPool(tasks={"echo": echo}, slots=1000))
    burst, probe = gateway.connect(), gateway.connect()
    for n in range(200):
        burst.send({"id": n, "function": "echo", "args": {"n": n}})
    probe.send({"id": "p", "function": "echo", "args": {"n": "probe"}})
    assert len(gateway.pool.calls) == ingest.PER_TURN
    gateway.clock.advance(0)
    order = [call.kwargs["n"] for call in gateway.pool.calls]
    assert order.index("probe") <= ingest.PER_TURN + 1, order[: ingest.PER_TURN + 5]
    assert [reply["id"] for reply in burst.take()] == list(range(200))
    assert probe.take() == [{"id": "p", "result": {"n": "probe"}}]


def test_request_reaches_pool(gateway: Gateway) -> None:
    """The pool gets the request's function, arguments and timeout."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f", "args": [1, 2], "kwargs": {"k": 3}, "timeout": 5})
    [call] = gateway.pool.calls
    assert (call.function, call.args, call.kwargs, call.timeout) == ("f", (1, 2), {"k": 3}, 5.0)
    assert peer.take() == []


def test_progress_forwarded(gateway: Gateway) -> None:
    """Progress the task reports reaches the client, with the id, before the result."""
    peer = gateway.connect()
    peer.send({"id": 7, "function": "f"})
    call = gateway.pool.calls[0]
    call.progress({"done": 1})
    call.progress({"done": 2})
    call.succeed("ok")
    assert peer.take() == [
        {"id": 7, "progress": {"done": 1}},
        {"id": 7, "progress": {"done": 2}},
        {"id": 7, "result": "ok"},
    ]


def test_task_error_reply(gateway: Gateway) -> None:
    """A TaskError from the pool becomes an error reply with its code, message and type."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    peer.send({"id": 2, "function": "f"})
    gateway.pool.calls[0].fail(wire.TASK_FAILED, "boom", "ValueError")
    gateway.pool.calls[1].fail(wire.UNKNOWN_FUNCTION, "no task named 'f'")
    assert peer.take() == [
        {"id": 1, "error": {"code": "task_failed", "message": "boom", "type": "ValueError"}},
        {"id": 2, "error": {"code": "unknown_function", "message": "no task named 'f'"}},
    ]


def test_pool_timeout_reply(gateway: Gateway) -> None:
    """A call the pool times out is answered timeout, with the pool's message."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f", "timeout": 2})
    gateway.clock.advance(2)
    assert peer.take() == [
        {"id": 1, "error": {"code": "timeout", "message": "no reply within 2 seconds"}}
    ]
    assert gateway.stats.by_outcome == {"timeout": 1}


def test_binary_frame_is_bad_request(gateway: Gateway) -> None:
    """A binary frame gets bad_request with id null, and reaches no task."""
    peer = gateway.connect()
    peer.send(b'{"id": 1, "function": "f"}', binary=True)
    assert errors(peer.take()) == [error(None, wire.BAD_REQUEST)]
    assert gateway.pool.calls == []


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"[1, 2]", b"", b'"text"', b'{"id": [1], "function": "f"}'],
)
def test_unreadable_request_is_bad_request(gateway: Gateway, payload: bytes) -> None:
    """A frame that is not a request object gets bad_request with id null."""
    peer = gateway.connect()
    peer.send(payload)
    assert errors(peer.take()) == [error(None, wire.BAD_REQUEST)]
    assert gateway.pool.calls == []


def test_bad_request_with_readable_id(gateway: Gateway) -> None:
    """A malformed request whose id could be read gets bad_request with that id."""
    peer = gateway.connect()
    peer.send({"id": "x", "args": {}})
    assert errors(peer.take()) == [error("x", wire.BAD_REQUEST)]


def test_session_line_refused(gateway: Gateway) -> None:
    """Session options, which are for the worker port, get bad_request."""
    peer = gateway.connect()
    peer.send({"session": {"reject_when_busy": True}})
    assert errors(peer.take()) == [error(None, wire.BAD_REQUEST)]


def test_duplicate_inflight_id(gateway: Gateway) -> None:
    """A second request with an id in flight is refused; the first is still answered."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    peer.send({"id": 1, "function": "g"})
    assert errors(peer.take()) == [error(1, wire.BAD_REQUEST)]
    assert [call.function for call in gateway.pool.calls] == ["f"]
    gateway.pool.calls[0].succeed("first")
    assert peer.take() == [{"id": 1, "result": "first"}]


def test_id_reusable_once_answered(gateway: Gateway) -> None:
    """An id may be used again once its request is answered."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    gateway.pool.calls[0].succeed(1)
    peer.send({"id": 1, "function": "f"})
    gateway.pool.calls[1].succeed(2)
    assert peer.take() == [{"id": 1, "result": 1}, {"id": 1, "result": 2}]


def test_ids_are_per_connection(gateway: Gateway) -> None:
    """Two clients may use the same id at once."""
    first, second = gateway.connect(), gateway.connect()
    first.send({"id": 1, "function": "f"})
    second.send({"id": 1, "function": "f"})
    gateway.pool.calls[1].succeed("second")
    gateway.pool.calls[0].succeed("first")
    assert first.take() == [{"id": 1, "result": "first"}]
    assert second.take() == [{"id": 1, "result": "second"}]


def test_cancel(gateway: Gateway) -> None:
    """A cancel cancels the call at the pool, and the request is answered cancelled."""
    peer = gateway.connect()
    peer.send({"id": "c", "function": "f"})
    peer.send({"cancel": "c"})
    assert gateway.pool.calls[0].cancelled
    assert errors(peer.take()) == [error("c", wire.CANCELLED)]


def test_cancel_unknown_id_ignored(gateway: Gateway) -> None:
    """A cancel of an id not in flight changes nothing and gets no reply."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    peer.send({"cancel": 2})
    assert peer.take() == []
    assert not gateway.pool.calls[0].cancelled
    gateway.pool.calls[0].succeed(None)
    assert peer.take() == [{"id": 1, "result": None}]


def test_idless_replies_in_request_order(gateway: Gateway) -> None:
    """Requests without an id are answered in request order, whatever order they finish in."""
    peer = gateway.connect()
    for n in range(3):
        peer.send({"function": "f", "args": [n]})
    first, second, third = gateway.pool.calls
    third.succeed(3)
    second.fail(wire.TASK_FAILED, "two", "KeyError")
    assert peer.take() == []
    first.succeed(1)
    assert peer.take() == [
        {"id": None, "result": 1},
        {"id": None, "error": {"code": "task_failed", "message": "two", "type": "KeyError"}},
        {"id": None, "result": 3},
    ]


def test_replies_with_ids_not_held_back(gateway: Gateway) -> None:
    """A request with an id is answered when it finishes, ahead of earlier ones."""
    peer = gateway.connect()
    peer.send({"function": "f"})
    peer.send({"id": "late", "function": "f"})
    gateway.pool.calls[1].succeed("now")
    assert peer.take() == [{"id": "late", "result": "now"}]
    gateway.pool.calls[0].succeed("then")
    assert peer.take() == [{"id": None, "result": "then"}]


# Batches


def test_batch_progress_and_result_in_item_order(gateway: Gateway) -> None:
    """A batch streams growing done/failed/total counts, then results in item order."""
    peer = gateway.connect()
    peer.send({"id": "b", "function": "f", "batch": [{"x": 0}, [1], {"x": 2}]})
    calls = gateway.pool.calls
    assert [(c.args, c.kwargs) for c in calls] == [((), {"x": 0}), ((1,), {}), ((), {"x": 2})]
    calls[2].succeed("two")
    calls[0].fail(wire.TASK_FAILED, "zero", "ValueError")
    calls[1].succeed("one")
    replies = peer.take()
    assert replies[:-1] == [
        {"id": "b", "progress": {"done": 1, "failed": 0, "total": 3}},
        {"id": "b", "progress": {"done": 2, "failed": 1, "total": 3}},
        {"id": "b", "progress": {"done": 3, "failed": 1, "total": 3}},
    ]
    assert replies[-1] == {
        "id": "b",
        "result": [
            {"error": {"code": "task_failed", "message": "zero", "type": "ValueError"}},
            {"result": "one"},
            {"result": "two"},
        ],
    }


def test_a_batch_item_lost_with_its_worker_says_why(gateway: Gateway) -> None:
    """A batch item answered worker_lost keeps the cause in its place in the result,
    as a single request's error does."""
    peer = gateway.connect()
    peer.send({"id": "b", "function": "f", "batch": [{}, {}]})
    peer.send({"id": "s", "function": "f"})
    cause = {"exit_status": 3, "rss_mib": 41.2}
    first, second, single = gateway.pool.calls
    first.fail(wire.WORKER_LOST, "worker 7 died: exit status 3", cause=cause)
    second.succeed(2)
    single.fail(wire.WORKER_LOST, "worker 7 died: exit status 3", cause=cause)
    lost = {"code": "worker_lost", "message": "worker 7 died: exit status 3", "cause": cause}
    replies = peer.take()
    assert {"id": "b", "result": [{"error": lost}, {"result": 2}]} in replies
    assert {"id": "s", "error": lost} in replies


def test_batch_bad_item(gateway: Gateway) -> None:
    """A batch item neither object nor list gets bad_request in its place; the rest run."""
    peer = gateway.connect()
    peer.send({"id": "b", "function": "f", "batch": [{"x": 1}, 5, "s"]})
    assert len(gateway.pool.calls) == 1
    gateway.pool.calls[0].succeed("fine")
    final = peer.take()[-1]
    assert final["id"] == "b"
    assert final["result"][0] == {"result": "fine"}
    assert [item["error"]["code"] for item in final["result"][1:]] == ["bad_request"] * 2


def test_batch_with_tasks_answered_at_once() -> None:
    """A batch whose items all finish at once is answered completely."""
    peer = Gateway(FakeTaskPool(tasks={"echo": echo})).connect()
    peer.send({"id": 1, "function": "echo", "batch": [{"a": 1}, {"a": 2}]})
    assert peer.take()[-1] == {"id": 1, "result": [{"result": {"a": 1}}, {"result": {"a": 2}}]}


def test_empty_batch_is_bad_request(gateway: Gateway) -> None:
    """An empty batch gets bad_request."""
    peer = gateway.connect()
    peer.send({"id": "b", "function": "f", "batch": []})
    assert errors(peer.take()) == [error("b", wire.BAD_REQUEST)]


def test_cancel_batch(gateway: Gateway) -> None:
    """Cancelling a batch cancels its unfinished items; finished ones keep their results."""
    peer = gateway.connect()
    peer.send({"id": "b", "function": "f", "batch": [{}, {}]})
    gateway.pool.calls[0].succeed("done")
    peer.send({"cancel": "b"})
    assert [c.cancelled for c in gateway.pool.calls] == [False, True]
    final = peer.take()[-1]
    assert final["result"][0] == {"result": "done"}
    assert final["result"][1]["error"]["code"] == wire.CANCELLED


# Limits


def test_per_client_inflight_limit() -> None:
    """Requests past the per-client limit get overloaded until some are answered."""
    gateway = Gateway(max_inflight_per_client=2)
    peer, other = gateway.connect(), gateway.connect()
    peer.send({"id": 1, "function": "f"})
    peer.send({"id": 2, "function": "f"})
    peer.send({"id": 3, "function": "f"})
    assert errors(peer.take()) == [error(3, wire.OVERLOADED)]
    other.send({"id": 1, "function": "f"})
    assert other.take() == []
    gateway.pool.calls[0].succeed(None)
    peer.send({"id": 3, "function": "f"})
    assert peer.take() == [{"id": 1, "result": None}]
    assert len(gateway.pool.calls) == 4


def test_per_client_limit_counts_batch_items() -> None:
    """Batch items count toward the per-client limit."""
    gateway = Gateway(max_inflight_per_client=3)
    peer = gateway.connect()
    peer.send({"id": "b", "function": "f", "batch": [{}, {}]})
    peer.send({"id": "c", "function": "f", "batch": [{}, {}]})
    peer.send({"id": 1, "function": "f"})
    peer.send({"id": 2, "function": "f"})
    assert errors(peer.take()) == [error("c", wire.OVERLOADED), error(2, wire.OVERLOADED)]
    assert len(gateway.pool.calls) == 3


def test_global_pending_limit() -> None:
    """Requests past max_pending over all clients get overloaded."""
    gateway = Gateway(max_pending=2)
    first, second = gateway.connect(), gateway.connect()
    first.send({"id": 1, "function": "f"})
    second.send({"id": 1, "function": "f"})
    second.send({"id": 2, "function": "f"})
    first.send({"id": "b", "function": "f", "batch": [{}]})
    assert errors(second.take()) == [error(2, wire.OVERLOADED)]
    assert errors(first.take()) == [error("b", wire.OVERLOADED)]
    assert len(gateway.pool.calls) == 2
    gateway.pool.calls[0].succeed(None)
    first.take()
    second.send({"id": 3, "function": "f", "batch": [{}, {}]})
    second.send({"id": 4, "function": "f"})
    assert errors(second.take()) == [error(3, wire.OVERLOADED)]
    assert len(gateway.pool.calls) == 3


# Connection life


def test_registers_read_pauser(gateway: Gateway) -> None:
    """When the client's write buffer fills, the gateway stops reading its requests."""
    peer = gateway.connect()
    assert peer.transport.streaming
    producer = peer.transport.producer
    producer.pauseProducing()
    assert peer.transport.producerState == "paused"
    producer.resumeProducing()
    assert peer.transport.producerState == "producing"


@implementer(IPushProducer)
class ChannelProducer:
    """Stands in for twisted.web's HTTPChannel, still the transport's producer."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def test_takes_over_existing_producer(gateway: Gateway) -> None:
    """onOpen replaces a producer left registered by the HTTP channel it took over from."""
    protocol = gateway.factory.buildProtocol(None)
    transport = StringTransport()
    transport.registerProducer(ChannelProducer(), True)
    protocol.transport = transport
    protocol.onOpen()
    assert not isinstance(transport.producer, ChannelProducer)
    transport.producer.pauseProducing()
    assert transport.producerState == "paused"


def test_close_cancels_inflight(gateway: Gateway) -> None:
    """A client that goes away has its unfinished calls cancelled, and gets nothing more."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    peer.send({"function": "f"})
    peer.send({"id": "b", "function": "f", "batch": [{}, {}]})
    gateway.pool.calls[0].succeed("answered")
    peer.take()
    peer.close()
    assert [c.cancelled for c in gateway.pool.calls] == [False, True, True, True]
    assert peer.take() == []
    assert gateway.stats.clients == 0
    assert gateway.stats.inflight == 0


def test_nothing_sent_after_close(gateway: Gateway) -> None:
    """Nothing is sent to a client after it has gone, not even late progress."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    call = gateway.pool.calls[0]
    # The gateway's progress callback, as the pool would call it late (the fake's
    # own progress() drops reports once the call is cancelled, so call it directly).
    forward = cast(Callable[[Any], object], call.on_progress)
    forward("early")
    assert peer.take() == [{"id": 1, "progress": "early"}]
    peer.close()
    forward("late")
    assert peer.take() == []


def test_close_twice_counts_once(gateway: Gateway) -> None:
    """A second onClose does not count the client twice."""
    peer = gateway.connect()
    peer.close()
    peer.close()
    assert gateway.stats.clients == 0


def test_close_before_open(gateway: Gateway) -> None:
    """A connection that closes before its handshake finished changes no counts."""
    protocol = gateway.factory.buildProtocol(None)
    protocol.onClose(False, 1006, "handshake failed")
    assert gateway.stats.clients == 0


def test_oversize_reply_before_failing(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failing the connection for an oversize message (1009) first sends bad_request."""
    peer = gateway.connect()
    events: list[Any] = []
    peer.protocol.sendMessage = lambda payload, *a, **kw: events.append(  # type: ignore[method-assign]
        orjson.loads(payload)
    )
    monkeypatch.setattr(
        WebSocketServerProtocol,
        "_fail_connection",
        lambda self, code=1001, reason="": events.append(("failed", code)),
    )
    peer.protocol._fail_connection(1009, "too big")
    assert errors(events[:1]) == [error(None, wire.BAD_REQUEST)]
    assert "1048576 bytes" in events[0]["error"]["message"]
    assert events[1:] == [("failed", 1009)]


def test_other_failures_send_nothing(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failing the connection for other reasons sends no reply."""
    peer = gateway.connect()
    failed: list[int] = []
    monkeypatch.setattr(
        WebSocketServerProtocol,
        "_fail_connection",
        lambda self, code=1001, reason="": failed.append(code),
    )
    peer.protocol._fail_connection(1002, "protocol error")
    assert peer.take() == []
    assert failed == [1002]


# Stats


def test_stats_count_clients_and_inflight(gateway: Gateway) -> None:
    """Stats count connected clients and requests in flight, batch items included."""
    first, second = gateway.connect(), gateway.connect()
    first.send({"id": 1, "function": "f"})
    second.send({"id": 1, "function": "g", "batch": [{}, {}]})
    assert (gateway.stats.clients, gateway.stats.inflight) == (2, 3)
    for call in gateway.pool.calls:
        call.succeed(None)
    first.close()
    assert (gateway.stats.clients, gateway.stats.inflight) == (1, 0)


def test_stats_totals_and_latency(gateway: Gateway) -> None:
    """Stats count replies by function and outcome, and time them on the clock."""
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    gateway.clock.advance(0.25)
    peer.send({"id": 2, "function": "g"})
    gateway.pool.calls[0].succeed(None)
    gateway.clock.advance(0.5)
    gateway.pool.calls[1].fail(wire.TIMEOUT, "too slow")
    peer.send(b"junk")
    document = gateway.stats.to_json()
    assert document["requests"] == 3
    assert document["by_function"] == {"f": 1, "g": 1, "-": 1}
    assert document["by_outcome"] == {"ok": 1, "timeout": 1, "bad_request": 1}
    assert document["latency"] == {
        "p50_ms": 500.0,
        "p90_ms": 500.0,
        "p99_ms": 500.0,
        "max_ms": 500.0,
    }
    assert sorted(gateway.stats.latencies) == [0.25, 0.5]


def test_stats_count_overloaded() -> None:
    """An overloaded reply is counted under its function, without a latency."""
    gateway = Gateway(max_inflight_per_client=1)
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    peer.send({"id": 2, "function": "f"})
    assert gateway.stats.by_outcome == {"overloaded": 1}
    assert gateway.stats.by_function == {"f": 1}
    assert list(gateway.stats.latencies) == []


# Real framing


@pytest.fixture
def txaio_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """Autobahn's timers (through txaio) on a Clock instead of the global reactor."""
    clock = Clock()
    monkeypatch.setattr(txaio.config, "loop", clock)
    yield clock


def handshake(protocol: GatewayProtocol, transport: StringTransport) -> None:
    """Connect ``protocol`` to ``transport`` and complete the opening handshake."""
    protocol.makeConnection(transport)
    key = base64.b64encode(os.urandom(16))
    protocol.dataReceived(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    transport.clear()


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One final, masked client frame."""
    mask = os.urandom(4)
    size = len(payload)
    if size < 126:
        header = bytes([0x80 | opcode, 0x80 | size])
    else:
        header = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames into (opcode, payload)."""
    frames = []
    while data:
        opcode, size = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if size == 126:
            size, start = int.from_bytes(data[2:4], "big"), 4
        frames.append((opcode, data[start : start + size]))
        data = data[start + size :]
    return frames


def test_framed_request_and_reply(txaio_clock: Clock) -> None:
    """Over real WebSocket framing, a text frame request gets a text frame reply."""
    gateway = Gateway(FakeTaskPool(tasks={"echo": echo}))
    protocol = gateway.factory.buildProtocol(None)
    transport = StringTransport()
    handshake(protocol, transport)
    protocol.dataReceived(client_frame(b'{"id": 1, "function": "echo", "args": {"a": 1}}'))
    assert server_frames(transport.value()) == [(1, b'{"id":1,"result":{"a":1}}')]


def test_framed_oversize_message(txaio_clock: Clock) -> None:
    """A message over max_message gets bad_request, then a 1009 close, and runs no task."""
    gateway = Gateway(max_message=100)
    protocol = gateway.factory.buildProtocol(None)
    transport = StringTransport()
    handshake(protocol, transport)
    protocol.dataReceived(client_frame(b'{"function": "f", "args": ["' + b"x" * 200 + b'"]}'))
    (text_opcode, text), (close_opcode, close) = server_frames(transport.value())
    assert (text_opcode, close_opcode) == (1, 8)
    reply = orjson.loads(text)
    assert errors([reply]) == [error(None, wire.BAD_REQUEST)]
    assert "100 bytes" in reply["error"]["message"]
    assert int.from_bytes(close[:2], "big") == 1009
    assert gateway.pool.calls == []


# Fair admission


def test_share_before_the_pool_says_its_size(gateway: Gateway) -> None:
    """Until the pool says its size, a lone client has FIRST_SHARE calls at the pool at once."""
    peer = gateway.connect()
    for n in range(fairshare.FIRST_SHARE + 2):
        peer.send({"id": n, "function": "noop"})
    gateway.clock.advance(0)  # the turns that take the messages beyond one turn's share
    assert len(gateway.pool.pending) == fairshare.FIRST_SHARE
    gateway.pool.pending[0].succeed(None)
    assert len(gateway.pool.pending) == fairshare.FIRST_SHARE
    assert peer.take() == [{"id": 0, "result": None}]


def test_one_client_gets_no_more_than_the_pool_slots_at_once() -> None:
    """A lone client's burst goes to the pool a slot's worth at a time, in order."""
    gateway = Gateway(FakeTaskPool(slots=2))
    peer = gateway.connect()
    for n in range(5):
        peer.send({"id": n, "function": "noop"})
    assert len(gateway.pool.pending) == 2
    gateway.pool.pending[0].succeed(None)
    assert len(gateway.pool.pending) == 2
    for _ in range(4):
        gateway.pool.pending[0].succeed(None)
    assert [r["id"] for r in peer.take()] == [0, 1, 2, 3, 4]


def test_another_clients_call_is_not_queued_behind_a_burst() -> None:
    """While one client's burst fills the pool, another client's call goes next."""
    gateway = Gateway(FakeTaskPool(slots=2))
    burst = gateway.connect()
    for n in range(10):
        burst.send({"id": n, "function": "sleep"})
    probe = gateway.connect()
    probe.send({"id": "p", "function": "noop"})
    functions = [call.function for call in gateway.pool.pending]
    assert functions == ["sleep", "sleep", "noop"]


def test_share_follows_a_prefetching_pools_capacity() -> None:
    """A pool that takes more calls than it has slots (prefetch) gets that many from a client."""
    gateway = Gateway(FakeTaskPool(slots=2, prefetch=1))
    peer = gateway.connect()
    for n in range(6):
        peer.send({"id": n, "function": "noop"})
    assert len(gateway.pool.pending) == 4


def test_a_client_that_finishes_lets_the_others_take_its_share() -> None:
    """When a client has nothing left to send, the others' waiting calls take its slots at once."""
    gateway = Gateway(FakeTaskPool(slots=4))
    short, long = gateway.connect(), gateway.connect()
    for n in range(2):
        short.send({"id": n, "function": "noop"})
    for n in range(6):
        long.send({"id": n, "function": "sleep"})
    assert [c.function for c in gateway.pool.pending] == ["noop", "noop", "sleep", "sleep"]
    # The short client's calls finish; it has nothing waiting: the long one's share
    # grows to all 4 slots, and it takes them now rather than when its own calls end.
    gateway.pool.pending[0].succeed(None)
    gateway.pool.pending[0].succeed(None)
    assert [c.function for c in gateway.pool.pending] == ["sleep"] * 4


def test_waiting_call_times_out_and_can_be_cancelled() -> None:
    """A call still waiting for its share fails with its timeout, or on cancel."""
    gateway = Gateway(FakeTaskPool(slots=1))
    peer = gateway.connect()
    peer.send({"id": 1, "function": "sleep"})
    peer.send({"id": 2, "function": "noop", "timeout": 5})
    peer.send({"id": 3, "function": "noop"})
    peer.send({"cancel": 3})
    gateway.clock.advance(5)
    assert errors(peer.take()) == [error(3, "cancelled"), error(2, "timeout")]
    assert len(gateway.pool.pending) == 1


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
