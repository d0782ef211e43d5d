"""
Running one request's task, apart from any connection: binding its arguments
through the registry, running a synchronous, Deferred-returning or ``async def``
task, holding it to its deadline, and turning the outcome into a wire reply.

The worker's task server runs every request through a :class:`TaskRunner`, and so
does :class:`taskoffload.testing.FakeTaskPool` with ``tasks``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import Interface

from taskoffload import wire
from taskoffload.lanes import DEFAULT_LANE
from taskoffload.registry import PROGRESS_PARAMETER, TaskRegistry, TaskSpec

__all__ = ["DeadlineExceeded", "ISyncDeadlines", "TaskRunner", "final_reply"]

#: What a run of a task answers: its result, or an error reply.
Reply = wire.Result | wire.ErrorReply


class DeadlineExceeded(Exception):
    """Raised inside a synchronous task that runs past its deadline."""


class ISyncDeadlines(Interface):
    """Bounds the synchronous part of a task, which no Deferred timeout can interrupt."""

    def arm(seconds: float) -> None:
        """Make the running code raise :class:`DeadlineExceeded` in ``seconds``."""

    def disarm() -> None:
        """The synchronous part returned: cancel what :meth:`arm` set."""


class TaskRunner:
    """
    Runs the registered task a request names and answers with the reply a worker
    writes for it.

    :param registry: the tasks that may run.
    :param clock: for deadlines.
    :param task_timeout: the deadline of tasks whose request and registration
        give none.
    :param sync_deadlines: interrupts synchronous tasks at their deadline; without
        it only Deferred-returning tasks are held to one.
    :param lane: the lane whose tasks it runs; a request for another lane's
        task is answered with ``wrong_lane``.  ``None``: every lane's.
    :ivar tasks_done: how many tasks have ended, however they ended (one cancelled
        while it waited for a slot included).
    """

    def __init__(
        self,
        registry: TaskRegistry,
        clock: IReactorTime,
        *,
        task_timeout: float | None = None,
        sync_deadlines: ISyncDeadlines | None = None,
        lane: str | None = DEFAULT_LANE,
    ) -> None:
        self.registry = registry
        self.lane = lane
        self.clock = clock
        self.task_timeout = task_timeout
        self._sync_deadlines = sync_deadlines
        self.tasks_done = 0
        # The namespace the worker's task failures have always been logged under,
        # which a reader of the pool's logs may filter on.
        self.log = Logger(namespace="taskoffload.worker.TaskServerFactory", source=self)

    def run(
        self,
        request: wire.Request,
        progress: Callable[[Any], None],
        slots: DeferredSemaphore | None = None,
    ) -> Deferred[Reply]:
        """
        Run one request's task.

        A request that names no registered task, or whose arguments do not fit,
        is answered at once, without waiting for a slot.

        :param progress: given to a task that declares a ``progress`` parameter.
        :param slots: if given, the task starts once it holds one of them; its
            deadline counts from then, not while it waits.
        :return: a Deferred firing with the final reply; it fails with
            :class:`CancelledError` if cancelled.
        """
        try:
            spec = self.registry.lookup(request.function)
            if self.lane is not None and spec.lane != self.lane:
                raise wire.BadMessage(
                    f"{spec.name} runs on lane {spec.lane!r}, and this worker serves "
                    f"lane {self.lane!r}: send it to a worker of its lane",
                    code=wire.WRONG_LANE,
                )
            bound = spec.bind(request.args, request.kwargs)
        except wire.BadMessage as e:
            return defer.succeed(wire.ErrorReply(id=request.id, code=e.code, message=e.message))
        if spec.wants_progress:
            bound.arguments[PROGRESS_PARAMETER] = progress
        timeout = self._deadline(request, spec)

        def start() -> Deferred[Any]:
            return self._start(spec, bound, timeout)

        d = slots.run(start) if slots is not None else defer.maybeDeferred(start)
        d.addCallbacks(
            lambda value: self._succeeded(request, value),
            lambda failure: self._failed(request, timeout, failure),
        )
        return d

    def _deadline(self, request: wire.Request, spec: TaskSpec) -> float | None:
        """The request's own timeout, else the task's, else the runner's default."""
        timeout = request.timeout if request.timeout is not None else spec.timeout
        if timeout is None:
            timeout = self.task_timeout
        return timeout

    def _start(
        self, spec: TaskSpec, bound: inspect.BoundArguments, timeout: float | None
    ) -> Deferred[Any]:
        # The deadline counts from here, once the task has a slot: time spent
        # waiting for one (behind another connection's task) does not count.
        begun = self.clock.seconds()
        sync_deadlines = self._sync_deadlines
        if timeout is None or sync_deadlines is None:
            started = defer.maybeDeferred(spec.function, *bound.args, **bound.kwargs)
        else:
            sync_deadlines.arm(timeout)
            try:
                started = defer.maybeDeferred(spec.function, *bound.args, **bound.kwargs)
            finally:
                sync_deadlines.disarm()
        started.addCallback(_await_coroutine)
        if timeout is not None:
            # What the synchronous part took counts toward the deadline.
            left = max(begun + timeout - self.clock.seconds(), 0.001)
            started.addTimeout(left, self.clock)
        return started

    def _succeeded(self, request: wire.Request, value: Any) -> wire.Result:
        self.tasks_done += 1
        return wire.Result(id=request.id, result=value)

    def _failed(
        self, request: wire.Request, timeout: float | None, failure: Failure
    ) -> wire.ErrorReply | Failure:
        self.tasks_done += 1
        if failure.check(CancelledError):
            return failure
        if failure.check(TimeoutError, DeadlineExceeded):
            return wire.ErrorReply(
                id=request.id,
                code=wire.TIMEOUT,
                message=f"{request.function} did not finish within {timeout} s",
            )
        self.log.failure(
            "Task {function} (request {request_id}) failed",
            failure,
            level=LogLevel.warn,
            function=request.function,
            request_id=request.id,
        )
        return _failed_reply(request.id, failure)


def final_reply(request_id: wire.RequestId, outcome: Reply | Failure) -> Reply:
    """
    The final reply to write for what a run ended with: a cancelled run is
    answered ``cancelled``, any other failure ``task_failed``.

    :param outcome: what the Deferred of :meth:`TaskRunner.run` fired with.
    """
    if isinstance(outcome, Failure) and outcome.check(CancelledError):
        # CancelledError has no message, and ``type`` is for task_failed only.
        return wire.ErrorReply(id=request_id, code=wire.CANCELLED, message="cancelled while it ran")
    if isinstance(outcome, Failure):
        return _failed_reply(request_id, outcome)
    return outcome


def _failed_reply(request_id: wire.RequestId, failure: Failure) -> wire.ErrorReply:
    return wire.ErrorReply(
        id=request_id,
        code=wire.TASK_FAILED,
        message=failure.getErrorMessage(),
        type=failure.type.__name__ if failure.type else None,
    )


def _await_coroutine(value: Any) -> Any:
    if hasattr(value, "__await__") and hasattr(value, "send"):
        return Deferred.fromCoroutine(value)
    return value
