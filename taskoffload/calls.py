"""
One call of a :class:`~taskoffload.client.TaskClient`, from ``send_task`` to its
final reply: its record, whose state moves only along the transitions a call can
make, its timer, and the line of calls waiting for a connection.

Also what a client checks and says about a call, in one place so that
:class:`taskoffload.testing.FakeTaskPool` checks and says the same.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from taskoffload import wire
from taskoffload.errors import TaskError
from taskoffload.lanes import DEFAULT_LANE

__all__ = [
    "ON_PROGRESS_RAISED",
    "Call",
    "CallState",
    "CallStateError",
    "Carrier",
    "WaitingLine",
    "cancelled_error",
    "check_timeout",
    "encode_request_or_error",
    "timeout_error",
]

_FOREVER: Final = float("inf")

#: The log format of the failure that a caller's ``on_progress`` raised, with the
#: task name as ``function``.
ON_PROGRESS_RAISED: Final = "on_progress of {function!r} raised"


def check_timeout(timeout: float | None, *, or_none: bool = False) -> None:
    """
    Check a timeout given to a pool.

    :param timeout: seconds, or ``None``, which always passes.
    :param or_none: the message says that ``None`` is allowed too (where it is
        the default).
    :raises ValueError: if ``timeout`` is not ``None`` nor a positive finite number.
    """
    if timeout is not None and not 0 < timeout < _FOREVER:
        suffix = ", or None" if or_none else ""
        raise ValueError(f"timeout must be a positive number of seconds{suffix}")


def encode_request_or_error(request: wire.Request) -> bytes | TaskError:
    """
    Encode ``request`` as the client writes it.

    :return: the line, delimiter included, or the ``bad_request``
        :class:`TaskError` a call fails with when its arguments cannot be sent.
    """
    try:
        return wire.encode_request(request)
    except (TypeError, ValueError, RecursionError) as e:
        return TaskError(wire.BAD_REQUEST, f"the arguments cannot be sent as JSON: {e}")


def timeout_error(seconds: float) -> TaskError:
    """
    :param seconds: the call's timeout.
    :return: the error of a call that had no reply within its timeout.
    """
    return TaskError(wire.TIMEOUT, f"no reply within {seconds:g} seconds")


def cancelled_error() -> TaskError:
    """:return: the error of a call whose caller cancelled its Deferred."""
    return TaskError(wire.CANCELLED, "cancelled by the caller")


class CallState(enum.Enum):
    """Where a call is in its life."""

    #: Not sent: waiting in line for a connection (or being sent on an idle one).
    QUEUED = "queued"
    #: Written on a connection; its caller waits for the answer.
    SENT = "sent"
    #: Still on a connection, but its caller has had an answer (a timeout, a
    #: cancel, the client's close, a bad reply): the worker's final reply is only
    #: awaited to free the connection.
    ABANDONED = "abandoned"
    #: Off every connection and out of the line, for good.
    FINISHED = "finished"


#: The states each state may move to.
_MOVES: Final[Mapping[CallState, frozenset[CallState]]] = {
    CallState.QUEUED: frozenset({CallState.SENT, CallState.FINISHED}),
    # Back to QUEUED: the worker handed it back unrun, said goodbye before it, or
    # was lost with an idempotent task.
    CallState.SENT: frozenset({CallState.QUEUED, CallState.ABANDONED, CallState.FINISHED}),
    CallState.ABANDONED: frozenset({CallState.FINISHED}),
    CallState.FINISHED: frozenset(),
}

#: The states in which the caller still waits for an answer.
_OWED: Final = frozenset({CallState.QUEUED, CallState.SENT})


class CallStateError(Exception):
    """A call was moved where its state does not lead, or answered when it may not be."""


class Carrier(Protocol):
    """The connection a sent call is on, as far as the call needs it."""

    def cancel(self, call: Call) -> None:
        """Ask the worker to cancel ``call``."""


class Call:
    """
    One task, from ``send_task`` to its final reply.

    Its :attr:`state` changes only through :meth:`move` (and :meth:`finish`),
    which refuse a transition its current state does not allow; its Deferred
    fires only through :meth:`answer`, once, after the call has left the states
    in which its caller waits (so a call is never answered twice).

    :param give_up: what to do when the caller cancels the Deferred or the
        timeout passes: called with the call and its error.
    :ivar carrier: the connection it is on, while sent or abandoned.
    :ivar deadline: the reactor time its timeout ends, if it has one.
    :ivar retried: sent a second time after its first connection was lost.
    :ivar lane: the lane whose line and connections it is on.
    """

    __slots__ = (
        "_answered",
        "_give_up",
        "_state",
        "_timer",
        "args",
        "carrier",
        "deadline",
        "deferred",
        "function",
        "id",
        "kwargs",
        "lane",
        "on_progress",
        "retried",
        "timeout",
    )

    def __init__(
        self,
        request_id: int,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_progress: Callable[[Any], object] | None,
        give_up: Callable[[Call, TaskError], None],
    ) -> None:
        self.id = request_id
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.on_progress = on_progress
        self._give_up = give_up
        self.deferred: Deferred[Any] = Deferred(lambda _: give_up(self, cancelled_error()))
        self.deadline: float | None = None
        self._timer: IDelayedCall | None = None
        self._state = CallState.QUEUED
        self._answered = False
        self.carrier: Carrier | None = None
        self.retried = False
        self.lane = DEFAULT_LANE

    @property
    def state(self) -> CallState:
        """Where the call is in its life."""
        return self._state

    @property
    def owed(self) -> bool:
        """Whether the caller still waits for an answer (the call is queued or sent)."""
        return self._state in _OWED

    def move(self, state: CallState) -> None:
        """
        :raises CallStateError: if the call cannot go from its state to ``state``.
        """
        if state not in _MOVES[self._state]:
            raise CallStateError(
                f"call {self.id} cannot go from {self._state.value} to {state.value}"
            )
        self._state = state

    def finish(self) -> bool:
        """
        Finish the call for good.

        :return: whether its caller still waits for an answer, which is then for
            whoever finished it to give with :meth:`answer`.
        :raises CallStateError: if it is finished already.
        """
        owed = self.owed
        self.move(CallState.FINISHED)
        return owed

    def start_timer(self, reactor: IReactorTime) -> None:
        """
        Count the call's timeout, if it has one, from now: when it passes first,
        the call gives up with a ``timeout`` error.
        """
        if self.timeout is not None:
            self.deadline = reactor.seconds() + self.timeout
            self._timer = reactor.callLater(self.timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        assert self.timeout is not None  # only a call with a timeout has a timer
        self._give_up(self, timeout_error(self.timeout))

    def request_line(self, now: float) -> bytes | TaskError:
        """
        :param now: the reactor's time.
        :return: the request line to write, with what is left of the timeout (so
            the worker keeps the caller's deadline), or the error that keeps the
            arguments from being sent.
        """
        timeout = None
        if self.deadline is not None:
            timeout = max(round(self.deadline - now, 3), 0.001)
        request = wire.Request(
            id=self.id, function=self.function, args=self.args, kwargs=self.kwargs, timeout=timeout
        )
        return encode_request_or_error(request)

    def answer(self, outcome: Any) -> None:
        """
        Fire the Deferred with a result or a :class:`TaskError`; stop the timer.

        :raises CallStateError: if the call was answered already, or is still
            queued or sent (it is abandoned or finished first, so that nothing
            answers it again).
        """
        if self._answered or self.owed:
            raise CallStateError(f"call {self.id} cannot be answered while {self._state.value}")
        self._answered = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(outcome, TaskError):
            self.deferred.errback(outcome)
        else:
            self.deferred.callback(outcome)


class WaitingLine:
    """
    The calls waiting for a connection, oldest first: every call in it is
    :attr:`~CallState.QUEUED`, and every queued call but the one being sent is
    in it.

    A call that times out or is cancelled while waiting stays in the deque,
    finished, and is skipped when reached: removing it would cost a scan.  The
    line's length counts only the calls still waiting.
    """

    def __init__(self) -> None:
        self._calls: deque[Call] = deque()
        self._waiting = 0

    def __len__(self) -> int:
        return self._waiting

    def append(self, call: Call) -> None:
        """Put a call not sent yet at the back of the line."""
        if call.state is not CallState.QUEUED:
            raise CallStateError(f"call {call.id} is {call.state.value}, not queued")
        self._calls.append(call)
        self._waiting += 1

    def requeue(self, call: Call) -> None:
        """Put a sent call, detached from its connection, at the head of the line."""
        call.move(CallState.QUEUED)
        self._calls.appendleft(call)
        self._waiting += 1

    def take(self) -> Call | None:
        """
        Take the oldest waiting call out of the line; it is still queued, for the
        taker to send or finish.
        """
        while self._waiting:
            call = self._calls.popleft()
            if call.state is not CallState.QUEUED:
                continue
            self._left()
            return call
        return None

    def take_where(self, predicate: Callable[[Call], bool]) -> list[Call]:
        """
        Take every waiting call ``predicate`` holds true of out of the line, in
        order; they are still queued, for the taker to put elsewhere.
        """
        taken = [c for c in self._calls if c.state is CallState.QUEUED and predicate(c)]
        if taken:
            chosen = set(map(id, taken))
            self._calls = deque(c for c in self._calls if id(c) not in chosen)
            self._waiting -= len(taken)
        return taken

    def withdraw(self, call: Call) -> None:
        """Finish a waiting call that gives up; its caller is to be answered."""
        call.move(CallState.FINISHED)
        self._left()

    def withdraw_newest(self, count: int) -> list[Call]:
        """
        Finish the ``count`` newest waiting calls (at most as many as wait).

        :return: them, newest first; their callers are to be answered.
        """
        withdrawn: list[Call] = []
        while len(withdrawn) < count:
            call = self._calls.pop()
            if call.state is not CallState.QUEUED:
                continue
            call.move(CallState.FINISHED)
            self._waiting -= 1
            withdrawn.append(call)
        if not self._waiting:
            self._calls.clear()
        return withdrawn

    def withdraw_all(self) -> list[Call]:
        """
        Finish every waiting call.

        :return: them, oldest first; their callers are to be answered.
        """
        withdrawn = [call for call in self._calls if call.state is CallState.QUEUED]
        for call in withdrawn:
            call.move(CallState.FINISHED)
        self._calls.clear()
        self._waiting = 0
        return withdrawn

    def _left(self) -> None:
        """One waiting call left the line."""
        self._waiting -= 1
        if not self._waiting:
            self._calls.clear()
