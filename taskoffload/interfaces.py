"""
The seams between taskoffload's parts, as zope interfaces: what the gateway needs of
a pool (:class:`ITaskPool`, provided by :class:`taskoffload.client.TaskClient` and
:class:`taskoffload.testing.FakeTaskPool`), and what a pool's supervisor does to
processes (:class:`IProcessControl`, provided by
:class:`taskoffload.processes.ProcessControl`; the tests record it instead).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport
from zope.interface import Interface

__all__ = ["IProcessControl", "ITaskPool"]


class ITaskPool(Interface):
    """Something that runs named tasks and tells the caller how they ended."""

    def call(function: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)`` with the default timeout.

        :return: a Deferred that fires with the task's result or fails with
            :class:`TaskError`.
        """

    def send_task(
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Any], object] | None = None,
    ) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)``.

        :param timeout: seconds to wait for the result, or ``None`` for the
            pool's default.
        :param on_progress: called with each progress value the task reports.
        :return: a Deferred that fires with the task's result or fails with
            :class:`TaskError`; cancelling it cancels the task.
        """

    def slots(lane: str | None = None) -> int | None:
        """
        :param lane: a lane's name, or ``None`` for every lane.
        :return: how many tasks the pool runs at once on ``lane`` (its workers
            times their concurrency), or ``None`` while the pool has not said.
        """

    def capacity(lane: str | None = None) -> int | None:
        """
        :param lane: a lane's name, or ``None`` for every lane.
        :return: how many calls the pool takes at once on ``lane`` before further
            calls wait in line on the caller's side: its :meth:`slots`, plus what
            it sends ahead to busy workers; ``None`` while the pool has not said.
            The gateway divides each lane's among its clients (its fair share).
        """

    def lane_of(function: str) -> str:
        """
        :return: the lane whose workers run ``function``, as far as the pool has
            said (``"default"`` until it has).
        """

    def catalogue() -> list[dict[str, Any]] | None:
        """
        :return: the pool's tasks described (see :mod:`taskoffload.catalogue`),
            sorted by name; ``None`` while the pool has not said.
        """

    def describe(timeout: float = 5.0) -> Deferred[list[dict[str, Any]] | None]:
        """
        :return: a Deferred that fires with :meth:`catalogue` once the pool has
            said (asking it if need be), or with ``None`` after ``timeout`` seconds.
        """

    def close() -> Deferred[None]:
        """
        Stop: calls waiting or in flight fail with :class:`TaskError`
        ``worker_lost``, and so do calls made from now on.

        :return: a Deferred that fires once the pool's connections are gone.
        """


class IProcessControl(Interface):
    """
    What a worker pool's supervisor does to processes: start its fork servers and
    send signals (provided by :class:`taskoffload.processes.ProcessControl`).
    """

    def spawn_fork_server(
        protocol: IProcessProtocol,
        listen_fd: int,
        lifeline_fd: int,
        lane_fds: Sequence[int] = (),
    ) -> IProcessTransport:
        """
        Start a fork server: ``python -m taskoffload._forkserver``, its standard
        input, output and error piped to ``protocol``.

        :param listen_fd: the shared listening socket, the fork server's fd 3.
        :param lifeline_fd: the read end of the fork server's lifeline pipe, its
            fd 4 (the caller closes its own copy).
        :param lane_fds: the listening sockets of the pool's lanes, in order: its
            fds 5 and up.
        :return: the fork server's process transport, also given to ``protocol``.
        """

    def kill(pid: int, signum: int) -> None:
        """
        Send ``signum`` to process ``pid``; a process that is already gone is no
        error.
        """
