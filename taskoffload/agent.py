"""
A worker pool's answer to HAProxy's agent check (``--agent-listen ENDPOINT``,
roles ``worker`` and ``all``), so that a balancer in front of several pools
sends new connections where task slots are free, and none to a pool that stops.

HAProxy connects to the agent port every ``agent-inter``, reads one line and
applies each word of it; the agent writes the line and closes:

* while the pool serves, ``up ready N%``: ``N`` is the share of the pool's task
  slots (its default lane's workers x ``--concurrency``) that are free, i.e. held by a serving
  worker that is not busy. HAProxy scales the server's configured ``weight`` by
  it. ``ready`` undoes a ``drain`` this agent said before (a reload that ended,
  a pool started again on the same port): HAProxy keeps that state until the
  agent itself lifts it.
* with no slot free, ``up ready 1%`` (:data:`FULL_POOL_WEIGHT`), not ``0%``: HAProxy
  takes a server of weight 0 out of the farm, and were every pool fully busy
  at once it would have none to send to. A pool that has no free slot still
  queues a connection until a worker takes it; at 1% HAProxy weighs it a
  hundredth of an idle pool.
* while the pool stops (``SIGTERM``) or a rolling reload is under way, ``drain``:
  HAProxy sends it no new connection, and the pool finishes what it runs.

The agent answers on until the pool's workers have exited, then closes its port.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from taskoffload.config import PoolConfig
from taskoffload.lanes import DEFAULT_LANE
from taskoffload.sideport import SidePortService
from taskoffload.slots import SlotState, WorkerSlot

__all__ = [
    "FULL_POOL_WEIGHT",
    "STOP_MARGIN",
    "AgentFactory",
    "AgentProtocol",
    "AgentService",
    "AgentSource",
    "agent_line",
    "check_agent_listen",
    "free_slots",
    "pool_line",
]

_log = Logger(namespace="taskoffload.agent")

#: The weight, in percent, a serving pool with no free task slot answers.
FULL_POOL_WEIGHT: Final = 1

#: Seconds past ``--stop-timeout`` the agent waits, at stop, for the pool's
#: workers to exit before it closes its port anyway.
STOP_MARGIN: Final = 5.0


class AgentSource(Protocol):
    """What the agent reads of a pool; a :class:`~taskoffload.supervisor.WorkerPoolService`."""

    @property
    def config(self) -> PoolConfig:
        """The pool's configuration (``count``, ``concurrency``, ``stop_timeout``)."""

    @property
    def workers(self) -> Mapping[int, WorkerSlot]:
        """The pool's worker slots, by index."""

    @property
    def draining(self) -> bool:
        """Whether the pool is stopping or reloading."""

    def wait_for_exit(self) -> Deferred[None]:
        """:return: a Deferred firing once no worker process is alive."""


def check_agent_listen(role: str, listen: str | None) -> None:
    """
    Check ``--agent-listen`` (if given) for ``role``.

    :raise usage.UsageError: if it is given for a role without a pool, or is not
        a TCP server endpoint.
    """
    if listen is None:
        return
    if role == "gateway":
        raise usage.UsageError(
            "--agent-listen is for --role=worker or all: it reports a pool's free task "
            "slots, and a gateway runs no pool"
        )
    try:
        if listen.split(":", 1)[0] not in ("tcp", "tcp6"):
            raise ValueError("not a TCP endpoint")
        serverFromString(None, listen)  # parses it; the reactor is used only to listen
    except (ValueError, TypeError):
        raise usage.UsageError(
            f"--agent-listen {listen!r}: expected a TCP endpoint such as "
            "tcp:9091:interface=127.0.0.1 (HAProxy's agent check connects over TCP)"
        ) from None


def free_slots(slots: Iterable[WorkerSlot], concurrency: int) -> int:
    """
    :param slots: a pool's worker slots.
    :param concurrency: the task slots of one worker.
    :return: the task slots free: those of each serving worker (not one about to
        exit) that its busy count leaves.
    """
    return sum(
        max(concurrency - slot.busy, 0)
        for slot in slots
        if slot.state is SlotState.SERVING and slot.pid is not None and not slot.retiring
    )


def agent_line(draining: bool, free: int, total: int) -> bytes:
    """
    :param draining: the pool is stopping or reloading.
    :param free: its free task slots.
    :param total: all its task slots.
    :return: the agent's answer, one line with its delimiter (see the module's
        description).
    """
    if draining:
        return b"drain\n"
    percent = free * 100 // total if total > 0 else 0
    return b"up ready %d%%\n" % max(percent, FULL_POOL_WEIGHT)


def pool_line(pool: AgentSource) -> bytes:
    """
    :return: the agent's answer for ``pool`` now.  Only the default lane counts:
        the balancer sends connections to the pool's own port, which its
        workers serve; a lane's workers listen on ports of their own.
    """
    config = pool.config
    default = [s for s in pool.workers.values() if config.lane_name(s.index) == DEFAULT_LANE]
    return agent_line(
        pool.draining,
        free_slots(default, config.concurrency),
        config.default_count * config.concurrency,
    )


class AgentProtocol(protocol.Protocol):
    """
    One agent check: write the line, close.

    :param line: returns the line to write.
    """

    def __init__(self, line: Callable[[], bytes]) -> None:
        self._line = line

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._line())
        self.transport.loseConnection()


class AgentFactory(protocol.Factory):
    """
    Builds an :class:`AgentProtocol` per check.

    :param line: returns the line each check gets.
    """

    noisy = False

    def __init__(self, line: Callable[[], bytes]) -> None:
        self._line = line

    def buildProtocol(self, addr: Any) -> AgentProtocol:
        return AgentProtocol(self._line)


class AgentService(SidePortService):
    """
    Answer HAProxy's agent checks about ``pool`` on ``listen`` (see
    :class:`~taskoffload.sideport.SidePortService`).

    :param listen: a Twisted server endpoint string (``tcp:`` or ``tcp6:``).
    :param pool: the pool the answers are about.
    :param reactor: provides the endpoint's ``listen`` and ``IReactorTime``; by
        default the global one.
    """

    listening_as = "HAProxy agent"
    failing_as = "answer agent checks"

    def __init__(self, listen: str, pool: AgentSource, reactor: Any = None) -> None:
        super().__init__(listen, reactor)
        self.pool = pool

    def factory(self) -> AgentFactory:
        return AgentFactory(lambda: pool_line(self.pool))

    def stopService(self) -> Deferred[None]:
        """
        Go on answering (``drain``, the pool stopping) until the pool's workers have
        exited, or ``--stop-timeout`` plus :data:`STOP_MARGIN` seconds passed; then
        close the port.
        """
        Service.stopService(self)
        if self.port is None:
            return defer.succeed(None)
        exited = self.pool.wait_for_exit()
        exited.addTimeout(self.pool.config.stop_timeout + STOP_MARGIN, self._reactor)
        exited.addErrback(self._workers_outlived)
        return exited.addCallback(lambda _: self.close())

    def _workers_outlived(self, failure: Any) -> None:
        failure.trap(defer.TimeoutError)
        _log.warn("Workers still alive; the HAProxy agent stops answering")
