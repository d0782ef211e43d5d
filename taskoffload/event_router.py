"""
:class:`EventRouter`: reads the lines of a worker pool's events pipe, decoded with
:func:`taskoffload.events.decode`, and takes each event where it belongs: to the
worker slot it is about, to the fork servers, or to the log.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from twisted.logger import Logger, LogLevel

from taskoffload.events import (
    BadEvent,
    Deadline,
    Event,
    Exited,
    Failed,
    Forked,
    Log,
    NotAnEvent,
    Ready,
    Recycling,
    Serving,
    Stats,
    Stopped,
    UnknownEvent,
    decode,
)
from taskoffload.forkserver_client import ForkServerClient, ForkServerProtocol
from taskoffload.slots import SlotStateError, WorkerSlot

__all__ = ["EventRouter", "WorkerEvents", "log_raw_output"]

_log = Logger(namespace="taskoffload.supervisor")
_worker_log = Logger(namespace="taskoffload.worker")

#: The ``event`` field of every kind of event the schema has (and the router routes).


class WorkerEvents(Protocol):
    """What an :class:`EventRouter` tells the pool of its workers' lives."""

    def worker_forked(self, slot: WorkerSlot, pid: int) -> None:
        """``pid`` was forked into ``slot`` (the slot knows it already)."""

    def worker_serving(self, slot: WorkerSlot) -> None:
        """``slot``'s process serves (the slot knows it already)."""

    def worker_exited(self, slot: WorkerSlot, code: int | None) -> None:
        """``slot``'s process exited with ``code``."""


def log_raw_output(line: bytes) -> None:
    """Log a line a worker or the fork server wrote to standard output or error."""
    _log.info("{output}", output=line.decode("utf-8", "replace"))


class EventRouter:
    """
    Route each event on a pool's events pipe.

    A line that is not an event is logged as it is; an event of an unknown kind is
    warned of; a malformed one is logged as a failure.  None of them costs the
    pipe, and with it every later exit notice.

    :param slots: the pool's worker slots, by index.
    :param fork_servers: the pool's fork servers, told when one is ready or failed.
    :param pool: told when a worker is forked, serves or exits.
    """

    def __init__(
        self,
        slots: Callable[[], Mapping[int, WorkerSlot]],
        fork_servers: ForkServerClient,
        pool: WorkerEvents,
    ) -> None:
        self._slots = slots
        self._fork_servers = fork_servers
        self._pool = pool

    def line_received(self, line: bytes, source: ForkServerProtocol | None = None) -> None:
        """Route one line from a fork server's events pipe (``source``'s or a worker's)."""
        try:
            event = decode(line)
        except NotAnEvent:
            log_raw_output(line)
            return
        except UnknownEvent as e:
            _log.warn("Unknown event from the pool: {event!r}", event=e.document)
            return
        except BadEvent:
            _log.failure("Bad event from the pool: {line!r}", line=line)
            return
        try:
            self._route(event, source)
        except (KeyError, TypeError, ValueError, SlotStateError):
            # Fields of the wrong type, or a life no process can have (a pid of
            # null): logged, and the pipe carries on.
            _log.failure("Bad event from the pool: {line!r}", line=line)

    def _route(self, event: Event, source: ForkServerProtocol | None) -> None:
        match event:
            case Log():
                _relog(event)
            case Ready():
                self._fork_servers.ready(source)
            case Failed():
                self._fork_servers.failed(source, event.text or "(no reason given)")
            case Forked():
                if (slot := self._reported(event)) is not None:
                    self._pool.worker_forked(slot, event.pid)
            case Serving():
                if (slot := self._reported(event)) is not None:
                    slot.process_serving()
                    self._pool.worker_serving(slot)
            case _:
                slot = self._slot(event.index)
                if slot is not None and slot.pid is not None and slot.pid == event.pid:
                    self._route_current(slot, event)

    def _slot(self, index: int | None) -> WorkerSlot | None:
        return self._slots().get(index) if index is not None else None

    def _reported(self, event: Forked | Serving) -> WorkerSlot | None:
        """The slot of a "forked" or "serving" event, updated to the event's pid."""
        slot = self._slot(event.index)
        if slot is not None:
            slot.process_reported(event.pid)
        return slot

    def _route_current(
        self, slot: WorkerSlot, event: Stats | Deadline | Recycling | Stopped | Exited
    ) -> None:
        """Route an event about ``slot``'s current process."""
        match event:
            case Stats():
                rss = event.rss_mib
                rss_mib = float(rss) if rss is not None else None
                slot.stats(int(event.tasks_done), rss_mib, int(event.busy))
            case Deadline():
                slot.deadline(event.kill_at)
            case Recycling():
                slot.recycling(event.reason)
            case Stopped():
                slot.final_count(int(event.tasks_done))
            case Exited():
                self._pool.worker_exited(slot, event.code)


def _relog(event: Log) -> None:
    """Log a worker's log event again, at its level, saying which worker it came from."""
    try:
        level = LogLevel.levelWithName(event.level)
    except Exception:
        level = LogLevel.info
    _worker_log.emit(
        level,
        "[worker {worker_index} pid {worker_pid}] {text}",
        worker_index=event.index,
        worker_pid=event.pid,
        worker_namespace=event.namespace,
        text=event.text,
    )
