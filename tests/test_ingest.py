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
    the first the next turn handles, before the burst's 5th (the burst had its
    turn)."""
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
    assert handled[4:6] == [("probe", 0), ("burst", 4)]
    while ingest.waiting:
        clock.turn()
    assert [n for name, n in handled if name == "burst"] == list(range(20))


def test_each_turn_takes_one_message_from_each_connection_in_turn() -> None:
    """Three connections with messages waiting: the turns take them round-robin,
    one per connection, however the turns' shares fall, so none is starved."""
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
    for _ in range(4):
        clock.turn()
    names = [name for name, _ in handled]
    assert len(names) == 8
    for start in (0, 3):
        assert sorted(names[start : start + 3]) == ["a", "b", "c"], names
    assert names[6:] == names[:2]


def test_a_connection_with_none_waiting_goes_ahead_of_those_that_had_turns() -> None:
    """Two connections with long queues have had turns; a third's first message
    waits for the next turn, and is the first that turn handles."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=2, max_waiting=100)
    a, b, probe = Source("a"), Source("b"), Source("probe")
    handled: list[tuple[str, int]] = []
    for n in range(10):
        ingest.received(a, recorder(handled, a, n))
        ingest.received(b, recorder(handled, b, n))
    clock.turn()
    ingest.received(probe, recorder(handled, probe, 0))
    handled.clear()
    clock.turn()
    assert handled[0] == ("probe", 0), handled


def test_what_a_served_connection_brings_waits_behind_the_others() -> None:
    """A connection whose waiting read, handled in its turn, brings more messages than
    the turn's share: the first is handled then, in its turn, and the rest wait
    behind another connection's message that came after the read."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=2, max_waiting=100)
    busy, burst, other = Source("busy"), Source("burst"), Source("other")
    handled: list[tuple[str, int]] = []

    def read_of_ten() -> None:
        for n in range(10):
            ingest.received(burst, recorder(handled, burst, n))

    ingest.received(busy, lambda: None)
    ingest.received(busy, lambda: None)  # this turn's share taken
    ingest.received(burst, read_of_ten)
    ingest.received(other, recorder(handled, other, 0))
    clock.turn()  # the read, and the first message it brings: the turn's share
    assert handled == [("burst", 0)]
    clock.turn()
    assert handled[1] == ("other", 0), handled
    while ingest.waiting:
        clock.turn()
    assert [n for name, n in handled if name == "burst"] == list(range(10))


def test_one_turn_is_scheduled_at_a_time() -> None:
    """Messages that arrive while a turn handles others (a parsed read brings more)
    schedule no second turn: one turn at a time, so the share holds for each."""
    clock = Turns()
    ingest = FairIngest(clock, per_turn=2, max_waiting=100)
    a, b = Source("a"), Source("b")
    handled: list[tuple[str, int]] = []

    def brings_more(n: int) -> Callable[[], None]:
        def handle() -> None:
            handled.append(("a", n))
            ingest.received(b, recorder(handled, b, n))

        return handle

    for n in range(10):
        ingest.received(a, brings_more(n))
    for _ in range(5):
        assert len(clock.getDelayedCalls()) == 1
        before = len(handled)
        clock.turn()
        assert len(handled) - before <= 2
    assert len(clock.getDelayedCalls()) == 1


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
