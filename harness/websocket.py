"""
The ordinary WebSocket client of the harness: the ``websockets`` library (the
``bench`` extra), set up for loopback load.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ws_connect"]


def ws_connect(url: str, **options: Any) -> Any:
    """
    Open a WebSocket with the ``websockets`` library (an async context): no
    compression, no pings, no proxy, a deep receive queue, unless ``options``
    (``websockets`` ``connect`` options) say otherwise.
    """
    import websockets
    from websockets.asyncio.client import connect

    if int(websockets.__version__.split(".")[0]) >= 15:
        options.setdefault("proxy", None)  # loopback, whatever the environment says
    options.setdefault("compression", None)
    options.setdefault("ping_interval", None)
    options.setdefault("max_queue", 4096)
    options.setdefault("open_timeout", 30)
    options.setdefault("close_timeout", 2)
    return connect(url, **options)
