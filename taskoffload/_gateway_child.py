"""
One of several gateway processes serving one port (``--gateway-processes N``),
started by :class:`~taskoffload.gateway_processes.GatewayProcesses` as
``python -m taskoffload._gateway_child``.

It reads its configuration, one JSON line, on standard input
(:func:`child_config` writes it), builds its service, waits for the line
``serve`` (at once for a process started to serve; a spare waits until a dead
process's place is its), then serves the gateway on the listening socket it
inherits as fd 3 until ``SIGTERM``, then drains like a lone gateway: it stops
taking connections and lets the requests in flight finish.  Its log goes to
standard output, which the parent logs.  It dies with its parent.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
from typing import Any, Final

from taskoffload.access import GatewayAccess

__all__ = ["LISTEN_FD", "child_config", "main", "service_from_config"]

#: The fd of the inherited listening socket.
LISTEN_FD: Final = 3

_FAMILIES: Final = {
    "AF_INET": socket.AF_INET,
    "AF_INET6": socket.AF_INET6,
    "AF_UNIX": socket.AF_UNIX,
}


def child_config(
    *,
    index: int,
    family: int,
    directory: str,
    pool_in_parent: bool,
    pool_addresses: list[str],
    limits: dict[str, float],
    auto_ping: float,
    stop_timeout: float,
    token: str | None,
    allowed_origins: list[str],
    secret: bytes | None,
    prefetch: int,
    poison: tuple[float, float] = (60.0, 300.0),
) -> bytes:
    """:return: the configuration line of gateway process ``index``."""
    return (
        json.dumps(
            {
                "index": index,
                "family": socket.AddressFamily(family).name,
                "directory": directory,
                "pool_in_parent": pool_in_parent,
                "pool_addresses": pool_addresses,
                "limits": limits,
                "auto_ping": auto_ping,
                "stop_timeout": stop_timeout,
                "token": token,
                "allowed_origins": allowed_origins,
                "secret": secret.hex() if secret is not None else None,
                "prefetch": prefetch,
                "poison": list(poison),
            }
        ).encode()
        + b"\n"
    )


def service_from_config(config: dict[str, Any], reactor: Any = None) -> Any:
    """:return: the :class:`~taskoffload.service.GatewayService` a configuration line says."""
    from taskoffload.service import GatewayService, SharedPort
    from taskoffload.session import GatewayLimits

    secret = config.get("secret")
    return GatewayService(
        listen=f"fd:{LISTEN_FD}",
        pool_addresses=config["pool_addresses"],
        limits=GatewayLimits(**config["limits"]),
        auto_ping=config["auto_ping"],
        stop_timeout=config["stop_timeout"],
        reactor=reactor,
        access=GatewayAccess(
            token=config.get("token"), allowed_origins=config.get("allowed_origins") or ()
        ),
        secret=bytes.fromhex(secret) if secret else None,
        prefetch=config["prefetch"],
        poison=tuple(config.get("poison") or (60.0, 300.0)),
        shared=SharedPort(
            fd=LISTEN_FD,
            family=_FAMILIES[config["family"]],
            directory=config["directory"],
            pool_in_parent=bool(config.get("pool_in_parent")),
        ),
    )


def main() -> None:
    """Serve until ``SIGTERM``, then drain and exit 0."""
    from taskoffload._forkserver import _die_with_parent

    _die_with_parent(signal.SIGTERM)
    config = json.loads(sys.stdin.buffer.readline())
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout, timeFormat="")], redirectStandardIO=False
    )
    service = service_from_config(config, reactor)
    # Started; a spare waits here until told to serve (or its parent is gone).
    if sys.stdin.buffer.readline().strip() != b"serve":
        sys.exit(0)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()  # type: ignore[attr-defined]  # the global reactor runs
    sys.exit(0)


if __name__ == "__main__":
    main()
