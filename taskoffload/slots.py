"""
:class:`WorkerSlot`: one worker slot of a pool, the process currently in it, and
the policy that replaces that process when it exits.

A slot is always in one :class:`SlotState`, and moves between them so:

==================  ==========  =================================================
from                to          when
==================  ==========  =================================================
any                 STARTING    a new process is reported in the slot
STARTING            SERVING     it serves
STARTING, SERVING   DOWN        it exits (a fork is asked for at once), or is
                                lost with its fork server
DOWN                WAITING     it exited young without serving: its restart waits
WAITING             DOWN        the restart is due (a fork is asked for), or the
                                pool stops
==================  ==========  =================================================

A process that served, lived :data:`STABLE_SECONDS` or more, or exited as planned
(it recycled itself, or a reload replaced it) is replaced at once; one that dies
young without serving is crash-looping, and waits :data:`MIN_RESTART_DELAY`, then
twice as long each time, up to :data:`MAX_RESTART_DELAY`.
"""

from __future__ import annotations

import enum
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from taskoffload.interfaces import IProcessControl

__all__ = [
    "MAX_RESTART_DELAY",
    "MIN_RESTART_DELAY",
    "STABLE_SECONDS",
    "SlotState",
    "SlotStateError",
    "WorkerSlot",
]

_log = Logger(namespace="taskoffload.supervisor")

#: A worker that dies sooner than this after starting is crash-looping.
STABLE_SECONDS = 1.0
#: First and largest delay before restarting a crash-looping worker.
MIN_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0


class SlotState(enum.Enum):
    """Where a worker slot is in its process's life."""

    #: No process; one is forked as soon as the fork server takes the command.
    DOWN = "down"
    #: No process; its crash-looping last one is restarted after a delay.
    WAITING = "waiting"
    #: A process, not serving yet.
    STARTING = "starting"
    #: A process that takes connections.
    SERVING = "serving"


_NEXT: Final[Mapping[SlotState, frozenset[SlotState]]] = {
    SlotState.DOWN: frozenset({SlotState.STARTING, SlotState.WAITING}),
    # (A process reported while waiting answers a fork asked for earlier.)
    SlotState.WAITING: frozenset({SlotState.DOWN, SlotState.STARTING}),
    SlotState.STARTING: frozenset({SlotState.STARTING, SlotState.SERVING, SlotState.DOWN}),
    SlotState.SERVING: frozenset({SlotState.STARTING, SlotState.SERVING, SlotState.DOWN}),
}


class SlotStateError(RuntimeError):
    """A slot was asked for a transition its state does not allow."""


@attrs.define(eq=False)
class WorkerSlot:
    """
    One worker slot and the process currently in it.

    :ivar clock: schedules restarts and deadline kills.
    :ivar processes: signals the slot's process.
    :ivar fork: asks for a new process in this slot.
    :ivar kill_grace: seconds past a task's deadline before its process is killed.
    :ivar pid: the slot's process, ``None`` while it has none.
    :ivar started: when its process was reported (``clock.seconds()``).
    :ivar retiring: its process was asked to exit, or said it would: its exit is
        planned, no crash.
    :ivar tasks_done: tasks run by the slot's processes that have exited.
    :ivar process_tasks: tasks the current process last reported (its final count
        once it stopped).
    :ivar rss_mib: the resident memory the current process last reported.
    :ivar busy: the task slots the current process last reported taken (tasks
        queued or running, or a connection about to bring one); 0 without one.
    """

    index: int
    clock: IReactorTime = attrs.field(repr=False)
    processes: IProcessControl = attrs.field(repr=False)
    fork: Callable[[WorkerSlot], None] = attrs.field(repr=False)
    kill_grace: float = 1.0
    state: SlotState = attrs.field(default=SlotState.DOWN, init=False)
    pid: int | None = attrs.field(default=None, init=False)
    started: float = attrs.field(default=0.0, init=False)
    retiring: bool = attrs.field(default=False, init=False)
    restarts: int = attrs.field(default=0, init=False)
    #: The delay before the last restart (doubled by each young death).
    delay: float = attrs.field(default=0.0, init=False)
    recycled: int = attrs.field(default=0, init=False)
    killed_for_deadline: int = attrs.field(default=0, init=False)
    tasks_done: int = attrs.field(default=0, init=False)
    process_tasks: int = attrs.field(default=0, init=False)
    rss_mib: float | None = attrs.field(default=None, init=False)
    busy: int = attrs.field(default=0, init=False)
    _restart: IDelayedCall | None = attrs.field(default=None, init=False, repr=False)
    _deadline_kill: IDelayedCall | None = attrs.field(default=None, init=False, repr=False)

    def _move(self, state: SlotState) -> None:
        if state not in _NEXT[self.state]:
            raise SlotStateError(f"worker slot {self.index}: {self.state.name} to {state.name}")
        self.state = state

    # What the pool's events say about the slot's process

    def process_reported(self, pid: int) -> None:
        """
        An event names ``pid`` as this slot's process: if it is a new one, it
        takes the slot, starting.  (A fast worker's "serving" may arrive before
        the fork server's "forked"; whichever comes first counts.)
        """
        if pid == self.pid:
            return
        if self.state is SlotState.WAITING:
            self._cancel_restart()
        self._move(SlotState.STARTING)
        self.pid = pid
        self.started = self.clock.seconds()
        self.busy = 0

    def process_serving(self) -> None:
        """The slot's process takes connections."""
        self._move(SlotState.SERVING)

    def stats(self, tasks_done: int, rss_mib: float | None, busy: int = 0) -> None:
        """The slot's process reports its counts."""
        self.process_tasks = tasks_done
        self.rss_mib = rss_mib
        self.busy = busy

    def final_count(self, tasks_done: int) -> None:
        """The slot's process has stopped serving: its final count, added once it exits."""
        self.process_tasks = tasks_done
        self.busy = 0

    def recycling(self, reason: str) -> None:
        """The slot's process replaces itself: its exit is planned."""
        self.retiring = True
        _log.info(
            "Worker {index} (pid {pid}) recycles itself: {reason}",
            index=self.index,
            pid=self.pid,
            reason=reason,
        )

    def deadline(self, kill_at: float | None) -> None:
        """
        The slot's process runs a task that must end by ``kill_at`` (the
        system-wide monotonic clock), or ran it out (``None``).
        """
        self._cancel_deadline_kill()
        if kill_at is not None:
            # Both processes read the same system-wide monotonic clock.
            delay = max(float(kill_at) - time.monotonic(), 0.0)
            self._deadline_kill = self.clock.callLater(delay, self._kill_overdue, self.pid)

    def _kill_overdue(self, pid: int) -> None:
        self._deadline_kill = None
        if self.pid != pid:
            return
        _log.warn(
            "Worker {index} (pid {pid}) is still running a task {grace} s past its deadline; "
            "killing it",
            index=self.index,
            pid=pid,
            grace=self.kill_grace,
        )
        self.killed_for_deadline += 1
        self.processes.kill(pid, signal.SIGKILL)

    def _cancel_deadline_kill(self) -> None:
        if self._deadline_kill is not None and self._deadline_kill.active():
            self._deadline_kill.cancel()
        self._deadline_kill = None

    # What the supervisor does to the slot

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the slot's process, if it has one."""
        if self.pid is not None:
            self.processes.kill(self.pid, signum)

    def retire(self) -> None:
        """Ask the slot's process to finish its tasks and exit, to be replaced at once."""
        assert self.pid is not None, "only a process can retire"
        self.retiring = True
        self.processes.kill(self.pid, signal.SIGTERM)

    def lost(self) -> None:
        """
        The slot's process is gone with no exit reported (its fork server died):
        the slot is down.  Its counts and planned exit stay as they were.
        """
        self._move(SlotState.DOWN)
        self.pid = None
        self.busy = 0

    def cancel_restart(self) -> None:
        """Drop a restart that waits for its delay (the pool is stopping)."""
        if self.state is SlotState.WAITING:
            self._cancel_restart()
            self._move(SlotState.DOWN)

    def _cancel_restart(self) -> None:
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None

    # Exits and restarts

    def exited(self, code: int | None, restart: bool = True) -> None:
        """
        The slot's process has exited with ``code``: count what it did and, if
        ``restart``, replace it (see the module's description).
        """
        was_serving = self.state is SlotState.SERVING
        # The slot's count goes on across processes; memory was the dead one's.
        self.tasks_done += self.process_tasks
        self.process_tasks = 0
        self.rss_mib = None
        self.busy = 0
        pid, self.pid = self.pid, None
        self._move(SlotState.DOWN)
        self._cancel_deadline_kill()
        if restart:
            self._replace(pid, code, was_serving)

    def _replace(self, pid: int | None, code: int | None, was_serving: bool) -> None:
        if self.retiring:
            # A planned exit: replace it at once (from the current fork server,
            # with the new code during a reload), and it is no crash.
            self.retiring = False
            self.recycled += 1
            self.delay = 0.0
            self.fork(self)
            return
        uptime = self.clock.seconds() - self.started
        if uptime >= STABLE_SECONDS or was_serving:
            # It served, so it is no crash loop (it was killed, or a task took it
            # down): replace it at once.  Backoff is for workers that die before
            # they ever serve.
            self.delay = 0.0
        else:
            self.delay = min(max(self.delay * 2, MIN_RESTART_DELAY), MAX_RESTART_DELAY)
        self.restarts += 1
        _log.warn(
            "Worker {index} (pid {pid}) exited with {code} after {uptime:.2f} s; "
            "restarting in {delay} s",
            index=self.index,
            pid=pid,
            code=code,
            uptime=uptime,
            delay=self.delay,
        )
        if self.delay:
            self._move(SlotState.WAITING)
            self._restart = self.clock.callLater(self.delay, self._restart_due)
        else:
            self.fork(self)

    def _restart_due(self) -> None:
        self._restart = None
        self._move(SlotState.DOWN)
        self.fork(self)

    # Status

    def status(self, now: float) -> dict[str, Any]:
        """
        A JSON-ready summary of the slot, one of the ``workers`` in ``/status``.

        :param now: the time (``clock.seconds()``) the summary is for.
        """
        alive = self.pid is not None
        return {
            "index": self.index,
            "pid": self.pid,
            "state": "down" if not alive else self.state.value,
            "uptime": round(now - self.started, 3) if alive else None,
            "restarts": self.restarts,
            "recycled": self.recycled,
            "tasks_done": self.tasks_done + self.process_tasks,
            "rss_mib": self.rss_mib,
            "busy": self.busy,
        }
