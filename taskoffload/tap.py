"""
``twistd taskoffload``: command-line options and the service for each role.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from taskoffload import wire
from taskoffload.supervisor import PoolConfig, WorkerPoolService

__all__ = ["Options", "makeService"]

ROLES = ("worker", "gateway", "all")
DEFAULT_POOL_LISTEN = "tcp:12345:interface=127.0.0.1"
DEFAULT_GATEWAY_LISTEN = "tcp:8080:interface=127.0.0.1"
DEFAULT_POOL = "tcp:127.0.0.1:12345"


def default_count() -> int:
    """Four workers per CPU: tasks that wait on I/O leave the CPU to others."""
    return 4 * (os.cpu_count() or 1)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be above 0")
    return number


_positive_int.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]  # read by usage.Options
_positive_float.coerceDoc = "Seconds, above 0."  # type: ignore[attr-defined]  # read by usage.Options


class Options(usage.Options):
    """Options for every role; each role reads the ones it needs."""

    synopsis = "[--role=worker|gateway|all] [options]"
    longdesc = (
        "Run taskoffload. --role=worker runs a supervised pool of worker processes that "
        "share one listening port; --role=gateway a WebSocket gateway to such pools; "
        "--role=all (the default) both in one process tree."
    )

    optParameters: list[list[Any]] = [
        ["role", None, "worker", "worker, gateway or all."],
        ["listen", None, None,
         "Server endpoint to listen on (worker default: "
         f"{DEFAULT_POOL_LISTEN}; gateway and all: {DEFAULT_GATEWAY_LISTEN})."],
        ["pool-listen", None, DEFAULT_POOL_LISTEN,
         "Role all: server endpoint the workers listen on."],
        ["count", None, None, "Worker processes (default: 4 x CPUs).", _positive_int],
        ["concurrency", None, 1, "Tasks one worker runs at once.", _positive_int],
        ["max-message", None, wire.DEFAULT_MAX_MESSAGE,
         "Longest accepted message, in bytes.", _positive_int],
        ["stop-timeout", None, 30.0,
         "Seconds a stopping worker may spend finishing its tasks.", _positive_float],
        ["smtp-host", None, "localhost", "SMTP server for the send_mail example task."],
        ["smtp-port", None, 25, "Its port.", _positive_int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["tasks"] = []
        self["pool"] = []

    def opt_tasks(self, module: str) -> None:
        """Python module whose @task functions may run (repeatable; default: the examples)."""
        self["tasks"].append(module)

    def opt_pool(self, address: str) -> None:
        """Gateway: a worker pool's address, e.g. tcp:127.0.0.1:12345 (repeatable)."""
        self["pool"].append(address)

    def postOptions(self) -> None:
        if self["role"] not in ROLES:
            raise usage.UsageError(f"--role must be one of {', '.join(ROLES)}, not {self['role']!r}")
        if self["role"] != "worker":
            raise usage.UsageError(
                f"--role={self['role']} is not available yet; use --role=worker"
            )
        if self["count"] is None:
            self["count"] = default_count()
        if not self["tasks"]:
            self["tasks"] = ["taskoffload.examples"]
        if self["listen"] is None:
            self["listen"] = DEFAULT_POOL_LISTEN if self["role"] == "worker" else DEFAULT_GATEWAY_LISTEN
        for name in ("listen", "pool-listen"):
            kind = self[name].split(":", 1)[0]
            if kind not in ("tcp", "tcp6", "unix", "ssl"):
                raise usage.UsageError(
                    f"--{name} {self[name]!r}: expected an endpoint such as "
                    f"{DEFAULT_POOL_LISTEN} or unix:/path/to/socket"
                )

    def pool_config(self, listen: str) -> PoolConfig:
        """:return: the worker pool's configuration from these options."""
        return PoolConfig(
            listen=listen,
            count=self["count"],
            concurrency=self["concurrency"],
            tasks=tuple(self["tasks"]),
            max_message=self["max-message"],
            stop_timeout=self["stop-timeout"],
            env={
                "TASKOFFLOAD_SMTP_HOST": self["smtp-host"],
                "TASKOFFLOAD_SMTP_PORT": str(self["smtp-port"]),
            },
        )


def makeService(options: Options) -> IService:
    """Wire the services for the chosen role."""
    top = MultiService()
    WorkerPoolService(options.pool_config(options["listen"])).setServiceParent(top)
    return top
