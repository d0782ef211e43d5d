"""
:class:`PoolConfig`: everything a worker pool is started with, and the one line
that carries it from the supervisor to the fork server and the workers.
"""

from __future__ import annotations

import sys

import attrs
import orjson

from taskoffload import wire
from taskoffload.defaults import DEFAULT_POOL_LISTEN, IDLE_TIMEOUT, STOP_TIMEOUT
from taskoffload.lanes import DEFAULT_LANE, Lane, LaneInfo

__all__ = ["PoolConfig"]


@attrs.frozen
class PoolConfig:
    """
    Everything a worker pool is started with.

    :ivar listen: a Twisted server endpoint string (``tcp:`` or ``unix:``).
    :ivar env: environment variables set in the workers.
    """

    listen: str = DEFAULT_POOL_LISTEN
    count: int = 4
    concurrency: int = 1
    tasks: tuple[str, ...] = ("taskoffload.examples",)
    max_message: int = wire.DEFAULT_MAX_MESSAGE
    stop_timeout: float = STOP_TIMEOUT
    env: dict[str, str] = attrs.field(factory=dict)
    #: Seconds within which a started request line must be finished.
    idle_timeout: float = IDLE_TIMEOUT
    #: Replace a worker after this many tasks (``None``: never).
    max_tasks_per_child: int | None = None
    #: Replace a worker whose resident memory passes this many MiB (``None``: never).
    max_memory_per_child: int | None = None
    #: Deadline of tasks whose request and registration give none (``None``: none).
    task_timeout: float | None = None
    #: Seconds past a task's deadline before its worker is killed, if the task
    #: could not be interrupted.
    kill_grace: float = 1.0
    #: Shared secret every connection must prove it knows (``None``: none).
    secret: bytes | None = attrs.field(default=None, repr=False)
    #: Where the workers import from, ahead of their own ``sys.path``: what
    #: :meth:`from_json` read; :meth:`to_json` sends the sending process's path.
    import_path: tuple[str, ...] = ()
    #: Lanes reserving some of the ``count`` workers for their tasks; the others
    #: serve the default lane.
    lanes: tuple[Lane, ...] = ()

    @property
    def default_count(self) -> int:
        """The workers of the default lane: those no lane reserves."""
        return self.count - sum(lane.count for lane in self.lanes)

    def lane_of_slot(self, index: int) -> int | None:
        """
        :return: which of :attr:`lanes` worker slot ``index`` serves, or ``None``
            for the default lane.  The default lane's slots come first, then each
            lane's, in order.
        """
        first = self.default_count
        for position, lane in enumerate(self.lanes):
            if first <= index < first + lane.count:
                return position
            first += lane.count
        return None

    def lane_name(self, index: int) -> str:
        """:return: the name of the lane worker slot ``index`` serves."""
        position = self.lane_of_slot(index)
        return DEFAULT_LANE if position is None else self.lanes[position].name

    def lane_infos(self) -> tuple[LaneInfo, ...]:
        """:return: what workers tell clients of the pool's lanes (not the default)."""
        return tuple(lane.info(self.concurrency) for lane in self.lanes)

    def to_json(self) -> bytes:
        """The configuration line sent to the fork server."""
        return (
            orjson.dumps(
                {
                    "tasks": list(self.tasks),
                    "concurrency": self.concurrency,
                    "count": self.count,
                    "max_message": self.max_message,
                    "stop_timeout": self.stop_timeout,
                    "idle_timeout": self.idle_timeout,
                    "max_tasks_per_child": self.max_tasks_per_child,
                    "max_memory_per_child": self.max_memory_per_child,
                    "task_timeout": self.task_timeout,
                    "kill_grace": self.kill_grace,
                    "secret": self.secret.hex() if self.secret is not None else None,
                    "env": self.env,
                    "path": [p for p in sys.path if p],
                    "lanes": [attrs.asdict(lane) for lane in self.lanes],
                }
            )
            + b"\n"
        )

    @classmethod
    def from_json(cls, line: bytes) -> PoolConfig:
        """
        Read the configuration line :meth:`to_json` wrote, as the fork server and
        each worker do.  (The listening socket is passed to them, not its address.)

        :raises ValueError: if ``line`` is not such a line.
        """
        read = orjson.loads(line)
        if not isinstance(read, dict):
            raise ValueError("the configuration line is not a JSON object")
        secret = read.get("secret")
        try:
            return cls(
                count=int(read["count"]),
                concurrency=int(read["concurrency"]),
                tasks=tuple(read["tasks"]),
                max_message=int(read["max_message"]),
                stop_timeout=float(read["stop_timeout"]),
                env=dict(read.get("env") or {}),
                idle_timeout=float(read["idle_timeout"]),
                max_tasks_per_child=read.get("max_tasks_per_child"),
                max_memory_per_child=read.get("max_memory_per_child"),
                task_timeout=read.get("task_timeout"),
                kill_grace=float(read["kill_grace"]),
                secret=bytes.fromhex(secret) if secret else None,
                import_path=tuple(read.get("path") or ()),
                lanes=tuple(Lane(**lane) for lane in read.get("lanes") or ()),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"the configuration line lacks or garbles a field: {e}") from None
