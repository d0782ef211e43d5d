"""Unit tests for :mod:`taskoffload.poison`: keys, the window, the cooldown, the bound."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from twisted.internet.task import Clock
from twisted.python import usage

from taskoffload import tap, wire
from taskoffload.poison import PoisonTable, call_key
from taskoffload.shared_metrics import shared_gateway_status
from taskoffload.stats import GatewayMetrics, GatewayStats
from tests._trial_bridge import pytest_module
from tests.test_gateway_processes import FakeProcesses, shared_metrics_of
from tests.test_gateway_processes import multiprocess as multiprocess

DIE3 = ("die", (3,), {})


def test_key_is_canonical() -> None:
    """Keyword order does not matter; function, positions and values do."""
    assert call_key("f", (), {"a": 1, "b": 2}) == call_key("f", [], {"b": 2, "a": 1})
    assert call_key("f", (3,), {}) != call_key("f", (4,), {})
    assert call_key("f", (3,), {}) != call_key("g", (3,), {})
    assert call_key("f", (3,), {}) != call_key("f", (), {"x": 3})
    # What orjson refuses still has a key.
    assert call_key("f", (2**70,), {}) != call_key("f", (2**71,), {})


def test_two_kills_within_the_window_quarantine() -> None:
    """Two kills within the window quarantine the call; others are unaffected."""
    clock = Clock()
    table = PoisonTable(clock, window=60, cooldown=300)
    table.record([DIE3])
    assert table.refusal(*DIE3) is None
    clock.advance(59)
    table.record([DIE3])
    error = table.refusal(*DIE3)
    assert error is not None and error.code == wire.POISONED
    assert "die" in error.message and "2 workers" in error.message and "300 s more" in error.message
    assert table.refusal("die", (4,), {}) is None
    assert table.status() == {"quarantined": 1, "refused": 1, "kills": 2}


def test_kills_outside_the_window_do_not_add_up() -> None:
    """Kills further apart than the window quarantine nothing."""
    clock = Clock()
    table = PoisonTable(clock, window=60, cooldown=300)
    table.record([DIE3])
    clock.advance(61)
    table.record([DIE3])
    assert table.refusal(*DIE3) is None
    assert table.kills_of(*DIE3) == 1


def test_quarantine_ends_after_the_cooldown() -> None:
    """After the cooldown, the call goes again, and starts afresh."""
    clock = Clock()
    table = PoisonTable(clock, window=60, cooldown=300)
    table.record([DIE3])
    table.record([DIE3])
    clock.advance(299)
    refused = table.refusal(*DIE3)
    assert refused is not None and "1 s more" in refused.message
    clock.advance(1)
    assert table.refusal(*DIE3) is None
    assert table.quarantined() == 0
    table.record([DIE3])
    assert table.refusal(*DIE3) is None


def test_one_death_counts_one_kill_per_call() -> None:
    """The same call twice in flight on one dead worker is one kill; counted calls are skipped."""
    table = PoisonTable(Clock())
    counted: set[str] = set()
    table.record([DIE3, DIE3], counted)
    table.record([DIE3], counted)  # the same death, found on another connection
    assert table.kills_of(*DIE3) == 1


def test_window_zero_disables() -> None:
    """A window of 0 counts nothing."""
    table = PoisonTable(Clock(), window=0)
    table.record([DIE3])
    table.record([DIE3])
    assert table.refusal(*DIE3) is None
    assert not table.killed_twice(*DIE3)


def test_the_table_is_bounded() -> None:
    """Beyond its bound, the call least recently killed is forgotten."""
    table = PoisonTable(Clock(), max_keys=3)
    for n in range(4):
        table.record([("die", (n,), {})])
    assert table.kills_of("die", (0,), {}) == 0
    assert [table.kills_of("die", (n,), {}) for n in (1, 2, 3)] == [1, 1, 1]


def test_killed_twice_counts_the_loss_at_hand() -> None:
    """A call with one kill counted, lost again, would make two."""
    table = PoisonTable(Clock())
    assert not table.killed_twice(*DIE3)
    table.record([DIE3])
    assert table.killed_twice(*DIE3)
    assert not table.killed_twice("die", (4,), {})


def quarantined_table() -> PoisonTable:
    """A table with die(3) quarantined and refused once."""
    table = PoisonTable(Clock())
    table.record([DIE3])
    table.record([DIE3])
    table.refusal(*DIE3)
    return table


def test_metrics_of_one_gateway() -> None:
    """/status's poison figures, and /metrics's gauge and counters, of one process."""
    stats = GatewayStats()
    stats.poison = quarantined_table()
    assert stats.to_json()["poison"] == {"quarantined": 1, "refused": 1, "kills": 2}
    metrics = GatewayMetrics(lambda: {"gateway": stats.to_json(), "pool": None})
    text = generate_latest(metrics.registry).decode()
    assert "taskoffload_poison_quarantined 1.0" in text
    assert "taskoffload_poisoned_total 1.0" in text
    assert "taskoffload_poison_kills_total 2.0" in text


def test_metrics_of_several_gateway_processes(multiprocess: FakeProcesses) -> None:
    """Each process's figures go to its files by their growth; /status sums them."""
    first, second = shared_metrics_of(multiprocess, 101), shared_metrics_of(multiprocess, 102)
    with multiprocess.process(101):
        stats = GatewayStats()
        stats.poison = quarantined_table()
        first.sample(stats)
        first.sample(stats)  # sampled again: counted once
    with multiprocess.process(102):
        stats = GatewayStats()
        stats.poison = quarantined_table()
        stats.poison.refusal(*DIE3)
        second.sample(stats)
    figures = shared_gateway_status(first.counts)
    assert figures["poison"] == {"quarantined": 2, "refused": 3, "kills": 4}


def test_gateway_options() -> None:
    """--poison-window and --poison-cooldown take seconds, 0 or more."""
    options = tap.Options()
    options.parseOptions(["--poison-window=0", "--poison-cooldown=5"])
    assert (options["poison-window"], options["poison-cooldown"]) == (0.0, 5.0)
    defaults = tap.Options()
    defaults.parseOptions([])
    assert (defaults["poison-window"], defaults["poison-cooldown"]) == (60.0, 300.0)
    with pytest.raises(usage.UsageError):
        tap.Options().parseOptions(["--poison-window=-1"])


testSuite = pytest_module(__file__)
