"""
The events a pool's processes send its supervisor, one schema for both ends of the
pipe.

The fork server and each worker write events as JSON lines (one ``write`` each, see
:class:`EventWriter`); the supervisor reads them back with
:func:`decode`.  Every event names the worker slot (``index``, ``None`` for the
fork server's own) and the process (``pid``) it is about.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Final, TypeAlias

import attrs
import orjson
from twisted.logger import LogEvent, formatEvent

__all__ = [
    "PIPE_ATOMIC",
    "BadEvent",
    "Deadline",
    "Event",
    "EventWriter",
    "Exited",
    "Failed",
    "Forked",
    "Log",
    "NotAnEvent",
    "Ready",
    "Recycling",
    "Serving",
    "Stats",
    "Stopped",
    "UnknownEvent",
    "decode",
    "encode",
]


class NotAnEvent(ValueError):
    """A line from the pool is not an event at all (a process wrote other output)."""


class BadEvent(ValueError):
    """A line from the pool is an event, but not one of this schema."""


class UnknownEvent(BadEvent):
    """
    A line from the pool is an event of a kind this schema does not have.

    :ivar document: the event as read.
    """

    def __init__(self, message: str, document: dict[str, Any]) -> None:
        super().__init__(message)
        self.document = document


@attrs.frozen(kw_only=True)
class _Event:
    #: The ``"event"`` field that names this kind on the pipe.
    kind: ClassVar[str] = ""

    #: The worker slot the event is about; ``None`` for the fork server's own.
    index: int | None = None
    #: The process the event is about.
    pid: int


@attrs.frozen(kw_only=True)
class Log(_Event):
    """A worker's log event, formatted."""

    kind: ClassVar[str] = "log"
    level: str = "info"
    namespace: str = "?"
    text: str = ""


@attrs.frozen(kw_only=True)
class Ready(_Event):
    """The fork server has imported the task modules and takes fork commands."""

    kind: ClassVar[str] = "ready"


@attrs.frozen(kw_only=True)
class Failed(_Event):
    """The fork server could not import the task modules; it exits."""

    kind: ClassVar[str] = "failed"
    text: str = ""


@attrs.frozen(kw_only=True)
class Forked(_Event):
    """The fork server forked a worker for slot ``index``."""

    kind: ClassVar[str] = "forked"


@attrs.frozen(kw_only=True)
class Serving(_Event):
    """A worker takes connections."""

    kind: ClassVar[str] = "serving"


@attrs.frozen(kw_only=True)
class Stats(_Event):
    """
    A worker's counts, sent when they change: at most once a second for its task
    count and memory, and sooner for ``busy``, its task slots taken (tasks queued
    or running, or a connection about to bring one): see
    :meth:`~taskoffload._child.WorkerProcess.busy_changed`.
    """

    kind: ClassVar[str] = "stats"
    tasks_done: int = 0
    rss_mib: float | None = None
    busy: int = 0


@attrs.frozen(kw_only=True)
class Deadline(_Event):
    """
    A worker runs a synchronous task with a deadline: kill it at ``kill_at`` (the
    system-wide monotonic clock) if it is still running it; ``None`` when the task
    ended.
    """

    kind: ClassVar[str] = "deadline"
    kill_at: float | None = None


@attrs.frozen(kw_only=True)
class Recycling(_Event):
    """A worker replaces itself (it ran enough tasks or uses too much memory)."""

    kind: ClassVar[str] = "recycling"
    reason: str = ""


@attrs.frozen(kw_only=True)
class Stopped(_Event):
    """A worker has stopped serving; ``tasks_done`` is its final count."""

    kind: ClassVar[str] = "stopped"
    tasks_done: int = 0


@attrs.frozen(kw_only=True)
class Exited(_Event):
    """A worker process has exited with ``code`` (negative: killed by that signal)."""

    kind: ClassVar[str] = "exited"
    code: int | None = None


Event: TypeAlias = (
    Log | Ready | Failed | Forked | Serving | Stats | Deadline | Recycling | Stopped | Exited
)

_KINDS: Final[dict[str, type[Event]]] = {
    cls.kind: cls
    for cls in (Log, Ready, Failed, Forked, Serving, Stats, Deadline, Recycling, Stopped, Exited)
}


def encode(event: Event) -> bytes:
    """
    :return: ``event`` as one JSON line, delimiter included.
    """
    fields = attrs.asdict(event, recurse=False)
    return orjson.dumps({"event": event.kind, **fields}) + b"\n"


def decode(line: bytes) -> Event:
    """
    :param line: one line from the pipe, with or without its delimiter.
    :raises NotAnEvent: if ``line`` is not a JSON object with an ``"event"`` field.
    :raises UnknownEvent: if it names no known kind.
    :raises BadEvent: if its fields do not fit its kind.
    """
    try:
        document: Any = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise NotAnEvent(f"not JSON: {e}") from None
    if not isinstance(document, dict) or "event" not in document:
        raise NotAnEvent("not a JSON object with an event field")
    kind = document.pop("event")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownEvent(f"unknown event kind {kind!r}", {"event": kind, **document})
    try:
        return cls(**document)
    except TypeError as e:
        raise BadEvent(f"fields do not fit: {e}") from None


#: Largest write that a pipe keeps whole when several processes write to it.
PIPE_ATOMIC: Final = 4096


class EventWriter:
    """
    Write events, one JSON line each, to a pipe shared with other processes.

    Each event is one ``write`` of at most :data:`PIPE_ATOMIC` bytes; a longer
    text (a log line, a traceback) is split over several events.

    :ivar index: the worker slot of the writing process; ``None`` for the fork server.
    :ivar pid: the writing process.
    """

    def __init__(self, fd: int, index: int | None) -> None:
        self._fd = fd
        self.index = index
        self.pid = os.getpid()
        self.broken = False

    def send(self, event: Event) -> None:
        """Write one event; a closed pipe (the supervisor is gone) is ignored."""
        data = encode(event)
        if len(data) > PIPE_ATOMIC and isinstance(event, Log | Failed):
            half = len(event.text) // 2
            self.send(attrs.evolve(event, text=event.text[:half]))
            self.send(attrs.evolve(event, text=event.text[half:]))
            return
        if self.broken:
            return
        try:
            os.write(self._fd, data[:PIPE_ATOMIC])
        except OSError:
            self.broken = True

    def log_observer(self, event: LogEvent) -> None:
        """A :mod:`twisted.logger` observer that forwards events to the supervisor."""
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}\n{failure.getTraceback()}"
        level = event.get("log_level")
        self.send(
            Log(
                index=self.index,
                pid=self.pid,
                level=level.name if level is not None else "info",
                namespace=event.get("log_namespace", "?"),
                text=text,
            )
        )
