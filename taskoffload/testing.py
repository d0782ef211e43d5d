"""
In-memory fakes of taskoffload's seams, for the tests of code that uses them.

:class:`FakeTaskPool` provides :class:`~taskoffload.client.ITaskPool` without
workers or sockets.  It works in one of two modes:

- scripted (the default): every call is recorded as a :class:`FakeCall` and stays
  unanswered until the test answers it with :meth:`FakeCall.succeed`,
  :meth:`FakeCall.fail` or :meth:`FakeCall.progress`, in whatever order it likes;
- with ``tasks``: each call runs the named function at once and its Deferred has
  fired by the time ``send_task`` returns, as a worker would have answered it.

Either way, cancelling a call's Deferred fails it with ``TaskError("cancelled")``,
as :class:`~taskoffload.client.TaskClient` does.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from taskoffload import wire
from taskoffload.client import ITaskPool, TaskError
from taskoffload.registry import PROGRESS_PARAMETER

__all__ = ["FakeCall", "FakeTaskPool"]


class FakeCall:
    """
    One call made on a :class:`FakeTaskPool`, and the means to answer it.

    :ivar function: the task name called.
    :ivar args: the positional arguments.
    :ivar kwargs: the keyword arguments.
    :ivar timeout: the timeout the caller asked for, or ``None``.
    :ivar on_progress: the caller's progress callable, or ``None``.
    :ivar deferred: the Deferred the caller got.
    :ivar cancelled: the caller cancelled the Deferred before it had fired.
    :ivar progress_sent: the progress values reported so far, in order.
    """

    def __init__(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_progress: Callable[[Any], object] | None,
    ) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.on_progress = on_progress
        self.cancelled = False
        self.progress_sent: list[Any] = []
        self.deferred: Deferred[Any] = Deferred(self._cancel)

    def __repr__(self) -> str:
        return (
            f"<FakeCall {self.function}(args={self.args!r}, kwargs={self.kwargs!r}) "
            f"{'cancelled' if self.cancelled else 'answered' if self.answered else 'pending'}>"
        )

    @property
    def answered(self) -> bool:
        """The caller has its outcome: a result, an error, or its own cancellation."""
        return self.deferred.called

    def succeed(self, value: Any = None) -> None:
        """
        Answer with a result.  Ignored after a cancellation, as a worker's late
        reply is.

        :raises twisted.internet.defer.AlreadyCalledError: if already answered
            otherwise.
        """
        if not self.cancelled:
            self.deferred.callback(value)

    def fail(self, code: str, message: str, type: str | None = None) -> None:
        """
        Answer with :class:`~taskoffload.client.TaskError` ``(code, message, type)``.
        Ignored after a cancellation.

        :param code: one of :data:`taskoffload.wire.ERROR_CODES`.
        :param type: the exception class name, for ``task_failed``.
        :raises ValueError: if ``code`` is not a documented error code.
        :raises twisted.internet.defer.AlreadyCalledError: if already answered
            otherwise.
        """
        if code not in wire.ERROR_CODES:
            raise ValueError(f"{code!r} is not one of the wire format's error codes")
        if not self.cancelled:
            self.deferred.errback(TaskError(code, message, type))

    def progress(self, value: Any) -> None:
        """
        Report progress: calls the caller's ``on_progress``, if it gave one, unless
        the call is already answered (a late report is dropped, as the client does).
        """
        if self.answered:
            return
        self.progress_sent.append(value)
        if self.on_progress is not None:
            self.on_progress(value)

    def _cancel(self, deferred: Deferred[Any]) -> None:
        self.cancelled = True
        deferred.errback(TaskError(wire.CANCELLED, "cancelled by the caller"))


@implementer(ITaskPool)
class FakeTaskPool:
    """
    An in-memory :class:`~taskoffload.client.ITaskPool`.

    :param tasks: if given, the functions to run by name, at once (see the module
        docstring); a name not in it fails with ``unknown_function``, arguments that
        do not fit the function's signature with ``bad_arguments``, and a function
        that raises with ``task_failed`` typed by the exception's class name.  A
        function that declares a ``progress`` parameter gets a callable that reports
        progress to the caller, as on a worker.  Functions must be synchronous.
    :ivar calls: every call made, oldest first, answered or not.
    """

    def __init__(self, tasks: Mapping[str, Callable[..., Any]] | None = None) -> None:
        self.tasks = dict(tasks) if tasks is not None else None
        self.calls: list[FakeCall] = []

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
        Record a call and, with ``tasks``, answer it at once.

        :return: the Deferred of the recorded :class:`FakeCall`.
        :raises ValueError: if ``timeout`` is not a positive finite number, as
            with the real client.
        """
        if timeout is not None and not 0 < timeout < math.inf:
            raise ValueError("timeout must be a positive number of seconds")
        call = FakeCall(function, tuple(args), dict(kwargs) if kwargs else {}, timeout, on_progress)
        self.calls.append(call)
        if self.tasks is not None:
            self._run(call, self.tasks)
        return call.deferred

    def _run(self, call: FakeCall, tasks: Mapping[str, Callable[..., Any]]) -> None:
        """Answer ``call`` by running its function, as a worker would."""
        f = tasks.get(call.function)
        if f is None:
            call.fail(wire.UNKNOWN_FUNCTION, f"no task named {call.function!r}")
            return
        kwargs = dict(call.kwargs)
        try:
            signature: inspect.Signature | None = inspect.signature(f)
        except (TypeError, ValueError):
            # Some builtins have no signature to check; let the call decide.
            signature = None
        if signature is not None:
            if PROGRESS_PARAMETER in signature.parameters:
                if PROGRESS_PARAMETER in kwargs:
                    call.fail(
                        wire.BAD_ARGUMENTS,
                        f"{call.function}: 'progress' is supplied by the worker, not the caller",
                    )
                    return
                kwargs[PROGRESS_PARAMETER] = call.progress
            try:
                signature.bind(*call.args, **kwargs)
            except TypeError as e:
                call.fail(wire.BAD_ARGUMENTS, f"{call.function}: {e}")
                return
        try:
            result = f(*call.args, **kwargs)
        except Exception as e:
            call.fail(wire.TASK_FAILED, str(e), type(e).__name__)
            return
        call.succeed(result)
