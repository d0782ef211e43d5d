"""
Unit tests for :mod:`taskoffload.fairshare`: the pool's capacity divided among
the clients with calls (:class:`FairShare`), and each client's line of calls
waiting for its share (:class:`ClientLine`), over a
:class:`~taskoffload.testing.FakeTaskPool` and a ``Clock``.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.errors import TaskError
from taskoffload.fairshare import FIRST_SHARE, ClientLine, FairShare
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module


def share_of(slots: int | None = None, prefetch: int = 0) -> tuple[FairShare, FakeTaskPool, Clock]:
    """A fair share of a scripted pool with ``slots``, on a clock."""
    clock = Clock()
    pool = FakeTaskPool(slots=slots, prefetch=prefetch)
    return FairShare(pool, clock), pool, clock


def outcomes(d: Deferred[Any]) -> list[Any]:
    """What ``d`` fires with, as it fires: a result, or a Failure (then handled)."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def call(line: ClientLine, function: str = "f", timeout: float | None = None) -> Deferred[Any]:
    """One call through ``line``, without arguments or progress."""
    return line.call(function, (), {}, timeout, None)


def error_code(outcome: Any) -> str:
    """The TaskError code of a failed outcome."""
    assert isinstance(outcome, Failure)
    error = outcome.value
    assert isinstance(error, TaskError)
    return error.code


# FairShare.share


def test_first_share_until_the_pool_says() -> None:
    """Before the pool says its capacity, a lone client's share is FIRST_SHARE."""
    share, _pool, _clock = share_of()
    assert share.share() == FIRST_SHARE


@pytest.mark.parametrize(
    ("slots", "prefetch", "clients", "expected"),
    [(4, 0, 1, 4), (4, 0, 2, 2), (4, 0, 3, 2), (2, 0, 5, 1), (2, 1, 1, 4), (2, 1, 3, 2)],
)
def test_share_divides_capacity(slots: int, prefetch: int, clients: int, expected: int) -> None:
    """The pool's capacity is divided among the active clients, rounded up, at least 1 each."""
    share, _pool, _clock = share_of(slots, prefetch)
    for _ in range(clients):
        call(share.client())
    assert len(share.active) == clients
    assert share.share() == expected


# ClientLine


def test_calls_beyond_the_share_wait_in_order() -> None:
    """A client's calls beyond its share wait, and go in order as earlier ones finish."""
    share, pool, _clock = share_of(slots=2)
    line = share.client()
    results = [outcomes(call(line, f"f{n}")) for n in range(4)]
    assert [c.function for c in pool.pending] == ["f0", "f1"]
    assert share.held == {line}
    pool.pending[0].succeed("zero")
    assert [c.function for c in pool.pending] == ["f1", "f2"]
    assert results[0] == ["zero"]
    for _ in range(3):
        pool.pending[0].succeed(None)
    assert [len(r) for r in results] == [1, 1, 1, 1]
    assert share.active == set() and share.held == set()


def test_the_pool_gets_the_call() -> None:
    """The pool gets the call's function, arguments, progress callable and timeout."""
    share, pool, _clock = share_of(slots=1)
    progress: list[Any] = []
    share.client().call("f", (1,), {"k": 2}, 5.0, progress.append)
    [made] = pool.calls
    assert (made.function, made.args, made.kwargs, made.timeout) == ("f", (1,), {"k": 2}, 5.0)
    made.progress("half")
    assert progress == ["half"]


def test_waiting_counts_against_the_timeout() -> None:
    """A call that waited for its share goes to the pool with what is left of its timeout."""
    share, pool, clock = share_of(slots=1)
    line = share.client()
    call(line, "first")
    call(line, "second", timeout=5)
    clock.advance(2)
    pool.pending[0].succeed(None)
    [waited] = pool.pending
    assert (waited.function, waited.timeout) == ("second", 3.0)


def test_waiting_call_times_out() -> None:
    """A call still waiting when its timeout passes fails with timeout, and never reaches the pool."""
    share, pool, clock = share_of(slots=1)
    line = share.client()
    call(line, "first")
    waiting = outcomes(call(line, "second", timeout=5))
    clock.advance(5)
    assert [error_code(o) for o in waiting] == [wire.TIMEOUT]
    assert "no worker was free in time" in str(waiting[0].value)
    assert [c.function for c in pool.calls] == ["first"]
    assert share.held == set()
    assert clock.getDelayedCalls() == []


def test_admitted_call_stops_its_waiting_timer() -> None:
    """A call admitted before its timeout leaves no timer of the line's behind."""
    share, pool, clock = share_of(slots=1)
    line = share.client()
    call(line, "first")
    call(line, "second", timeout=5)
    pool.pending[0].succeed(None)
    assert clock.getDelayedCalls() == []


def test_cancel_waiting_call() -> None:
    """Cancelling a waiting call fails it with cancelled; the pool never sees it."""
    share, pool, _clock = share_of(slots=1)
    line = share.client()
    call(line, "first")
    d = call(line, "second")
    seen = outcomes(d)
    d.cancel()
    assert [error_code(o) for o in seen] == [wire.CANCELLED]
    assert [c.function for c in pool.calls] == ["first"]


def test_cancel_call_at_the_pool() -> None:
    """Cancelling a call at the pool cancels it there, and the pool's failure comes back."""
    share, pool, _clock = share_of(slots=1)
    d = call(share.client())
    seen = outcomes(d)
    d.cancel()
    assert pool.calls[0].cancelled
    assert [error_code(o) for o in seen] == [wire.CANCELLED]


def test_pool_failure_passed_on() -> None:
    """A call the pool fails fails with the pool's TaskError."""
    share, pool, _clock = share_of(slots=1)
    seen = outcomes(call(share.client()))
    pool.calls[0].fail(wire.TASK_FAILED, "boom", "ValueError")
    assert [error_code(o) for o in seen] == [wire.TASK_FAILED]


def test_a_new_client_goes_before_a_burst() -> None:
    """While one client's burst fills the pool, another client's call is admitted next."""
    share, pool, _clock = share_of(slots=2)
    burst, probe = share.client(), share.client()
    for _ in range(10):
        call(burst, "sleep")
    call(probe, "noop")
    assert [c.function for c in pool.pending] == ["sleep", "sleep", "noop"]


def test_a_client_done_lets_held_ones_take_its_slots() -> None:
    """When a client has no calls left, held clients take the slots it freed at once."""
    share, pool, _clock = share_of(slots=4)
    short, long = share.client(), share.client()
    for _ in range(2):
        call(short, "noop")
    for _ in range(6):
        call(long, "sleep")
    assert share.held == {long}
    pool.pending[0].succeed(None)
    pool.pending[0].succeed(None)
    assert [c.function for c in pool.pending] == ["sleep"] * 4
    assert share.active == {long}


def test_closed_line_leaves_the_share() -> None:
    """A closed line no longer counts among the clients, and admit() does nothing for it."""
    share, pool, _clock = share_of(slots=1)
    gone, other = share.client(), share.client()
    call(gone, "a")
    call(gone, "b")
    call(other, "c")
    assert share.share() == 1
    gone.close()
    assert share.active == {other}
    assert share.held == set()
    gone.admit()
    assert [c.function for c in pool.calls] == ["a", "c"]


class GrowingPool(FakeTaskPool):
    """A scripted pool whose capacity the test sets, as a client that learns of more workers."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.size = capacity

    def capacity(self) -> int | None:
        return self.size


def test_admit_held_admits_what_shares_allow() -> None:
    """admit_held lets each held client submit what its share now allows."""
    pool = GrowingPool(1)
    share = FairShare(pool, Clock())
    first, second = share.client(), share.client()
    for _ in range(3):
        call(first, "first")
    call(second, "second")
    assert [c.function for c in pool.pending] == ["first", "second"]
    assert share.held == {first}
    pool.size = 4
    share.admit_held()
    assert [c.function for c in pool.pending] == ["first", "second", "first"]


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
