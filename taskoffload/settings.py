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
from taskoffload.lanes import DEFAULT_LANE, LaneInfo

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
    :ivar pool_slots: how many tasks the worker's lane runs at once (the whole
        pool, without lanes), told to clients so they open no more connections
        than that.
    :ivar lane: the lane the worker serves: it runs only that lane's tasks.
    :ivar lanes: the pool's other lanes, told to clients.
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
    lane: str = DEFAULT_LANE
    lanes: tuple[LaneInfo, ...] = ()

    @classmethod
    def from_config(cls, config: PoolConfig, worker_id: int, index: int = 0) -> WorkerSettings:
        """
        The settings of one worker of the pool ``config`` describes.

        :param worker_id: the worker's process id.
        :param index: the worker's slot, which decides its lane.
        """
        position = config.lane_of_slot(index)
        lane_workers = config.default_count if position is None else config.lanes[position].count
        return cls(
            lane=config.lane_name(index),
            lanes=config.lane_infos(),
            concurrency=config.concurrency,
            max_message=config.max_message,
            idle_timeout=config.idle_timeout,
            task_timeout=config.task_timeout,
            worker_id=worker_id,
            pool_slots=lane_workers * config.concurrency or None,
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
    lane: str
    lanes: tuple[LaneInfo, ...]
