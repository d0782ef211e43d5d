"""
Unit tests for :mod:`taskoffload.running`: a ``TaskRunner`` over small test tasks
and a ``Clock``, driven with request records and read through the replies its
Deferreds fire with.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from taskoffload import wire
from taskoffload.registry import TaskRegistry, task
from taskoffload.running import DeadlineExceeded, ISyncDeadlines, TaskRunner, final_reply
from tests._trial_bridge import pytest_module
from tests.fake_deadlines import RecordingDeadlines


class Tasks:
    """The tasks a test runner runs; Deferred-returning ones leave theirs in ``waiting``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.waiting: list[Deferred[Any]] = []
        self.progress: list[Any] = []

    def registry(self) -> TaskRegistry:
        """One task of each kind."""

        def add(a: int, b: int) -> int:
            return a + b

        def wait() -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.waiting.append(d)
            return d

        async def double_later(x: int) -> int:
            return 2 * x + await wait()

        def count(n: int, progress: Any) -> int:
            for i in range(n):
                progress(i)
            return n

        def boom() -> None:
            raise ValueError("disk on fire")

        def stuck() -> None:
            raise DeadlineExceeded("the task ran past its deadline")

        def slow_start() -> Deferred[Any]:
            self.clock.advance(1.5)
            return wait()

        @task(timeout=5)
        def patient() -> Deferred[Any]:
            return wait()

        return TaskRegistry.from_functions(
            [add, wait, double_later, count, boom, stuck, slow_start, patient]
        )


class Runner:
    """A runner over :class:`Tasks` on a ``Clock``, and the replies of its runs."""

    def __init__(self, **options: Any) -> None:
        self.clock = Clock()
        self.tasks = Tasks(self.clock)
        self.runner = TaskRunner(self.tasks.registry(), self.clock, **options)

    def run(
        self, function: str, *args: Any, slots: DeferredSemaphore | None = None, **fields: Any
    ) -> list[Any]:
        """Run a request; the returned list receives what its Deferred fires with."""
        request = wire.Request(id=1, function=function, args=args, **fields)
        outcome: list[Any] = []
        self.runner.run(request, self.tasks.progress.append, slots).addBoth(outcome.append)
        return outcome


@pytest.fixture
def runner() -> Runner:
    return Runner()


def test_synchronous_result(runner: Runner) -> None:
    """A synchronous task is answered with its result at once, and counted."""
    assert runner.run("add", 1, 2) == [wire.Result(id=1, result=3)]
    assert runner.runner.tasks_done == 1


def test_deferred_and_async_results(runner: Runner) -> None:
    """A Deferred-returning task and an ``async def`` one are answered when they finish."""
    deferred, coroutine = runner.run("wait"), runner.run("double_later", 20)
    assert deferred == coroutine == []
    runner.tasks.waiting[0].callback("done")
    runner.tasks.waiting[1].callback(2)
    assert deferred == [wire.Result(id=1, result="done")]
    assert coroutine == [wire.Result(id=1, result=42)]


def test_progress_is_passed_to_a_task_that_declares_it(runner: Runner) -> None:
    """A task with a ``progress`` parameter reports through the runner's caller."""
    assert runner.run("count", 3) == [wire.Result(id=1, result=3)]
    assert runner.tasks.progress == [0, 1, 2]


@pytest.mark.parametrize(
    ("function", "args", "code"),
    [("nope", (), wire.UNKNOWN_FUNCTION), ("add", (1,), wire.BAD_ARGUMENTS)],
)
def test_unrunnable_request_is_answered_without_a_slot(
    runner: Runner, function: str, args: tuple[Any, ...], code: str
) -> None:
    """An unknown name or arguments that do not fit are answered at once, though no
    slot is free, and are not counted as tasks."""
    slots = DeferredSemaphore(1)
    slots.acquire()
    [reply] = runner.run(function, *args, slots=slots)
    assert (reply.id, reply.code) == (1, code)
    assert runner.runner.tasks_done == 0


def test_task_starts_when_it_gets_a_slot(runner: Runner) -> None:
    """With ``slots``, a task starts only once one is free, and gives it back when done."""
    slots = DeferredSemaphore(1)
    first, second = runner.run("wait", slots=slots), runner.run("wait", slots=slots)
    assert len(runner.tasks.waiting) == 1
    runner.tasks.waiting[0].callback("first")
    assert first == [wire.Result(id=1, result="first")]
    assert second == [] and len(runner.tasks.waiting) == 2


def test_failed_task_is_task_failed_and_logged(runner: Runner) -> None:
    """A task that raises is answered ``task_failed`` with its type and message, and
    logged as a warning under the namespace the worker's task failures always had."""
    with capturedLogs() as events:
        [reply] = runner.run("boom")
    assert reply == wire.ErrorReply(
        id=1, code=wire.TASK_FAILED, message="disk on fire", type="ValueError"
    )
    [logged] = [e for e in events if e.get("log_failure") is not None]
    assert logged["log_level"] == LogLevel.warn
    assert logged["log_namespace"] == "taskoffload.worker.TaskServerFactory"
    assert logged["function"] == "boom"


def test_deadline_precedence() -> None:
    """The request's timeout comes first, then the task's, then the runner's default."""
    runner = Runner(task_timeout=3.0)
    default, registered, requested = (
        runner.run("wait"),
        runner.run("patient"),
        runner.run("patient", timeout=1.0),
    )
    runner.clock.advance(1.0)
    assert [r.code for r in requested] == [wire.TIMEOUT]
    assert "within 1.0 s" in requested[0].message
    runner.clock.advance(2.0)
    assert [r.code for r in default] == [wire.TIMEOUT] and registered == []
    runner.clock.advance(2.0)
    assert [r.code for r in registered] == [wire.TIMEOUT]
    assert runner.runner.tasks_done == 3


def test_time_the_synchronous_part_took_counts(runner: Runner) -> None:
    """A task that spends 1.5 s before returning a Deferred has 0.5 s of a 2 s
    deadline left."""
    outcome = runner.run("slow_start", timeout=2.0)
    runner.clock.advance(0.4)
    assert outcome == []
    runner.clock.advance(0.1)
    assert [r.code for r in outcome] == [wire.TIMEOUT]


def test_time_waiting_for_a_slot_does_not_count(runner: Runner) -> None:
    """A task that waits 10 s for a slot still gets its whole deadline once it starts."""
    slots = DeferredSemaphore(1)
    runner.run("wait", slots=slots)
    outcome = runner.run("wait", slots=slots, timeout=2.0)
    runner.clock.advance(10)
    runner.tasks.waiting[0].callback(None)
    runner.clock.advance(1.9)
    assert outcome == []
    runner.clock.advance(0.1)
    assert [r.code for r in outcome] == [wire.TIMEOUT]


def test_sync_deadlines_armed_around_a_task_with_a_deadline() -> None:
    """A synchronous task with a deadline runs between arm(deadline) and disarm; one
    without runs unarmed."""
    deadlines = RecordingDeadlines()
    verifyObject(ISyncDeadlines, deadlines)
    runner = Runner(sync_deadlines=deadlines)
    runner.run("add", 1, 2, timeout=2.0)
    runner.run("add", 1, 2)
    assert deadlines.calls == [("arm", 2.0), "disarm"]


def test_deadline_exceeded_is_a_timeout_reply() -> None:
    """A synchronous task interrupted at its deadline is answered ``timeout``."""
    runner = Runner(task_timeout=3.0, sync_deadlines=RecordingDeadlines())
    [reply] = runner.run("stuck")
    assert (reply.code, reply.message) == (wire.TIMEOUT, "stuck did not finish within 3.0 s")


def test_cancelled_run_cancels_its_task_and_is_counted(runner: Runner) -> None:
    """Cancelling a run cancels its task and gives its slot to the next; the run's
    Deferred fails with CancelledError, and counts as a task done."""
    slots = DeferredSemaphore(1)
    d = runner.runner.run(wire.Request(id=1, function="wait"), runner.tasks.progress.append, slots)
    queued = runner.run("wait", slots=slots)
    d.cancel()
    outcome: list[Any] = []
    d.addErrback(outcome.append)
    assert outcome[0].check(CancelledError)
    first, second = runner.tasks.waiting
    assert first.called and not second.called
    assert runner.runner.tasks_done == 1
    second.callback("next")
    assert queued == [wire.Result(id=1, result="next")]


def test_cancelled_while_waiting_for_a_slot(runner: Runner) -> None:
    """A run cancelled before it got a slot never starts, and counts as done."""
    slots = DeferredSemaphore(1)
    slots.acquire()
    request = wire.Request(id=1, function="wait")
    d = runner.runner.run(request, runner.tasks.progress.append, slots)
    d.cancel()
    outcome: list[Any] = []
    d.addErrback(outcome.append)
    assert outcome[0].check(CancelledError)
    assert runner.tasks.waiting == []
    assert runner.runner.tasks_done == 1


def test_final_reply() -> None:
    """A reply is written as it is; a cancelled run is answered ``cancelled``, any other
    failure ``task_failed`` with the exception's type."""
    result = wire.Result(id=4, result=1)
    assert final_reply(4, result) is result
    assert final_reply(4, Failure(CancelledError())) == wire.ErrorReply(
        id=4, code=wire.CANCELLED, message="cancelled while it ran"
    )
    assert final_reply(4, Failure(KeyError("k"))) == wire.ErrorReply(
        id=4, code=wire.TASK_FAILED, message="'k'", type="KeyError"
    )


testSuite = pytest_module(__file__)
