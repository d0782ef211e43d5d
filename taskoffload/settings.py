"""
:class:`WorkerSettings`: what one worker process's task server is configured
with, most of it taken from the pool's :class:`~taskoffload.config.PoolConfig`.
"""

from __future__ import annotations

from typing import TypedDict

import attrs

from taskoffload import wire
from taskoffload.config import PoolConfig
from taskoffload.defaults import IDLE_TIMEOUT

__all__ = ["WorkerSettings", "WorkerSettingsFields"]


@attrs.frozen(kw_only=True)
class WorkerSettings:
    """
    How one worker's task server serves its connections.

    :ivar concurrency: how many connections may have work at once before the
        process stops taking new connections.
    :ivar max_message: longest accepted line, in bytes.
    :ivar idle_timeout: seconds within which a started line must be finished.
    :ivar task_timeout: the deadline of tasks whose request and registration
        give none.
    :ivar worker_id: how the worker names itself to clients (its process id).
    :ivar pool_slots: how many tasks the whole pool runs at once, told to clients
        so they open no more connections than that.
    :ivar secret: if set, every connection must answer an HMAC challenge with it
        before any request is read.
    """

    concurrency: int = 1
    max_message: int = wire.DEFAULT_MAX_MESSAGE
    idle_timeout: float = IDLE_TIMEOUT
    task_timeout: float | None = None
    worker_id: int | None = None
    pool_slots: int | None = None
    secret: bytes | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_config(cls, config: PoolConfig, worker_id: int) -> WorkerSettings:
        """
        The settings of one worker of the pool ``config`` describes.

        :param worker_id: the worker's process id.
        """
        return cls(
            concurrency=config.concurrency,
            max_message=config.max_message,
            idle_timeout=config.idle_timeout,
            task_timeout=config.task_timeout,
            worker_id=worker_id,
            pool_slots=config.count * config.concurrency or None,
            secret=config.secret,
        )


class WorkerSettingsFields(TypedDict, total=False):
    """The fields of :class:`WorkerSettings`, as keyword arguments that override them."""

    concurrency: int
    max_message: int
    idle_timeout: float
    task_timeout: float | None
    worker_id: int | None
    pool_slots: int | None
    secret: bytes | None
