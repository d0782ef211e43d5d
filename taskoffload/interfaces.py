"""
The seams between taskoffload's parts, as zope interfaces: what the gateway needs of
a pool (:class:`ITaskPool`, provided by :class:`taskoffload.client.TaskClient` and
:class:`taskoffload.testing.FakeTaskPool`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = ["ITaskPool"]


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

    def slots() -> int | None:
        """
        :return: how many tasks the pool runs at once (its workers times their
            concurrency), or ``None`` while the pool has not said.
        """

    def capacity() -> int | None:
        """
        :return: how many calls the pool takes at once before further calls wait
            in line on the caller's side: its :meth:`slots`, plus what it sends
            ahead to busy workers; ``None`` while the pool has not said.  The
            gateway divides this among its clients (its fair share).
        """
