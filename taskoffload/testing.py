"""
In-memory fakes of taskoffload's seams, for the tests of code that uses them.

:class:`FakeTaskPool` provides :class:`~taskoffload.client.ITaskPool` without
workers or sockets.  It works in one of two modes:

- scripted (the default): every call is recorded as a :class:`FakeCall` and stays
  unanswered until the test answers it with :meth:`FakeCall.succeed`,
  :meth:`FakeCall.fail` or :meth:`FakeCall.progress`, in whatever order it likes;
- with ``tasks``: each call runs the named function as a worker process would
  (the worker's own code binds the arguments and turns the outcome into a reply),
  so a synchronous task's Deferred has fired by the time ``send_task`` returns,
  and one that returns a Deferred, or is ``async def``, answers when that fires.

Either way it behaves as :class:`~taskoffload.client.TaskClient` does where its
caller can tell: arguments, results and progress go through the wire format's JSON
encoding and back (a tuple arrives as a list; arguments JSON cannot carry fail with
``bad_request``, a result it cannot carry with ``task_failed``); with a ``clock``,
a call's timeout fails it with ``TaskError("timeout")``; cancelling a call's
Deferred fails it with ``TaskError("cancelled")`` (and, with ``tasks``, cancels
the running task); and :meth:`FakeTaskPool.slots` and
:meth:`FakeTaskPool.capacity` say the pool's size, ``None`` until told one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload import wire
from taskoffload.catalogue import catalogue
from taskoffload.client import (
    ON_PROGRESS_RAISED,
    ITaskPool,
    TaskError,
    cancelled_error,
    check_timeout,
    encode_request_or_error,
    pool_capacity,
    timeout_error,
)
from taskoffload.lanes import DEFAULT_LANE
from taskoffload.lost import LostAnswer
from taskoffload.registry import TaskRegistry
from taskoffload.running import TaskRunner

__all__ = ["FakeCall", "FakeTaskPool"]

_log = Logger(namespace="taskoffload.testing")


def _through_wire(reply: wire.Reply) -> wire.Reply:
    """``reply`` as the client reads it: encoded as a worker writes it, then decoded."""
    decoded = wire.decode_reply(wire.encode_reply(reply)[:-1])
    assert not isinstance(decoded, LostAnswer)  # never what a reply to a call encodes
    return decoded


class FakeCall:
    """
    One call made on a :class:`FakeTaskPool`, and the means to answer it.

    :ivar function: the task name called.
    :ivar args: the positional arguments, as a worker receives them (decoded
        from JSON).
    :ivar kwargs: the keyword arguments, as a worker receives them.
    :ivar timeout: the timeout the caller asked for, or ``None``.
    :ivar on_progress: the caller's progress callable, or ``None``.
    :ivar deferred: the Deferred the caller got.
    :ivar cancelled: the caller cancelled the Deferred before it had fired.
    :ivar timed_out: the call's timeout passed before it was answered.
    :ivar progress_sent: the progress values reported so far, in order, as the
        caller received them.

    :param request_id: the id of the call's request, which its replies carry.
    :param clock: with ``time_limit``, the clock on which the call times out.
    :param time_limit: seconds after which the call, unanswered, fails with
        ``timeout``: the caller's ``timeout`` or the pool's default.
    """

    def __init__(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_progress: Callable[[Any], object] | None,
        *,
        request_id: wire.RequestId = None,
        clock: IReactorTime | None = None,
        time_limit: float | None = None,
    ) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.on_progress = on_progress
        self.cancelled = False
        self.timed_out = False
        self.progress_sent: list[Any] = []
        self.deferred: Deferred[Any] = Deferred(self._cancel)
        self._request_id = request_id
        self._timer: IDelayedCall | None = None
        if clock is not None and time_limit is not None:
            self._timer = clock.callLater(time_limit, self._expire, time_limit)
        # With tasks: the runner's run of the task, cancelled when the caller gives up.
        self._task: Deferred[Any] | None = None

    def __repr__(self) -> str:
        if self.cancelled:
            state = "cancelled"
        elif self.timed_out:
            state = "timed out"
        else:
            state = "answered" if self.answered else "pending"
        return f"<FakeCall {self.function}(args={self.args!r}, kwargs={self.kwargs!r}) {state}>"

    @property
    def answered(self) -> bool:
        """The caller has its outcome: a result, an error, its timeout or its cancellation."""
        return self.deferred.called

    def succeed(self, value: Any = None) -> None:
        """
        Answer with a result, as the client would read it from a worker's reply:
        through JSON, so a tuple arrives as a list, and a value JSON cannot carry
        fails the call with ``task_failed``.  Ignored after a cancellation or a
        timeout, as a worker's late reply is.

        :raises twisted.internet.defer.AlreadyCalledError: if already answered
            otherwise.
        """
        if not self._given_up:
            self._deliver(wire.Result(id=self._request_id, result=value))

    def fail(
        self, code: str, message: str, type: str | None = None, cause: dict[str, Any] | None = None
    ) -> None:
        """
        Answer with :class:`~taskoffload.client.TaskError` ``(code, message, type)``.
        Ignored after a cancellation or a timeout.

        :param code: one of :data:`taskoffload.wire.ERROR_CODES`.
        :param type: the exception class name, for ``task_failed``.
        :param cause: for ``worker_lost``, why the worker died.
        :raises ValueError: if ``code`` is not a documented error code.
        :raises twisted.internet.defer.AlreadyCalledError: if already answered
            otherwise.
        """
        if code not in wire.ERROR_CODES:
            raise ValueError(f"{code!r} is not one of the wire format's error codes")
        if not self._given_up:
            self._deliver(
                wire.ErrorReply(
                    id=self._request_id, code=code, message=message, type=type, cause=cause
                )
            )

    def progress(self, value: Any) -> None:
        """
        Report progress: calls the caller's ``on_progress``, if it gave one, with
        ``value`` as it arrives through JSON (what JSON cannot carry arrives as its
        ``repr``), unless the call is already answered (a late report is dropped,
        as the client does).  What ``on_progress`` raises is logged, as the
        client does, and does not reach the task.
        """
        if self.answered:
            return
        report = _through_wire(wire.Progress(id=self._request_id, progress=value))
        assert isinstance(report, wire.Progress)
        self.progress_sent.append(report.progress)
        if self.on_progress is not None:
            try:
                self.on_progress(report.progress)
            except Exception:
                _log.failure(ON_PROGRESS_RAISED, function=self.function)

    @property
    def _given_up(self) -> bool:
        return self.cancelled or self.timed_out

    def _deliver(self, reply: wire.Result | wire.ErrorReply) -> None:
        """Fire the caller's Deferred with ``reply`` as the client would read it."""
        received = _through_wire(reply)
        self._stop_timer()
        if isinstance(received, wire.Result):
            self.deferred.callback(received.result)
        else:
            assert isinstance(received, wire.ErrorReply)
            self.deferred.errback(TaskError.from_reply(received))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _give_up(self, error: TaskError) -> None:
        """Fail the caller's Deferred now, and stop the task, as the client's cancel does."""
        self._stop_timer()
        self.deferred.errback(error)
        if self._task is not None:
            self._task.cancel()

    def _cancel(self, deferred: Deferred[Any]) -> None:
        self.cancelled = True
        self._give_up(cancelled_error())

    def _expire(self, seconds: float) -> None:
        self._timer = None
        if self.answered:
            return
        self.timed_out = True
        self._give_up(timeout_error(seconds))

    def _run(self, runner: TaskRunner, request: wire.Request) -> None:
        """Run the task with a worker's ``runner``, and answer with its reply."""
        task = runner.run(request, self.progress)
        self._task = task
        task.addCallback(self._replied).addErrback(self._task_ended)

    def _replied(self, reply: wire.Result | wire.ErrorReply) -> None:
        if not self.answered:
            self._deliver(reply)

    def _task_ended(self, failure: Failure) -> None:
        # The runner's run fails only when the caller gave up and cancelled it.
        if not failure.check(CancelledError):
            _log.failure("Answering {function!r} failed", failure, function=self.function)


def _closed_error() -> TaskError:
    return TaskError(wire.WORKER_LOST, "client closed")


@implementer(ITaskPool)
class FakeTaskPool:
    """
    An in-memory :class:`~taskoffload.client.ITaskPool`.

    :param tasks: if given, the functions to run by name (see the module
        docstring), registered as a worker registers a ``TASKS`` mapping: a name
        not in it fails with ``unknown_function``, arguments that do not fit the
        function's signature with ``bad_arguments``, a function that raises with
        ``task_failed`` typed by the exception's class name, each with the
        worker's message.  A function that declares a ``progress`` parameter gets
        a callable that reports progress to the caller, as on a worker, and (with
        a ``clock``) a ``@task(timeout=...)`` holds the calls that give no
        timeout to its deadline.
        Every call runs at once, whatever ``slots`` says.
    :param clock: if given, timeouts run on it, as the client's and the worker's
        do; without one, no call ever times out.
    :param timeout: the default seconds to wait for a result, as
        :class:`~taskoffload.client.TaskClient`'s ``timeout``.
    :param slots: what :meth:`slots` says: how many tasks the pool runs at once;
        ``None`` (the default) for a pool that has not said yet, as a client that
        has not connected.
    :param prefetch: as :class:`~taskoffload.client.TaskClient`'s; only
        :meth:`capacity` uses it.
    :param lanes: the slots of each lane other than the default (``slots`` is
        the default lane's), for :meth:`slots` and :meth:`capacity`; each task's
        lane is its ``@task(lane=...)``, and it runs here whatever its lane.
    :raises ValueError: for an out-of-range number, as the real client.
    :ivar calls: every call made, oldest first, answered or not.
    :ivar closed: whether :meth:`close` was called.
    """

    def __init__(
        self,
        tasks: Mapping[str, Callable[..., Any]] | None = None,
        *,
        clock: IReactorTime | None = None,
        timeout: float | None = None,
        slots: int | None = None,
        prefetch: int = 0,
        lanes: Mapping[str, int] | None = None,
    ) -> None:
        check_timeout(timeout, or_none=True)
        if slots is not None and slots < 1:
            raise ValueError("slots must be at least 1, or None")
        if prefetch < 0:
            raise ValueError("prefetch must not be negative")
        self.tasks = dict(tasks) if tasks is not None else None
        self.calls: list[FakeCall] = []
        self.closed = False
        self._clock = clock
        self._timeout = timeout
        self._slots = slots
        self._prefetch = prefetch
        self._lanes = dict(lanes) if lanes else {}
        self._routes: dict[str, str] = {}
        self._catalogue: list[dict[str, Any]] | None = None
        self._ids = itertools.count(1)
        self._runner: TaskRunner | None = None
        if self.tasks is not None:
            registry = TaskRegistry.from_mapping(self.tasks)
            self._routes = registry.routes()
            self._catalogue = catalogue(registry.tasks)
            # Without a clock, a clock that never moves: deadlines never pass.
            # No slots: every call runs at once.
            self._runner = TaskRunner(registry, clock if clock is not None else Clock(), lane=None)

    @property
    def pending(self) -> list[FakeCall]:
        """The calls not answered yet, oldest first."""
        return [call for call in self.calls if not call.answered]

    def call(self, function: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)`` with the default timeout.

        :return: the Deferred of the recorded :class:`FakeCall`.
        """
        return self.send_task(function, args, kwargs)

    def send_task(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Any], object] | None = None,
    ) -> Deferred[Any]:
        """
        Record a call and, with ``tasks``, run it.

        :return: the Deferred of the recorded :class:`FakeCall`.
        :raises ValueError: if ``timeout`` is not a positive finite number, as
            with the real client.
        """
        check_timeout(timeout)
        if self.closed:
            return defer.fail(_closed_error())
        limit = timeout if timeout is not None else self._timeout
        request = wire.Request(
            id=next(self._ids),
            function=function,
            args=tuple(args),
            kwargs=dict(kwargs) if kwargs else {},
            timeout=limit,
        )
        # What the worker reads is what the client could write.
        refused: TaskError | None = None
        line = encode_request_or_error(request)
        if isinstance(line, TaskError):
            refused = line
        else:
            try:
                received = wire.decode_message(line[:-1])
            except wire.BadMessage as e:
                refused = TaskError(e.code, e.message)
            else:
                assert isinstance(received, wire.Request)
                request = received
        call = FakeCall(
            function,
            request.args,
            request.kwargs,
            timeout,
            on_progress,
            request_id=request.id,
            # A refused call is answered at once: nothing to time out.
            clock=self._clock if refused is None else None,
            time_limit=limit,
        )
        self.calls.append(call)
        if refused is not None:
            call.deferred.errback(refused)
            return call.deferred
        if self._runner is not None:
            call._run(self._runner, request)
        return call.deferred

    def close(self) -> Deferred[None]:
        """
        Stop, as :meth:`TaskClient.close <taskoffload.client.TaskClient.close>`
        does: the calls not answered yet fail with ``worker_lost`` ("client
        closed") and their tasks are cancelled; calls made from now on fail the
        same way at once, and are not recorded.

        :return: a Deferred that has fired: a fake pool has no connections to wait for.
        """
        self.closed = True
        for call in self.pending:
            call._give_up(_closed_error())
        return defer.succeed(None)

    def slots(self, lane: str | None = None) -> int | None:
        """
        :param lane: a lane's name, or ``None`` for all of them.
        :return: the ``slots`` the pool was given for ``lane`` (``slots`` for
            the default lane, ``lanes`` for the others), or their sum: ``None``
            unless told one.
        """
        if lane is None:
            known = [n for n in (self._slots, *self._lanes.values()) if n]
            return sum(known) if known else None
        if lane == DEFAULT_LANE:
            return self._slots
        return self._lanes.get(lane)

    def capacity(self, lane: str | None = None) -> int | None:
        """
        :return: :meth:`slots` of ``lane`` times one more than ``prefetch``, as
            the real client says; ``None`` without slots.
        """
        return pool_capacity(self.slots(lane), self._prefetch)

    def lane_of(self, function: str) -> str:
        """:return: the lane of ``function``: its ``@task(lane=...)``, else the default."""
        return self._routes.get(function, DEFAULT_LANE)

    def catalogue(self) -> list[dict[str, Any]] | None:
        """:return: ``tasks`` described as a worker describes them; ``None`` without ``tasks``."""
        return list(self._catalogue) if self._catalogue is not None else None

    def describe(self, timeout: float = 5.0) -> Deferred[list[dict[str, Any]] | None]:
        """:return: a Deferred that has fired with :meth:`catalogue`."""
        return defer.succeed(self.catalogue())
