"""
Unit tests of single flight (``"key"``) in the gateway: the clients of one
:class:`~taskoffload.gateway.GatewayFactory` below the WebSocket layer, over
a :class:`~taskoffload.testing.FakeTaskPool` (see :mod:`tests.test_gateway`).
"""

from __future__ import annotations

from taskoffload import wire
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module
from tests.test_gateway import Gateway, error, errors


def test_calls_with_one_key_run_once_and_all_get_the_result() -> None:
    """Five clients' calls of one function and key reach the pool once; each
    gets the progress and the result under its own id."""
    gateway = Gateway()
    peers = [gateway.connect() for _ in range(5)]
    for n, peer in enumerate(peers):
        peer.send({"id": f"r{n}", "function": "f", "args": {"n": n}, "key": "k"})
    [call] = gateway.pool.calls
    assert call.kwargs == {"n": 0}  # the first caller's arguments
    call.progress("half")
    call.succeed("done")
    for n, peer in enumerate(peers):
        assert peer.take() == [
            {"id": f"r{n}", "progress": "half"},
            {"id": f"r{n}", "result": "done"},
        ]
    assert gateway.stats.by_outcome["ok"] == 5


def test_cancel_of_one_caller_leaves_the_others() -> None:
    """A cancel answers that caller cancelled; the run goes on for the others."""
    gateway = Gateway()
    a, b = gateway.connect(), gateway.connect()
    a.send({"id": 1, "function": "f", "key": "k"})
    b.send({"id": 2, "function": "f", "key": "k"})
    b.send({"cancel": 2})
    assert errors(b.take()) == [error(2, wire.CANCELLED)]
    [call] = gateway.pool.calls
    assert not call.cancelled
    call.succeed("x")
    assert a.take() == [{"id": 1, "result": "x"}]
    assert b.take() == []


def test_the_last_caller_leaving_cancels_the_run() -> None:
    """The first caller's cancel leaves the run to the joiner; the joiner's closed
    connection, the last caller, cancels it."""
    gateway = Gateway()
    a, b = gateway.connect(), gateway.connect()
    a.send({"id": 1, "function": "f", "key": "k"})
    b.send({"id": 1, "function": "f", "key": "k"})
    a.send({"cancel": 1})
    [call] = gateway.pool.calls
    assert not call.cancelled
    b.close()
    assert call.cancelled


def test_the_run_outlives_the_client_that_started_it() -> None:
    """A run waiting for the first caller's share goes on after that client has
    gone: its line stays open for it, and the joiner gets the result."""
    gateway = Gateway(FakeTaskPool(slots=1))  # one call at the pool per client at a time
    a, b = gateway.connect(), gateway.connect()
    a.send({"id": 1, "function": "f"})
    a.send({"id": 2, "function": "f", "key": "k"})  # waits in a's line
    b.send({"id": 9, "function": "f", "key": "k"})
    assert len(gateway.pool.calls) == 1
    a.close()  # cancels a's own call; the keyed one has a caller left
    assert gateway.pool.calls[0].cancelled
    [_, shared] = gateway.pool.calls
    shared.succeed("kept")
    assert b.take() == [{"id": 9, "result": "kept"}]


def test_a_run_that_outlives_its_client_keeps_that_clients_share() -> None:
    """A shared run whose first caller has gone still counts in that client's
    share of the pool: another client gets half the pool until it ends."""
    gateway = Gateway(FakeTaskPool(slots=2))
    a, b, c = gateway.connect(), gateway.connect(), gateway.connect()
    a.send({"id": 1, "function": "f", "key": "k"})
    b.send({"id": 1, "function": "f", "key": "k"})
    a.close()
    c.send({"id": 1, "function": "f"})
    c.send({"id": 2, "function": "f"})
    assert len(gateway.pool.calls) == 2  # the run, and one of c's
    gateway.pool.calls[0].succeed("shared")
    assert b.take() == [{"id": 1, "result": "shared"}]
    assert len(gateway.pool.calls) == 3


def test_the_key_is_free_after_the_reply() -> None:
    """Once the run's reply is sent, the same key runs again."""
    gateway = Gateway()
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f", "key": "k"})
    gateway.pool.calls[0].succeed(1)
    peer.send({"id": 2, "function": "f", "key": "k"})
    assert len(gateway.pool.calls) == 2


def test_joiners_count_against_their_own_clients_bound() -> None:
    """A joiner counts against its client's max-inflight-per-client."""
    gateway = Gateway(max_inflight_per_client=1)
    a, b = gateway.connect(), gateway.connect()
    a.send({"id": 1, "function": "f", "key": "k"})
    b.send({"id": 1, "function": "f", "key": "k"})
    b.send({"id": 2, "function": "f", "key": "k"})
    assert errors(b.take()) == [error(2, wire.OVERLOADED)]
    assert len(gateway.pool.calls) == 1


def test_joiners_count_against_max_pending() -> None:
    """A joiner counts against the gateway's max-pending."""
    gateway = Gateway(max_pending=1)
    a, b = gateway.connect(), gateway.connect()
    a.send({"id": 1, "function": "f", "key": "k"})
    b.send({"id": 1, "function": "f", "key": "k"})
    assert errors(b.take()) == [error(1, wire.OVERLOADED)]


testSuite = pytest_module(__file__)
