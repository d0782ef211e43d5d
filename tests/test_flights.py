"""
Unit tests for :mod:`taskoffload.flights`: single flight over Deferreds made
by hand, and :meth:`TaskClient.send_task`'s ``key`` over a connection-less
client whose calls are recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from taskoffload import wire
from taskoffload.client import TaskClient
from taskoffload.errors import TaskError
from taskoffload.flights import Flights
from tests._trial_bridge import pytest_module


class Runs:
    """A ``start`` for :meth:`Flights.call` that records each run it starts."""

    def __init__(self) -> None:
        self.started: list[tuple[Deferred[Any], Any]] = []
        self.cancelled = 0

    def __call__(self, progress: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self._cancelled())
        self.started.append((d, progress))
        return d

    def _cancelled(self) -> None:
        self.cancelled += 1


def outcomes(ds: list[Deferred[Any]]) -> list[Any]:
    """What each Deferred fired with (a TaskError's code for a failure), ``None`` if not yet."""
    return [outcome(d) for d in ds]


def outcome(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addCallbacks(box.append, lambda f: box.append(f.value.code) if f.check(TaskError) else f)
    return box[0] if box else None


def test_callers_of_one_key_share_one_run() -> None:
    """Five calls of one function and key start one run; all five get its result."""
    flights, runs = Flights(), Runs()
    ds = [flights.call("f", "k", runs) for _ in range(5)]
    assert len(runs.started) == 1
    assert flights.callers("f", "k") == 5
    runs.started[0][0].callback({"answer": 42})
    assert outcomes(ds) == [{"answer": 42}] * 5


def test_other_keys_and_functions_run_apart() -> None:
    """Another key, or the same key of another function, is another run."""
    flights, runs = Flights(), Runs()
    flights.call("f", "k", runs)
    flights.call("f", "other", runs)
    flights.call("g", "k", runs)
    assert len(runs.started) == 3
    assert len(flights) == 3


def test_progress_reaches_every_caller() -> None:
    """Each progress value of the run goes to every caller there when it comes."""
    flights, runs = Flights(), Runs()
    first: list[Any] = []
    second: list[Any] = []
    flights.call("f", "k", runs, first.append)
    _, progress = runs.started[0]
    progress(1)
    flights.call("f", "k", runs, second.append)
    progress(2)
    assert (first, second) == ([1, 2], [2])


def test_a_raising_progress_callback_leaves_the_others() -> None:
    """A progress callback that raises does not keep the value from the other callers."""
    flights, runs = Flights(), Runs()

    def raises(value: Any) -> None:
        raise RuntimeError("no")

    seen: list[Any] = []
    flights.call("f", "k", runs, raises)
    flights.call("f", "k", runs, seen.append)
    runs.started[0][1]("v")
    assert seen == ["v"]


def test_a_failure_reaches_every_caller() -> None:
    """The run's failure fails every caller."""
    flights, runs = Flights(), Runs()
    ds = [flights.call("f", "k", runs) for _ in range(2)]
    runs.started[0][0].errback(TaskError(wire.TASK_FAILED, "boom"))
    assert outcomes(ds) == [wire.TASK_FAILED] * 2


def test_one_callers_cancel_leaves_the_run_to_the_others() -> None:
    """A caller that cancels fails with cancelled; the run goes on, and the
    others get its result."""
    flights, runs = Flights(), Runs()
    leaving, staying = flights.call("f", "k", runs), flights.call("f", "k", runs)
    leaving.cancel()
    assert outcomes([leaving]) == [wire.CANCELLED]
    assert runs.cancelled == 0
    assert flights.callers("f", "k") == 1
    runs.started[0][0].callback("done")
    assert outcomes([staying]) == ["done"]


def test_the_last_caller_leaving_cancels_the_run_and_frees_the_key() -> None:
    """When every caller has cancelled, the run is cancelled, and the next call
    of the key starts a new one."""
    flights, runs = Flights(), Runs()
    ds = [flights.call("f", "k", runs) for _ in range(2)]
    ds[0].cancel()
    ds[1].cancel()
    assert runs.cancelled == 1
    assert outcomes(ds) == [wire.CANCELLED] * 2
    flights.call("f", "k", runs)
    assert len(runs.started) == 2


def test_the_key_is_free_once_the_run_has_ended() -> None:
    """After the final outcome, a call of the key runs again: nothing is cached."""
    flights, runs = Flights(), Runs()
    first = flights.call("f", "k", runs)
    runs.started[0][0].callback(1)
    assert len(flights) == 0
    second = flights.call("f", "k", runs)
    assert len(runs.started) == 2
    runs.started[1][0].callback(2)
    assert outcomes([first, second]) == [1, 2]


def test_a_run_that_ends_at_once_answers_its_caller() -> None:
    """A run whose Deferred has already fired (or that raises) answers the caller."""
    flights = Flights()
    done: Deferred[Any] = Deferred()
    done.callback("now")
    assert outcomes([flights.call("f", "k", lambda p: done)]) == ["now"]

    def raises(progress: Any) -> Deferred[Any]:
        raise TaskError(wire.WORKER_LOST, "gone")

    assert outcomes([flights.call("f", "k", raises)]) == [wire.WORKER_LOST]
    assert len(flights) == 0


# TaskClient's key


@pytest.fixture
def client() -> TaskClient:
    """A client whose connections never connect: its calls wait."""
    return TaskClient(MemoryReactorClock(), ["tcp:127.0.0.1:1"])


def test_task_client_key_joins_the_running_call(
    client: TaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_task with a key joins this client's running call of that function and key."""
    sent: list[tuple[str, Any]] = []
    real = client.send_task

    def record(function: str, args: Any = (), kwargs: Any = None, *rest: Any, **kw: Any) -> Any:
        if kw.get("key") is None:
            sent.append((function, args))
        return real(function, args, kwargs, *rest, **kw)

    monkeypatch.setattr(client, "send_task", record)
    a = client.send_task("f", [1], key="k")
    b = client.send_task("f", [2], key="k")
    client.send_task("f", [3])
    assert sent == [("f", [1]), ("f", [3])]
    a.cancel()
    b.cancel()
    assert outcomes([a, b]) == [wire.CANCELLED, wire.CANCELLED]


@pytest.mark.parametrize("key", ["", 7])
def test_task_client_refuses_a_bad_key(client: TaskClient, key: Any) -> None:
    """A key that is not a non-empty string is a ValueError."""
    with pytest.raises(ValueError, match="key"):
        client.send_task("f", key=key)


testSuite = pytest_module(__file__)
