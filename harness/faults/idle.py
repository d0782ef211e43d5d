"""
Idle WebSocket clients: thousands of connections to the gateway that only
answer pings, while a normal client calls noop.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from harness.faults.clients import Caller, noop_latencies, open_bounded, read_status
from harness.faults.raw_websocket import IdleWebSocket
from harness.faults.trees import FaultSetupError, scenario_trees
from harness.measure import milliseconds
from harness.processes import TwistdTree, read_text
from taskoffload.tap import raise_open_files_limit

__all__ = ["idle_websockets"]


def idle_websockets(
    n: int = 5000,
    *,
    count: int = 2,
    hold: float = 1.0,
    concurrency: int = 100,
    directory: str | Path | None = None,
) -> dict[str, Any]:
    """
    Open ``n`` WebSocket connections to the gateway (``concurrency`` handshakes
    at a time) and keep them idle for ``hold`` s; meanwhile a normal client calls
    noop.

    :return: ``opened``, ``open_failures``, ``open_s``; ``status_clients`` (the
        most ``/status`` reported); ``noop_ok`` of 20 and ``noop_p50_ms``,
        ``noop_max_ms``; ``dropped`` (idle connections the gateway closed);
        ``gateway_rss_mib`` while they are open; ``clients_after_close`` (``None``
        if ``/status`` did not say); ``status_error`` (what could not be read,
        when; ``None`` if nothing).
    """
    limit, _ = raise_open_files_limit()
    if limit < n + 200:
        raise FaultSetupError(f"{n} connections need more than the open-files limit of {limit}")
    with scenario_trees(directory, "idle_websockets") as trees:
        tree, gateway, _ = trees.all(count)
        return asyncio.run(_idle_websockets(tree, gateway, n, hold, concurrency))


async def _idle_websockets(
    tree: TwistdTree, port: int, n: int, hold: float, concurrency: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def open_one() -> IdleWebSocket:
        _, protocol = await loop.create_connection(IdleWebSocket, "127.0.0.1", port)
        try:
            await protocol.opened
        except ConnectionError:
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
        return protocol

    started = time.monotonic()
    idle, failures = await open_bounded(open_one, n, concurrency)
    open_s = time.monotonic() - started
    status_errors: list[str] = []
    error = ""  # of the last /status read
    status_clients = 0
    for _ in range(int(10 / 0.05)):
        document, error = await read_status(port)
        status_clients = max(
            status_clients, ((document or {}).get("gateway") or {}).get("clients", 0)
        )
        if status_clients >= len(idle):
            break
        await asyncio.sleep(0.05)
    else:
        if error:
            status_errors.append(f"/status could not be read with the idle clients open: {error}")
    rss = _rss_mib(tree.pid)
    caller = await Caller.open(port)
    latencies, noop_failures = await noop_latencies(caller, 20, iter(range(1000)))
    await asyncio.sleep(hold)
    dropped = sum(1 for p in idle if p.closed)
    await caller.close()
    for p in idle:
        if p.transport is not None:
            p.transport.abort()
    after: int | None = None
    for _ in range(int(10 / 0.05)):
        document, error = await read_status(port)
        after = ((document or {}).get("gateway") or {}).get("clients")
        if after == 0:
            break
        await asyncio.sleep(0.05)
    else:
        if error:
            status_errors.append(
                f"/status could not be read after the idle clients closed: {error}"
            )
    return {
        "n": n,
        "opened": len(idle),
        "open_failures": failures,
        "open_s": round(open_s, 3),
        "status_clients": status_clients,
        "noop_ok": len(latencies),
        "noop_failures": noop_failures,
        "noop_p50_ms": milliseconds(statistics.median(latencies)) if latencies else None,
        "noop_max_ms": milliseconds(max(latencies)) if latencies else None,
        "dropped": dropped,
        "gateway_rss_mib": rss,
        "clients_after_close": after,
        "status_error": "; ".join(status_errors) or None,
        "twistd_alive": tree.alive(),
    }


def _rss_mib(pid: int) -> float | None:
    text = read_text(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None
