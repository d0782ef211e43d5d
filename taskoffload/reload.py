"""
:class:`RollingReload`: replace every worker of a pool with one running the task
modules imported afresh, one slot at a time, each after its tasks finish: a code
deploy without a failed request (what ``SIGHUP`` asks of a pool).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload.forkserver_client import ForkServerClient
from taskoffload.slots import SlotState, WorkerSlot

__all__ = ["RollingReload"]

_log = Logger(namespace="taskoffload.supervisor")


class RollingReload:
    """
    One pool's rolling reloads, one at a time.

    A fresh fork server imports the task modules; once it is ready it forks every
    new worker, and the slots are replaced in order: each slot's process is told
    to stop (it finishes its tasks first), its replacement comes from the fresh
    fork server, and the next slot's turn comes when that replacement serves.

    :param slots: the pool's worker slots, by index.
    :param fork_servers: the pool's fork servers.
    :param fork: asks for a new process in a slot.
    :param clock: times the reload.
    :ivar completed: how many reloads have completed.
    """

    def __init__(
        self,
        slots: Callable[[], Mapping[int, WorkerSlot]],
        fork_servers: ForkServerClient,
        fork: Callable[[WorkerSlot], None],
        clock: IReactorTime,
    ) -> None:
        self._slots = slots
        self._fork_servers = fork_servers
        self._fork = fork
        self._clock = clock
        # Slots still to replace in the reload under way, or None.
        self._queue: list[int] | None = None
        self._replacing: int | None = None
        self._started = 0.0
        self.completed = 0

    @property
    def under_way(self) -> bool:
        """Whether a reload has started and not yet completed or been aborted."""
        return self._queue is not None or self._fork_servers.fresh is not None

    def start(self) -> None:
        """Start a reload, unless one is under way."""
        if self.under_way:
            _log.info("A reload is already under way")
            return
        _log.info("Reloading: starting a fork server with the task modules imported afresh")
        self._queue = sorted(self._slots())
        self._started = self._clock.seconds()
        self._fork_servers.spawn(fresh=self)

    # What the pool reports

    def fresh_code_ready(self) -> None:
        """The fresh fork server is ready (and forks from now on): replace the first slot."""
        self._next()

    def fresh_code_failed(self, text: str) -> None:
        """The fresh fork server could not import the task modules: the reload is aborted."""
        self._queue = None
        _log.error("Reload aborted, the workers keep the old code: {text}", text=text)

    def fresh_code_exited(self, reason: Failure) -> None:
        """The fresh fork server exited before it was ready: the reload is aborted."""
        self._queue = None
        _log.error(
            "Reload aborted: the new fork server exited ({reason})",
            reason=reason.getErrorMessage(),
        )

    def slot_serving(self, slot: WorkerSlot) -> None:
        """``slot``'s process serves: if it is the replacement awaited, go on to the next."""
        if self._replacing == slot.index:
            self._next()

    def _next(self) -> None:
        queue = self._queue
        if queue is None:
            return
        slots = self._slots()
        if queue:
            slot = slots[queue.pop(0)]
            self._replacing = slot.index
            if slot.pid is None:
                # (A slot waiting for a backoff restart gets the new code then.)
                if slot.state is SlotState.DOWN:
                    self._fork(slot)
                return
            _log.info(
                "Reload: replacing worker {index} (pid {pid}) once its tasks finish",
                index=slot.index,
                pid=slot.pid,
            )
            slot.retire()
            return
        self._queue = None
        self._replacing = None
        self.completed += 1
        self._fork_servers.retire_old()
        _log.info(
            "Reload complete: {count} workers replaced in {elapsed:.2f} s",
            count=len(slots),
            elapsed=self._clock.seconds() - self._started,
        )
