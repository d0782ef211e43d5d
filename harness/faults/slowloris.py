"""
Slowloris: connections that send a partial line (worker port) or a partial
handshake or frame (gateway) and stall, while a normal client's noop latency is
measured before and during.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

from harness.faults.clients import Caller, noop_latencies, open_bounded
from harness.faults.raw_websocket import OP_TEXT, RawWebSocket, ws_frame
from harness.faults.trees import scenario_trees
from harness.measure import milliseconds, nearest_rank
from taskoffload.tap import raise_open_files_limit

__all__ = ["slowloris"]

_PARTIAL_LINE = b'{"id": 1, "function": "noop", "args": {"x": "'
_PARTIAL_HANDSHAKE = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Up"


def slowloris(
    connections: int = 500,
    *,
    calls: int = 200,
    rounds: int = 5,
    count: int = 8,
    idle_timeout: float | None = None,
    slack_ms: float = 1.0,
    directory: str | Path | None = None,
) -> dict[str, Any]:
    """
    A normal client's noop latency, unloaded and then with ``connections``
    stalled connections on the worker port (each sent a partial line) and as
    many on the gateway (half of them a partial HTTP handshake, half a complete
    handshake and then half a frame).

    Two normal clients, each making ``calls`` sequential noop calls per round:
    a WebSocket client of the gateway (``gateway_*`` figures), and a worker-port
    client that opens a new connection for every call (``direct_*``), which
    must get through the accept queue each time.  Each figure is the median of
    ``rounds`` rounds, unloaded and loaded alike, so that one scheduling hiccup
    of this shared machine does not decide it, nor one lucky round.

    :param idle_timeout: passed as ``--idle-timeout`` (the loaded rounds must end
        before it); when given, the scenario then waits for the worker to close
        the stalled worker-port connections and counts them.
    :return: ``gateway_unloaded_p50_ms``, ``gateway_unloaded_p99_ms``,
        ``gateway_loaded_p50_ms``, ``gateway_loaded_p99_ms``, ``gateway_limit_ms``
        (2 x the unloaded p99 + ``slack_ms``, for sub-millisecond figures on a
        shared machine), the same for ``direct_``; ``slack_ms``;
        ``normal_failures``; ``stalled_worker_port`` and ``stalled_gateway``
        (still open after the loaded rounds); with ``idle_timeout``,
        ``closed_by_idle_timeout`` and ``answered_bad_request``.
    """
    raise_open_files_limit()
    extra = () if idle_timeout is None else ("--idle-timeout", str(idle_timeout))
    with scenario_trees(directory, "slowloris") as trees:
        tree, gateway, pool = trees.all(count, *extra)
        result = asyncio.run(_slowloris(gateway, pool, connections, calls, rounds, idle_timeout))
        result["twistd_alive"] = tree.alive()
    result["slack_ms"] = slack_ms
    for kind in ("gateway", "direct"):
        unloaded = result[f"{kind}_unloaded_p99_ms"]
        result[f"{kind}_limit_ms"] = None if unloaded is None else round(2 * unloaded + slack_ms, 3)
    return result


async def _direct_latencies(port: int, calls: int) -> tuple[list[float], int]:
    """``calls`` sequential noops, each on a new worker-port connection."""
    latencies = []
    failures = 0
    for request_id in range(calls):
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, asyncio.TimeoutError):
            failures += 1
            continue
        try:
            writer.write(b'{"id": %d, "function": "noop"}\n' % request_id)
            line = await asyncio.wait_for(reader.readline(), 10)
            if json.loads(line) == {"id": request_id, "result": None}:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1
        except (OSError, ValueError, asyncio.TimeoutError):
            failures += 1
        finally:
            writer.close()
    return latencies, failures


_Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _stall_line(port: int) -> _Streams:
    """A worker-port connection sent a partial line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_PARTIAL_LINE)
    await writer.drain()
    return reader, writer


async def _stall_handshake(port: int) -> _Streams:
    """A gateway connection sent a partial HTTP handshake."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_PARTIAL_HANDSHAKE)
    await writer.drain()
    return reader, writer


async def _stall_frame(port: int) -> RawWebSocket:
    """A gateway WebSocket sent half a frame."""
    ws = await RawWebSocket.open(port)
    frame = ws_frame(OP_TEXT, b'{"id": 1, "function": "noop"}')
    await ws.send_raw(frame[: len(frame) // 2])
    return ws


def _still_open(reader: asyncio.StreamReader) -> bool:
    """The server has neither closed nor reset the connection."""
    return not reader.at_eof() and not reader.exception()


def _median_figures(figures: dict[str, list[list[float]]]) -> dict[str, float | None]:
    """``NAME_p50_ms`` and ``NAME_p99_ms``: the median over the rounds of each one's quantile."""
    result: dict[str, float | None] = {}
    for name, runs in figures.items():
        # The median of the rounds: one hiccup of a shared machine does not decide
        # a figure, and neither does one lucky round.
        p50s = [statistics.median(r) for r in runs if r]
        p99s = [nearest_rank(r, 0.99) for r in runs if r]
        result[f"{name}_p50_ms"] = milliseconds(statistics.median(p50s)) if p50s else None
        result[f"{name}_p99_ms"] = milliseconds(statistics.median(p99s)) if p99s else None
    return result


async def _idle_timeout_counts(lines: list[_Streams], idle_timeout: float) -> dict[str, int]:
    """``closed_by_idle_timeout`` and ``answered_bad_request`` of the stalled lines."""
    # Every partial line is answered bad_request and closed after --idle-timeout.
    answered = 0
    closed = 0

    async def outcome(reader: asyncio.StreamReader) -> None:
        nonlocal answered, closed
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            data = await asyncio.wait_for(reader.read(-1), idle_timeout + 10)
            closed += 1
            if b'"code":"bad_request"' in data and b"incomplete message" in data:
                answered += 1

    await asyncio.gather(*(outcome(r) for r, _ in lines))
    return {"closed_by_idle_timeout": closed, "answered_bad_request": answered}


async def _slowloris(
    gateway: int,
    pool: int,
    connections: int,
    calls: int,
    rounds: int,
    idle_timeout: float | None,
) -> dict[str, Any]:
    ids = iter(range(10**9))
    normal = await Caller.open(gateway)
    await noop_latencies(normal, 30, ids)  # warm up the gateway's connections to the pool
    failures = 0
    figures: dict[str, list[list[float]]] = {
        "gateway_unloaded": [],
        "direct_unloaded": [],
        "gateway_loaded": [],
        "direct_loaded": [],
    }

    async def measure(load: str) -> None:
        nonlocal failures
        for _ in range(rounds):
            latencies, failed = await noop_latencies(normal, calls, ids)
            figures[f"gateway_{load}"].append(latencies)
            failures += failed
            latencies, failed = await _direct_latencies(pool, calls)
            figures[f"direct_{load}"].append(latencies)
            failures += failed

    await measure("unloaded")
    opened_at = time.monotonic()
    lines, line_failures = await open_bounded(lambda: _stall_line(pool), connections, 50)
    handshakes, handshake_failures = await open_bounded(
        lambda: _stall_handshake(gateway), connections // 2, 50
    )
    frames, frame_failures = await open_bounded(
        lambda: _stall_frame(gateway), connections - connections // 2, 50
    )
    await asyncio.sleep(0.5)  # let the accepting settle
    await measure("loaded")
    loaded_s = time.monotonic() - opened_at
    result: dict[str, Any] = {
        "connections": connections,
        "calls": calls,
        "rounds": rounds,
        **_median_figures(figures),
        "normal_failures": failures,
        "open_failures": line_failures + handshake_failures + frame_failures,
        "stalled_worker_port": sum(1 for r, _ in lines if _still_open(r)),
        "stalled_gateway": sum(1 for r, _ in handshakes if _still_open(r))
        + sum(1 for ws in frames if _still_open(ws.reader)),
        "loaded_s": round(loaded_s, 2),
    }
    if idle_timeout is not None:
        result.update(await _idle_timeout_counts(lines, idle_timeout))
    for _, writer in [*lines, *handshakes]:
        writer.transport.abort()  # type: ignore[attr-defined]  # a socket transport
    for ws in frames:
        ws.abort()
    await normal.close()
    return result
