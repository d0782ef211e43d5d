"""
Unit tests for :mod:`taskoffload.session`: one client's :class:`GatewaySession`
driven without Autobahn, its messages handed in as bytes and its replies taken
from the ``send`` callable, over a :class:`~taskoffload.testing.FakeTaskPool`
and a ``Clock``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from taskoffload import wire
from taskoffload.fairshare import FairShare
from taskoffload.interfaces import ITaskPool
from taskoffload.session import GatewayLimits, GatewaySession
from taskoffload.stats import GatewayStats
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module


class Client:
    """One session over a pool, and what it sent."""

    def __init__(self, pool: Any = None, share: FairShare | None = None, **limits: int) -> None:
        self.clock = Clock()
        self.pool = pool if pool is not None else FakeTaskPool(clock=self.clock)
        self.share = share if share is not None else FairShare(self.pool, self.clock)
        self.stats = GatewayStats()
        self.sent: list[bytes] = []
        self.session = GatewaySession(
            self.sent.append, self.share, self.stats, GatewayLimits(**limits), self.clock
        )

    def send(self, message: dict[str, Any] | bytes, binary: bool = False) -> None:
        """Hand the session one message, a dict as JSON."""
        payload = message if isinstance(message, bytes) else orjson.dumps(message)
        self.session.received(payload, binary)

    def take(self) -> list[dict[str, Any]]:
        """The replies sent since the last take, decoded."""
        replies = [orjson.loads(payload) for payload in self.sent]
        self.sent.clear()  # in place: the session appends to this list
        return replies


def codes(replies: list[dict[str, Any]]) -> list[tuple[Any, str]]:
    """The id and error code of each reply, which must all be errors."""
    return [(r["id"], r["error"]["code"]) for r in replies]


def test_reply_is_one_json_document_without_newline() -> None:
    """Each reply is handed to send as one JSON document, with no newline."""
    client = Client(FakeTaskPool(tasks={"echo": lambda **kw: kw}))
    client.send({"id": 1, "function": "echo", "args": {"a": 1}})
    assert client.sent == [b'{"id":1,"result":{"a":1}}']


def test_counts_the_client_until_closed() -> None:
    """A session counts its client from its start until its first close."""
    client = Client()
    assert client.stats.clients == 1
    assert client.session.open
    client.session.close()
    client.session.close()
    assert client.stats.clients == 0
    assert not client.session.open


def test_binary_message_refused() -> None:
    """A binary message gets bad_request with id null, counted under "-", and runs nothing."""
    client = Client()
    client.send(b'{"id": 1, "function": "f"}', binary=True)
    assert codes(client.take()) == [(None, wire.BAD_REQUEST)]
    assert client.stats.by_function == {"-": 1}
    assert client.pool.calls == []


def test_auth_line_refused() -> None:
    """An auth line, which is for the worker port, gets bad_request."""
    client = Client()
    client.send({"auth": "x" * 64})
    assert codes(client.take()) == [(None, wire.BAD_REQUEST)]


def test_too_long_told_while_open() -> None:
    """too_long sends bad_request naming the limit; once closed it sends nothing."""
    client = Client(max_message=123)
    client.session.too_long()
    [reply] = client.take()
    assert codes([reply]) == [(None, wire.BAD_REQUEST)]
    assert "123 bytes" in reply["error"]["message"]
    client.session.close()
    client.session.too_long()
    assert client.take() == []


def test_batch_larger_than_the_client_limit_refused() -> None:
    """A batch with more items than a client may have in flight gets bad_request, not overloaded."""
    client = Client(max_inflight_per_client=2)
    client.send({"id": "b", "function": "f", "batch": [{}, {}, {}]})
    [reply] = client.take()
    assert codes([reply]) == [("b", wire.BAD_REQUEST)]
    assert "split it" in reply["error"]["message"]
    assert client.pool.calls == []


def test_overloaded_then_free_again() -> None:
    """Past the per-client limit requests get overloaded; an answer makes room again."""
    client = Client(max_inflight_per_client=1)
    client.send({"id": 1, "function": "f"})
    client.send({"id": 2, "function": "f"})
    assert codes(client.take()) == [(2, wire.OVERLOADED)]
    client.pool.calls[0].succeed(None)
    client.send({"id": 2, "function": "f"})
    assert client.take() == [{"id": 1, "result": None}]
    assert len(client.pool.calls) == 2


def test_idless_replies_wait_for_earlier_ones() -> None:
    """Replies without an id go out in request order, each as soon as those before it have."""
    client = Client()
    for n in range(3):
        client.send({"function": "f", "args": [n]})
    first, second, third = client.pool.calls
    second.succeed(2)
    assert client.take() == []
    first.succeed(1)
    assert client.take() == [{"id": None, "result": 1}, {"id": None, "result": 2}]
    third.succeed(3)
    assert client.take() == [{"id": None, "result": 3}]


def test_batch_streams_counts_then_results() -> None:
    """A batch's items report done/failed/total as each finishes, then all results in order."""
    client = Client()
    client.send({"id": "b", "function": "f", "kwargs": {"k": 0}, "batch": [{"x": 1}, [2]]})
    assert [(c.args, c.kwargs) for c in client.pool.calls] == [
        ((), {"k": 0, "x": 1}),
        ((2,), {"k": 0}),
    ]
    client.pool.calls[1].fail(wire.TASK_FAILED, "no", "KeyError")
    client.pool.calls[0].succeed("yes")
    assert client.take() == [
        {"id": "b", "progress": {"done": 1, "failed": 1, "total": 2}},
        {"id": "b", "progress": {"done": 2, "failed": 1, "total": 2}},
        {
            "id": "b",
            "result": [
                {"result": "yes"},
                {"error": {"code": "task_failed", "message": "no", "type": "KeyError"}},
            ],
        },
    ]
    assert client.stats.inflight == 0


def test_close_cancels_and_silences() -> None:
    """Closing cancels every unfinished call at the pool; their failures send nothing."""
    client = Client()
    client.send({"id": 1, "function": "f"})
    client.send({"function": "f"})
    client.send({"id": "b", "function": "f", "batch": [{}, {}]})
    client.session.close()
    assert [c.cancelled for c in client.pool.calls] == [True] * 4
    assert client.take() == []
    assert client.stats.inflight == 0
    assert client.share.active == set()


def test_latency_measured_on_the_clock() -> None:
    """A reply's latency is the clock's time from the request to the reply."""
    client = Client()
    client.send({"id": 1, "function": "f"})
    client.clock.advance(1.5)
    client.pool.calls[0].succeed(None)
    assert list(client.stats.latencies) == [1.5]
    assert client.stats.by_outcome == {"ok": 1}


@implementer(ITaskPool)
class ScriptedPool:
    """A pool whose send_task does what the test says: raise, or return a Deferred."""

    def __init__(self, send: Callable[[], Deferred[Any]]) -> None:
        self._send = send

    def call(self, function: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self.send_task(function, args, kwargs)

    def send_task(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Any], object] | None = None,
    ) -> Deferred[Any]:
        return self._send()

    def slots(self) -> int | None:
        return None

    def capacity(self) -> int | None:
        return None

    def close(self) -> Deferred[None]:
        return Deferred()


def test_unexpected_pool_failure_is_worker_lost() -> None:
    """A pool that fails with something other than a TaskError gives worker_lost, and is logged."""

    def broken() -> Deferred[Any]:
        raise RuntimeError("out of sockets")

    client = Client(ScriptedPool(broken))
    with capturedLogs() as events:
        client.send({"id": 1, "function": "f"})
    [reply] = client.take()
    assert codes([reply]) == [(1, wire.WORKER_LOST)]
    assert reply["error"]["message"] == "the gateway could not run the task: out of sockets"
    assert "Unexpected failure calling f" in [formatEvent(e) for e in events]
    assert client.stats.by_outcome == {wire.WORKER_LOST: 1}


def test_plain_cancellation_is_cancelled() -> None:
    """A call the pool ends with a bare CancelledError is answered cancelled."""
    client = Client(ScriptedPool(Deferred))
    client.send({"id": "c", "function": "f"})
    client.send({"cancel": "c"})
    assert codes(client.take()) == [("c", wire.CANCELLED)]


def test_sessions_share_the_pool() -> None:
    """Two sessions over one fair share split the pool: the second is not queued behind the first."""
    pool = FakeTaskPool(slots=2)
    clock = Clock()
    share = FairShare(pool, clock)
    busy, other = Client(pool, share), Client(pool, share)
    for n in range(5):
        busy.send({"id": n, "function": "sleep"})
    other.send({"id": "p", "function": "noop"})
    assert [c.function for c in pool.pending] == ["sleep", "sleep", "noop"]


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
