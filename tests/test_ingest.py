"""
Fair ingest (:class:`taskoffload.ingest.FairIngest`): a bounded number of
messages per reactor turn, the connections taking turns, and a connection with
too many waiting paused.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.task import Clock

from taskoffload.ingest import FairIngest
from tests._trial_bridge import pytest_module


class Turns(Clock):
    """
    A clock whose :meth:`turn` runs what was due when it was called, and not
    what that schedules for the same time: one reactor turn each.
    (``Clock.advance(0)`` would run those too.)
    """

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class Source:
    """A connection: records whether its reading is paused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.paused = False
        self.pauses = 0

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False

    def __repr__(self) -> str:
        return self.name


def recorder(handled: list[tuple[str, int]], source: Source, n: int) -> Callable[[], None]:
    """:return: a handler that records ``(source, n)`` when called."""
    return lambda: handled.append((source.name, n))


def test_messages_within_the_share_are_handled_at_once() -> None:
    """Below ``per_turn`` messages in a turn, each is handled as it arrives, in order."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=4)
    a = Source("a")
    handled: list[tuple[str, int]] = []
    for n in range(4):
        ingest.received(a, recorder(handled, a, n))
    assert handled == [("a", 0), ("a", 1), ("a", 2), ("a", 3)]
    assert ingest.waiting == 0


def test_a_burst_does_not_hold_another_connections_message() -> None:
    """A burst of 20 messages on one connection, then one from another connection in
    the same turn: the first 4 go at once, and the other connection's message is
    handled in the next turn before the burst's 5th."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=4, max_waiting=100)
    burst, probe = Source("burst"), Source("probe")
    handled: list[tuple[str, int]] = []
    for n in range(20):
        ingest.received(burst, recorder(handled, burst, n))
    ingest.received(probe, recorder(handled, probe, 0))
    assert handled == [("burst", n) for n in range(4)]
    assert ingest.waiting == 17
    clock.turn()
    assert handled[4:6] == [("burst", 4), ("probe", 0)]
    while ingest.waiting:
        clock.turn()
    assert [n for name, n in handled if name == "burst"] == list(range(20))


def test_each_turn_takes_one_message_from_each_connection_in_turn() -> None:
    """Three connections with messages waiting: each turn takes them round-robin,
    one per connection, and no connection is starved by being late in the order."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=2, max_waiting=100)
    sources = [Source(name) for name in "abc"]
    handled: list[tuple[str, int]] = []
    ingest.received(sources[0], recorder(handled, sources[0], -1))
    ingest.received(sources[0], recorder(handled, sources[0], -2))
    for n in range(3):
        for source in sources:
            ingest.received(source, recorder(handled, source, n))
    handled.clear()
    clock.turn()
    clock.turn()
    assert [name for name, _ in handled] == ["a", "b", "c", "a"]


def test_the_count_starts_again_each_turn() -> None:
    """After a turn took its share, the next turn's first message is handled at once."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=2)
    a = Source("a")
    handled: list[tuple[str, int]] = []
    for n in range(2):
        ingest.received(a, recorder(handled, a, n))
    clock.turn()
    ingest.received(a, recorder(handled, a, 2))
    assert handled == [("a", 0), ("a", 1), ("a", 2)]


def test_a_connection_with_too_many_waiting_is_paused_until_they_are_handled() -> None:
    """A connection with ``max_waiting`` messages waiting has its reading paused (once),
    and resumed when its last waiting message is handled."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=1, max_waiting=3)
    a = Source("a")
    handled: list[tuple[str, int]] = []
    for n in range(5):
        ingest.received(a, recorder(handled, a, n))
    assert a.paused and a.pauses == 1
    for _ in range(3):
        clock.turn()
    assert a.paused
    assert [n for _, n in handled] == [0, 1, 2, 3]
    clock.turn()
    assert not a.paused
    assert [n for _, n in handled] == [0, 1, 2, 3, 4]


def test_a_gone_connection_is_forgotten() -> None:
    """``forget`` drops what a closed connection still had waiting."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=1)
    a = Source("a")
    handled: list[tuple[str, int]] = []
    for n in range(3):
        ingest.received(a, recorder(handled, a, n))
    ingest.forget(a)
    clock.turn()
    assert handled == [("a", 0)]
    assert ingest.waiting == 0


def test_a_failing_handler_does_not_stop_the_others() -> None:
    """What a handler raises is logged; the messages after it are still handled."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=1)
    a = Source("a")
    handled: list[tuple[str, int]] = []

    def fail() -> None:
        raise RuntimeError("broken on purpose")

    ingest.received(a, fail)
    ingest.received(a, recorder(handled, a, 1))
    clock.turn()
    assert handled == [("a", 1)]


def test_bounds_must_be_positive() -> None:
    """A zero share or bound is refused."""
    with pytest.raises(ValueError):
        FairIngest(Turns(), per_turn=0)
    with pytest.raises(ValueError):
        FairIngest(Turns(), max_waiting=0)


testSuite = pytest_module(__file__)
