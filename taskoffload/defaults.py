"""
The defaults that more than one part of taskoffload uses, defined once: the
command line (:mod:`taskoffload.tap`), the services and the client take them from here.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AUTO_PING",
    "DEFAULT_GATEWAY_LISTEN",
    "DEFAULT_POOL",
    "DEFAULT_POOL_LISTEN",
    "IDLE_TIMEOUT",
    "MAX_DETACH",
    "STOP_TIMEOUT",
]

#: Where a pool's workers listen by default (loopback only).
DEFAULT_POOL_LISTEN: Final = "tcp:12345:interface=127.0.0.1"

#: The address a client or gateway reaches that pool at.
DEFAULT_POOL: Final = "tcp:127.0.0.1:12345"

#: Where the gateway listens by default (loopback only).
DEFAULT_GATEWAY_LISTEN: Final = "tcp:8080:interface=127.0.0.1"

#: Seconds a stopping worker or gateway may spend finishing what is in flight.
STOP_TIMEOUT: Final = 30.0

#: Seconds within which a started request line must be finished on the worker port.
IDLE_TIMEOUT: Final = 60.0

#: Seconds between the gateway's WebSocket pings.
AUTO_PING: Final = 30.0

#: The most seconds a gateway request may ask to outlive its WebSocket (``--max-detach``).
MAX_DETACH: Final = 300.0
