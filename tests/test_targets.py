"""
Unit tests for :mod:`taskoffload.targets`: pool addresses as endpoint strings,
each address's backoff, workers and load, and the choice among addresses.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.targets import (
    CONNECT_BACKOFF,
    DUPLICATE_RETRIES,
    EARLY_CLOSE_RETRIES,
    FIRST_CONNECTS,
    Load,
    PoolAddress,
    Target,
    Targets,
)
from tests._trial_bridge import pytest_module


def target(text: str = "tcp:h:1") -> Target:
    """A target for a pool address written as ``text``."""
    return Target(PoolAddress.parse(text))


class Outcome:
    """What a Deferred fired with."""

    def __init__(self, deferred: Any) -> None:
        self.value: Any = None
        deferred.addBoth(self._fire)

    def _fire(self, value: Any) -> None:
        self.value = value


# Addresses as endpoints


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        ("tcp:127.0.0.1:12345", "tcp:host=127.0.0.1:port=12345:timeout=5"),
        ("example.org:80", "tcp:host=example.org:port=80:timeout=5"),
        ("tcp:[::1]:8000", r"tcp:host=\:\:1:port=8000:timeout=5"),
        ("unix:/run/pool.sock", "unix:path=/run/pool.sock:timeout=5"),
        ("unix:/run/a:b.sock", r"unix:path=/run/a\:b.sock:timeout=5"),
    ],
)
def test_endpoint_string(text: str, endpoint: str) -> None:
    """An address gives the client endpoint string that reaches it, colons in it quoted."""
    assert PoolAddress.parse(text).endpoint(5) == endpoint


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("tcp:127.0.0.1:12345", "127.0.0.1", 12345),
        ("example.org:80", "example.org", 80),
        ("[fe80::1]:7", "fe80::1", 7),
    ],
)
def test_connect_tcp(text: str, host: str, port: int) -> None:
    """A TCP address connects to its host and port, IPv6 hosts whole, with the timeout."""
    reactor = MemoryReactorClock()
    target(text).connect(reactor, Factory.forProtocol(Protocol), 3)
    assert [(h, p, timeout) for h, p, _, timeout, _ in reactor.tcpClients] == [(host, port, 3)]


def test_connect_unix() -> None:
    """A unix: address connects to its socket path, colons and all."""
    reactor = MemoryReactorClock()
    target("unix:/run/a:b.sock").connect(reactor, Factory.forProtocol(Protocol), 4)
    assert [(path, timeout) for path, _, timeout, _ in reactor.unixClients] == [
        ("/run/a:b.sock", 4)
    ]


def test_connect_hands_over_the_protocol() -> None:
    """The attempt fires with the protocol the factory built, once connected."""
    reactor = MemoryReactorClock()
    built = Protocol()
    factory = Factory.forProtocol(lambda: built)
    outcome = Outcome(target().connect(reactor, factory, 5))
    wrapper = reactor.tcpClients[0][2].buildProtocol(IPv4Address("TCP", "h", 1))
    wrapper.makeConnection(StringTransport())
    assert outcome.value is built


def test_fractional_connect_timeout_is_exact() -> None:
    """A connect timeout that is not whole seconds ends the attempt on time, as a timeout."""
    reactor = MemoryReactorClock()
    outcome = Outcome(target().connect(reactor, Factory.forProtocol(Protocol), 0.5))
    # The endpoint string takes whole seconds: the reactor's deadline is the next one.
    assert reactor.tcpClients[0][3] == 1
    reactor.advance(0.49)
    assert outcome.value is None
    reactor.advance(0.01)
    assert isinstance(outcome.value, Failure)
    assert outcome.value.check(error.TimeoutError)
    assert reactor.connectors[0].stoppedConnecting


def test_whole_connect_timeout_is_the_reactors() -> None:
    """A whole-second connect timeout is left to the reactor: no timer of the client's."""
    reactor = MemoryReactorClock()
    target().connect(reactor, Factory.forProtocol(Protocol), 5.0)
    assert reactor.tcpClients[0][3] == 5
    assert reactor.getDelayedCalls() == []


def test_attempts_are_counted() -> None:
    """An attempt counts as connecting until it ends."""
    one = target()
    one.connect(MemoryReactorClock(), Factory.forProtocol(Protocol), 5)
    assert one.connecting == 1
    one.attempt_ended()
    assert one.connecting == 0


# One address


def test_refused_backs_off() -> None:
    """A refused attempt backs the address off for CONNECT_BACKOFF seconds, saying why."""
    one = target()
    assert one.failed(Failure(error.ConnectionRefusedError()), now=10) is True
    assert one.backing_off(10 + CONNECT_BACKOFF - 0.01)
    assert not one.backing_off(10 + CONNECT_BACKOFF)
    assert one.error is not None and "refused" in one.error


def test_early_closes_are_retried_then_back_off() -> None:
    """Attempts closed before a worker took them are retried at once, up to a limit."""
    one = target()
    for _ in range(EARLY_CLOSE_RETRIES):
        assert one.failed(Failure(error.ConnectionDone()), now=0) is False
    assert one.failed(Failure(error.ConnectionLost()), now=0) is True
    assert one.backing_off(0)
    assert one.early_closes == 0


def test_reached_clears_the_backoff() -> None:
    """A connection a worker accepted makes the address good again."""
    one = target()
    one.failed(Failure(error.ConnectionRefusedError()), now=0)
    one.reached()
    assert not one.backing_off(0)
    assert one.error is None


def test_acknowledgement_updates_the_pool() -> None:
    """A session acknowledgement sets the retry set, and the slots when it gives them."""
    one = target()
    one.acknowledged(wire.SessionAck(worker=1, retry=("idem",), slots=4))
    one.acknowledged(wire.SessionAck(worker=2, retry=()))
    assert one.retry == frozenset()
    assert one.slots == 4


def test_capacity_before_and_after_the_pool_says_its_size() -> None:
    """Until the pool says its size, FIRST_CONNECTS attempts fill it; then its slots do."""
    one = target()
    one.connecting = FIRST_CONNECTS - 1
    assert not one.at_capacity()
    one.connecting = FIRST_CONNECTS
    assert one.at_capacity()
    one.slots = 3
    one.connecting = 1
    one.hold(worker=7)
    assert not one.at_capacity()
    one.hold(worker=8)
    assert one.at_capacity()


def test_duplicate_worker() -> None:
    """A connection to a worker already held enough is closed, DUPLICATE_RETRIES times in a row."""
    one = target()
    one.hold(worker=7)
    for _ in range(DUPLICATE_RETRIES):
        assert one.duplicate(7, concurrency=1, waiting=True)
    assert not one.duplicate(7, concurrency=1, waiting=True)
    assert one.duplicates == 0


def test_not_a_duplicate() -> None:
    """A new worker, one with a free slot, no waiting call or no pid is never a duplicate."""
    one = target()
    one.hold(worker=7)
    assert not one.duplicate(8, concurrency=1, waiting=True)
    assert not one.duplicate(7, concurrency=2, waiting=True)
    assert not one.duplicate(7, concurrency=1, waiting=False)
    assert not one.duplicate(None, concurrency=1, waiting=True)


def test_hold_and_let_go() -> None:
    """Open connections are counted per address and per worker, and forgotten."""
    one = target()
    one.hold(worker=7)
    one.hold(worker=7)
    one.hold(worker=None)
    assert (one.opened, dict(one.workers)) == (3, {7: 2})
    one.let_go(worker=7)
    one.let_go(worker=7)
    one.let_go(worker=None)
    assert (one.opened, dict(one.workers)) == (0, {})


def test_load() -> None:
    """The load counts calls carried and released, and refuses to go below zero."""
    load = Load()
    load.carried()
    load.carried()
    load.released()
    assert load.outstanding == 1
    load.released()
    with pytest.raises(RuntimeError):
        load.released()
    assert load.outstanding == 0


# The choice among addresses


def test_choice_in_turn() -> None:
    """With equal load, addresses are chosen in turn."""
    reactor = MemoryReactorClock()
    targets = Targets(reactor, [PoolAddress.parse("tcp:a:1"), PoolAddress.parse("tcp:b:2")])
    chosen = [str(targets.choose()) for _ in range(3)]
    assert chosen == ["tcp:a:1", "tcp:b:2", "tcp:a:1"]


def test_choice_least_outstanding() -> None:
    """The address with the fewest calls outstanding and attempts under way is chosen."""
    reactor = MemoryReactorClock()
    targets = Targets(reactor, [PoolAddress.parse("tcp:a:1"), PoolAddress.parse("tcp:b:2")])
    a, b = targets
    a.load.carried()
    b.connecting = 1
    b.load.carried()
    assert targets.choose() is a


def test_choice_skips_backing_off_and_full() -> None:
    """Addresses backing off or at capacity are not chosen; with none left, nothing is."""
    reactor = MemoryReactorClock()
    targets = Targets(reactor, [PoolAddress.parse("tcp:a:1"), PoolAddress.parse("tcp:b:2")])
    a, b = targets
    a.failed(Failure(error.ConnectionRefusedError()), reactor.seconds())
    assert targets.choose() is b
    assert not targets.all_down()
    b.slots = 1
    b.hold(worker=None)
    assert targets.choose() is None
    b.failed(Failure(error.ConnectionRefusedError()), reactor.seconds())
    assert targets.all_down()
    reactor.advance(CONNECT_BACKOFF)
    assert not targets.all_down()


def test_failures_name_each_address() -> None:
    """The failure message names every address that could not be reached, and why."""
    reactor = MemoryReactorClock()
    targets = Targets(reactor, [PoolAddress.parse("tcp:a:1"), PoolAddress.parse("tcp:b:2")])
    assert targets.failures() == "no pool address is available"
    for one in targets:
        one.failed(Failure(error.ConnectionRefusedError()), 0)
    assert targets.failures().startswith("could not connect to tcp:a:1: ")
    assert "; could not connect to tcp:b:2: " in targets.failures()


def test_slots_add_up() -> None:
    """The pools' slots add up once any has said; None before."""
    targets = Targets(
        MemoryReactorClock(), [PoolAddress.parse("tcp:a:1"), PoolAddress.parse("tcp:b:2")]
    )
    assert targets.slots() is None
    a, b = targets
    a.slots = 2
    assert targets.slots() == 2
    b.slots = 3
    assert targets.slots() == 5


testSuite = pytest_module(__file__)
