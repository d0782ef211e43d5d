"""
Single flight: while a call of a function with a ``key`` is running, another
call of the same function with the same key joins it instead of starting a
second run.  Every caller gets each progress value and the final outcome of
the one run, on a Deferred of its own.

The key names the work: a joiner's arguments (and timeout) are not looked at,
the run is the first caller's.  Cancelling one caller's Deferred detaches that
caller only (it fails with ``cancelled``); the run is cancelled when its last
caller has left.  Once the run has ended the key is free: the next call starts
a new run (no result is kept).

One :class:`Flights` is shared by a gateway process's sessions, and each
:class:`~taskoffload.client.TaskClient` has its own: keys are not shared
between processes or clients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.errors import TaskError

__all__ = ["Flights"]

_log = Logger(namespace="taskoffload.flights")

#: Starts a run: called with the run's progress callback, returns its Deferred.
Start = Callable[[Callable[[Any], None]], Deferred[Any]]


class _Caller:
    __slots__ = ("deferred", "on_progress")

    def __init__(self, on_progress: Callable[[Any], object] | None) -> None:
        self.on_progress = on_progress
        self.deferred: Deferred[Any] = Deferred()


class _Flight:
    """One run and the callers waiting for it."""

    def __init__(self, flights: Flights, name: tuple[str, str]) -> None:
        self._flights = flights
        self.name = name
        self.callers: list[_Caller] = []
        self.run: Deferred[Any] | None = None

    def join(self, on_progress: Callable[[Any], object] | None) -> Deferred[Any]:
        caller = _Caller(on_progress)
        caller.deferred = Deferred(lambda d: self._leave(caller))
        self.callers.append(caller)
        return caller.deferred

    def start(self, start: Start) -> None:
        try:
            run = start(self._progress)
        except Exception:
            run = Deferred()
            run.errback(Failure())
        self.run = run
        run.addBoth(self._ended)

    def _progress(self, value: Any) -> None:
        for caller in list(self.callers):
            if caller.on_progress is None:
                continue
            try:
                caller.on_progress(value)
            except Exception:
                _log.failure("A progress callback of a shared call raised")

    def _leave(self, caller: _Caller) -> None:
        self.callers.remove(caller)
        others = len(self.callers)
        caller.deferred.errback(
            TaskError(
                wire.CANCELLED,
                f"cancelled (the call goes on for the {others} other callers of its key)"
                if others
                else "cancelled",
            )
        )
        if not others:
            self._flights._forget(self)
            if self.run is not None:
                self.run.cancel()

    def _ended(self, outcome: Any) -> None:
        self._flights._forget(self)
        callers, self.callers = self.callers, []
        for caller in callers:
            if isinstance(outcome, Failure):
                caller.deferred.errback(outcome)
            else:
                caller.deferred.callback(outcome)


class Flights:
    """The calls running with a key, by function and key; see the module."""

    def __init__(self) -> None:
        self._running: dict[tuple[str, str], _Flight] = {}

    def call(
        self,
        function: str,
        key: str,
        start: Start,
        on_progress: Callable[[Any], object] | None = None,
    ) -> Deferred[Any]:
        """
        Join the run of ``function`` under ``key``, or start it with ``start``.

        :param start: called, only when no such run is going, with the run's
            progress callback; returns the run's Deferred, whose cancelling
            cancels the run.
        :param on_progress: called with each progress value of the run from now on.
        :return: a Deferred of this caller's own that fires, or fails, as the
            run's does; cancelling it fails it with ``cancelled`` and leaves
            the run to the other callers, or cancels it if there are none.
        """
        name = (function, key)
        flight = self._running.get(name)
        if flight is not None:
            return flight.join(on_progress)
        flight = self._running[name] = _Flight(self, name)
        # Joined before it starts: a run that ends at once still answers its caller.
        joined = flight.join(on_progress)
        flight.start(start)
        return joined

    def callers(self, function: str, key: str) -> int:
        """:return: how many callers share the run of ``function`` under ``key`` (0: none)."""
        flight = self._running.get((function, key))
        return len(flight.callers) if flight is not None else 0

    def __len__(self) -> int:
        """The runs going."""
        return len(self._running)

    def _forget(self, flight: _Flight) -> None:
        if self._running.get(flight.name) is flight:
            del self._running[flight.name]
