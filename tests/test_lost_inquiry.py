"""
Unit tests for :mod:`taskoffload.inquiry`: a TaskClient whose connection is lost
with calls in flight asks the pool why the worker ended (``{"lost": PID}``),
again every 50 ms while it says null, for 1 s at most; the calls then fail with
the cause; confirmed deaths count against the calls (poison).  Over a memory
reactor, the workers played by the test (see tests/test_client.py).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost

from taskoffload import wire
from taskoffload.inquiry import ASK_FOR, ASK_INTERVAL
from tests._trial_bridge import pytest_module
from tests.test_client import Outcome, Pool, Worker

CAUSE = {"exit_status": 3, "rss_mib": 41.2}


def asking_pool(**options: Any) -> Pool:
    """A client whose pool's workers say, in their acknowledgements, that it tells
    why a worker ended."""
    pool = Pool(**options)
    pool.deaths = True
    return pool


def questions(worker: Worker) -> list[int]:
    """The pids the client asked about on ``worker``'s connection."""
    return [m["lost"] for m in worker.received() if "lost" in m]


def lose(
    pool: Pool, function: str = "die", *args: Any, worker: int = 100
) -> tuple[Outcome, Worker]:
    """Call ``function(*args)``, its connection accepted by ``worker``, then lost."""
    outcome = Outcome(pool.client.call(function, *args))
    connection = pool.accept(worker=worker)
    connection.drop(ConnectionLost("gone"))
    return outcome, connection


def test_a_pool_that_keeps_no_journal_is_not_asked() -> None:
    """Workers whose acknowledgement does not say ``deaths`` (an older pool): the
    lost call fails at once, and nothing asks why."""
    pool = Pool()
    outcome, _ = lose(pool, "die", 3)
    assert outcome.error.code == wire.WORKER_LOST and outcome.error.cause is None
    assert len(pool.reactor.tcpClients) == 1  # no connection opened to ask on


def test_lost_call_waits_for_the_cause() -> None:
    """The lost call fails only once the pool says why; null answers are asked again in 50 ms."""
    pool = asking_pool()
    outcome, _ = lose(pool, "die", 3)
    assert not outcome.fired
    carrier = pool.accept(worker=101)  # a connection of its own, to ask on
    assert questions(carrier) == [100]
    carrier.reply({"lost": 100, "cause": None})
    pool.reactor.advance(ASK_INTERVAL / 2)
    assert questions(carrier) == [100]
    pool.reactor.advance(ASK_INTERVAL / 2)
    assert questions(carrier) == [100, 100]
    assert not outcome.fired
    carrier.reply({"lost": 100, "cause": CAUSE})
    error = outcome.error
    assert error.code == wire.WORKER_LOST
    assert error.cause == CAUSE
    assert "worker 100 died: exit status 3, last RSS 41.2 MiB" in error.message
    assert carrier.closing


def test_no_cause_within_a_second() -> None:
    """Without a record within 1 s the call fails without a cause, and says so."""
    pool = asking_pool()
    outcome, _ = lose(pool)
    carrier = pool.accept(worker=101)
    for _ in range(5):
        carrier.reply({"lost": 100, "cause": None})
        pool.reactor.advance(ASK_INTERVAL)
    assert not outcome.fired
    pool.reactor.advance(ASK_FOR)
    error = outcome.error
    assert error.code == wire.WORKER_LOST and error.cause is None
    assert "the pool did not say why worker 100 ended" in error.message
    assert carrier.closing


def test_unreachable_pool_answers_in_a_second() -> None:
    """If no connection to ask on can be made, the call still fails after 1 s."""
    pool = asking_pool()
    outcome, _ = lose(pool)
    pool.refuse()
    pool.reactor.advance(ASK_FOR - 0.01)
    assert not outcome.fired
    pool.reactor.advance(0.01)
    assert outcome.error.code == wire.WORKER_LOST


def test_an_idle_connection_to_another_worker_carries_the_question() -> None:
    """An idle connection to another worker is asked on, rather than a new one."""
    pool = asking_pool()
    doomed = Outcome(pool.client.call("die"))
    fine = Outcome(pool.client.call("noop"))
    one, two = pool.accept(0, worker=100), pool.accept(1, worker=101)
    two.answer("ok")
    assert fine.result == "ok"
    one.drop(ConnectionLost("gone"))
    assert len(pool.attempts) == 2
    assert questions(two) == [100]
    two.reply({"lost": 100, "cause": {"signal": "SIGKILL"}})
    assert doomed.error.cause == {"signal": "SIGKILL"}
    assert not two.closing  # the client's own connection stays


def test_idempotent_call_is_resent_at_once() -> None:
    """A retry=True call goes again at once, not after the answer."""
    pool = asking_pool()
    outcome = Outcome(pool.client.call("idem"))
    first = pool.accept(retry=["idem"], worker=100)
    first.drop(ConnectionLost("gone"))
    # One attempt for the second try, one to ask on; neither waits for the other.
    assert len(pool.attempts) == 3
    resent = pool.accept(1, retry=["idem"], worker=101)
    assert [m["function"] for m in resent.received() if "function" in m] == ["idem"]
    resent.answer("done")
    assert outcome.result == "done"


def test_client_closed_while_asking() -> None:
    """Closing the client answers the waiting calls at once."""
    pool = asking_pool()
    outcome, _ = lose(pool)
    carrier = pool.accept(worker=101)
    closed = Outcome(pool.client.close())
    assert outcome.error.code == wire.WORKER_LOST
    assert not closed.fired
    carrier.drop()
    assert closed.fired


def kill(pool: Pool, *args: Any, retry: tuple[str, ...] = (), worker: int) -> Outcome:
    """A call of ``die(*args)`` kills ``worker``, and the pool confirms it."""
    outcome, _ = lose(pool, "die", *args, worker=worker)
    carrier = pool.accept(worker=worker + 1000, retry=retry)
    carrier.reply({"lost": worker, "cause": {"exit_status": args[0]}})
    return outcome


def test_two_kills_quarantine_the_call() -> None:
    """After two confirmed kills, the same call is refused at once; other arguments go on."""
    pool = asking_pool(poison_window=60.0, poison_cooldown=300.0)
    assert kill(pool, 3, worker=100).error.code == wire.WORKER_LOST
    assert pool.client.poison.status() == {"quarantined": 0, "refused": 0, "kills": 1}
    assert kill(pool, 3, worker=101).error.code == wire.WORKER_LOST
    attempts = len(pool.attempts)
    refused = Outcome(pool.client.call("die", 3))
    assert refused.error.code == wire.POISONED
    assert "die" in refused.error.message and "2 workers" in refused.error.message
    assert len(pool.attempts) == attempts  # it reached no worker
    other = Outcome(pool.client.call("die", 4))
    pool.accept(worker=102).answer("fine")
    assert other.result == "fine"
    assert pool.client.poison.status() == {"quarantined": 1, "refused": 1, "kills": 2}


def test_unconfirmed_deaths_count_no_kill() -> None:
    """A loss the pool cannot explain is no kill."""
    pool = asking_pool()
    for worker in (100, 101):
        outcome, _ = lose(pool, "die", 3, worker=worker)
        pool.reactor.advance(ASK_FOR)
        assert outcome.error.code == wire.WORKER_LOST
    assert pool.client.poison.status()["kills"] == 0
    sent = Outcome(pool.client.call("die", 3))
    assert not sent.fired


def test_idempotent_call_not_resent_after_its_second_kill() -> None:
    """A retry=True call whose loss is its second kill is not sent again."""
    pool = asking_pool()
    first = Outcome(pool.client.call("idem", 1))
    pool.accept(retry=["idem"], worker=100).drop(ConnectionLost("gone"))
    # Resent at once (attempt 1) while the pool is asked (attempt 2).
    resent = pool.accept(1, retry=["idem"], worker=101)
    resent.answer("ok")
    pool.accept(2, retry=["idem"], worker=102).reply({"lost": 100, "cause": {"exit_status": 3}})
    assert first.result == "ok"
    assert pool.client.poison.kills_of("idem", (1,), {}) == 1
    # The same call again, on the idle connection to worker 101, which dies too.
    second = Outcome(pool.client.call("idem", 1))
    attempts = len(pool.attempts)
    resent.drop(ConnectionLost("gone"))
    assert len(pool.attempts) == attempts + 1  # only the connection to ask on
    pool.accept(retry=["idem"], worker=104).reply({"lost": 101, "cause": {"exit_status": 3}})
    assert second.error.code == wire.WORKER_LOST
    assert second.error.cause == {"exit_status": 3}
    assert Outcome(pool.client.call("idem", 1)).error.code == wire.POISONED


testSuite = pytest_module(__file__)
