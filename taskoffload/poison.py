"""
Poison quarantine: a call (function and arguments) that killed
:data:`KILLS_TO_QUARANTINE` workers within the window is not sent again for the
cooldown; its callers get ``poisoned`` at once.

One :class:`PoisonTable` per :class:`~taskoffload.client.TaskClient` (so per
gateway process).  A death counts when the pool confirms it (the cause of the
death came back, :mod:`taskoffload.inquiry`): one kill for each distinct call
that was in flight to the dead worker.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import orjson
from twisted.internet.interfaces import IReactorTime

from taskoffload import wire
from taskoffload.errors import TaskError

__all__ = [
    "DEFAULT_COOLDOWN",
    "DEFAULT_WINDOW",
    "KILLS_TO_QUARANTINE",
    "MAX_KEYS",
    "PoisonTable",
    "call_key",
]

#: Kills of one call within the window that quarantine it.
KILLS_TO_QUARANTINE: Final = 2
#: Seconds within which those kills count (``--poison-window``).
DEFAULT_WINDOW: Final = 60.0
#: Seconds a quarantined call is refused (``--poison-cooldown``).
DEFAULT_COOLDOWN: Final = 300.0
#: Calls the table remembers; beyond, the one least recently killed is forgotten.
MAX_KEYS: Final = 10_000


def call_key(function: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """
    :return: the canonical key of a call: the SHA-256 of its function,
        positional and keyword arguments as JSON with sorted keys.  (So
        ``f(3)`` and ``f(x=3)`` are two calls.)
    """
    value = [function, list(args), dict(kwargs)]
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        # What orjson refuses (huge integers, non-string keys): the slower
        # encoder, or the repr, which is stable enough for one process.
        try:
            data = wire.dumps(value)
        except (TypeError, ValueError, RecursionError):
            data = repr(value).encode("utf-8", "replace")
    return hashlib.sha256(data).hexdigest()


class _Entry:
    __slots__ = ("function", "kills", "until")

    def __init__(self, function: str) -> None:
        self.function = function
        #: When it killed a worker, within the window.
        self.kills: list[float] = []
        #: When its quarantine ends, if it is quarantined.
        self.until: float | None = None


class PoisonTable:
    """
    The calls that killed workers lately, and those quarantined.

    :param clock: provides ``seconds()``.
    :param window: seconds within which :data:`KILLS_TO_QUARANTINE` kills
        quarantine a call; 0 turns quarantine off.
    :param cooldown: seconds a quarantined call is refused.
    :param max_keys: calls remembered at most.
    :ivar refused: calls answered ``poisoned``.
    :ivar killed: kills counted.
    """

    def __init__(
        self,
        clock: IReactorTime,
        window: float = DEFAULT_WINDOW,
        cooldown: float = DEFAULT_COOLDOWN,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if window < 0 or cooldown < 0:
            raise ValueError("poison_window and poison_cooldown must not be negative")
        self._clock = clock
        self.window = window
        self.cooldown = cooldown
        self._max_keys = max_keys
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.refused = 0
        self.killed = 0

    @property
    def enabled(self) -> bool:
        """Whether kills are counted at all (a window above 0)."""
        return self.window > 0

    def _current(self, key: str, now: float) -> _Entry | None:
        """:return: the entry of ``key``, its old kills and ended quarantine dropped."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.until is not None and entry.until <= now:
            # Served its time: it starts afresh.
            entry.until = None
            entry.kills.clear()
        if entry.until is not None:
            return entry  # its kills stand while it is quarantined
        entry.kills = [t for t in entry.kills if t > now - self.window]
        if not entry.kills:
            del self._entries[key]
            return None
        return entry

    def kills(self, key: str) -> int:
        """:return: the kills of ``key`` within the window."""
        entry = self._current(key, self._clock.seconds())
        return len(entry.kills) if entry is not None else 0

    def kills_of(self, function: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
        """:return: the kills of the call ``function(*args, **kwargs)`` within the window."""
        return self.kills(call_key(function, args, kwargs))

    def killed_twice(self, function: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
        """
        :return: whether a call lost with its worker just now makes
            :data:`KILLS_TO_QUARANTINE` kills with those counted: it is not to
            be sent again.
        """
        if not self.enabled or not self._entries:
            return False
        return self.kills_of(function, args, kwargs) + 1 >= KILLS_TO_QUARANTINE

    def record(
        self,
        calls: Iterable[tuple[str, Sequence[Any], Mapping[str, Any]]],
        counted: set[str] | None = None,
    ) -> None:
        """
        One worker died with ``calls`` (function, args, kwargs) in flight: count
        one kill for each distinct call.

        :param counted: the calls already counted for this death, by key,
            which are not counted again; updated.
        """
        if not self.enabled:
            return
        now = self._clock.seconds()
        keys = {call_key(*call): call[0] for call in calls}
        if counted is not None:
            keys = {key: function for key, function in keys.items() if key not in counted}
            counted.update(keys)
        for key, function in keys.items():
            entry = self._current(key, now) or _Entry(function)
            self._entries[key] = entry
            self._entries.move_to_end(key)
            entry.kills.append(now)
            self.killed += 1
            if len(entry.kills) >= KILLS_TO_QUARANTINE and entry.until is None:
                entry.until = now + self.cooldown
        while len(self._entries) > self._max_keys:
            self._entries.popitem(last=False)

    def refusal(
        self, function: str, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> TaskError | None:
        """
        :return: the ``poisoned`` error a new call is answered with, if it is
            quarantined (and counts it), else ``None``.
        """
        if not self._entries:
            return None
        now = self._clock.seconds()
        entry = self._current(call_key(function, args, kwargs), now)
        if entry is None or entry.until is None:
            return None
        self.refused += 1
        return TaskError(
            wire.POISONED,
            f"{function} with these arguments killed {len(entry.kills)} workers within "
            f"{self.window:g} s: refused for {entry.until - now:.0f} s more",
        )

    def quarantined(self) -> int:
        """:return: the calls quarantined now."""
        now = self._clock.seconds()
        return sum(1 for e in self._entries.values() if e.until is not None and e.until > now)

    def status(self) -> dict[str, int]:
        """The ``poison`` part of the gateway's ``/status``."""
        return {"quarantined": self.quarantined(), "refused": self.refused, "kills": self.killed}
