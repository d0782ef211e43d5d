"""
The fault suite's ordinary clients: WebSocket callers of the gateway (the
``websockets`` library, from the ``bench`` extra) that match replies to requests
and count the ones that match nothing, worker-port callers over raw asyncio
streams, and ``/status``.  Every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from harness.faults.trees import FaultSetupError
from harness.websocket import ws_connect

__all__ = [
    "Caller",
    "DirectCaller",
    "http_json",
    "noop_latencies",
    "open_bounded",
    "read_status",
    "status_document",
]


async def http_json(port: int, path: str, timeout: float = 5.0) -> Any:
    """``GET path`` on 127.0.0.1:``port`` (HTTP/1.0); :return: the decoded JSON body."""

    async def get() -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = await reader.read(-1)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"GET {path}: {head[:100]!r}")
        return json.loads(body)

    return await asyncio.wait_for(get(), timeout)


async def read_status(port: int, timeout: float = 5.0) -> tuple[dict[str, Any] | None, str]:
    """:return: the gateway's ``/status`` and ``""``, or ``None`` and why it cannot be read now."""
    try:
        document: dict[str, Any] = await http_json(port, "/status", timeout)
    except (OSError, asyncio.TimeoutError, ValueError) as e:
        return None, repr(e)
    return document, ""


async def status_document(port: int, timeout: float = 5.0) -> dict[str, Any] | None:
    """The gateway's ``/status``, or ``None`` if it cannot be read now."""
    document, _ = await read_status(port, timeout)
    return document


def _ws_connect(port: int, **options: Any) -> Any:
    """Open a WebSocket to the gateway with the ``websockets`` library (an async context)."""
    try:
        import websockets  # noqa: F401  # only to say what is missing
    except ImportError as e:  # pragma: no cover - an install without the bench extra
        raise FaultSetupError(
            "the fault suite needs websockets: pip install 'taskoffload[bench]'"
        ) from e
    options.setdefault("max_size", 16 * 1024 * 1024)
    return ws_connect(f"ws://127.0.0.1:{port}/ws", **options)


class Caller:
    """
    A WebSocket caller of the gateway: requests matched to replies by id, with
    the replies that match nothing counted (a duplicate final reply, or an id
    never sent).
    """

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.answered: set[Any] = set()
        self.duplicates = 0
        self.unknown = 0
        self.progress = 0
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> Caller:
        """A caller on a new WebSocket to the gateway on ``port``."""
        return cls(await _ws_connect(port))

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for text in self.ws:
                message = json.loads(text)
                if "progress" in message:
                    self.progress += 1
                    continue
                request_id = message.get("id")
                future = self.waiting.pop(request_id, None)
                if future is None:
                    if request_id in self.answered:
                        self.duplicates += 1
                    else:
                        self.unknown += 1
                    continue
                self.answered.add(request_id)
                if not future.done():
                    future.set_result(message)
        except ConnectionClosed:
            pass
        finally:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the gateway closed the connection"))

    async def call(self, request: dict[str, Any], wait: float) -> dict[str, Any]:
        """
        Send ``request`` (which has an id) and wait at most ``wait`` s for its final reply.

        :raises asyncio.TimeoutError: if none came in time.
        :raises ConnectionError: if the connection closed first.
        """
        future = asyncio.get_running_loop().create_future()
        self.waiting[request["id"]] = future
        await self.ws.send(json.dumps(request))
        # Shielded: after a timeout the id stays waiting, so that a reply arriving
        # later counts as late, not as unknown.
        return await asyncio.wait_for(asyncio.shield(future), wait)

    async def close(self) -> None:
        """Close the WebSocket (bounded) and stop reading."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def noop_latencies(caller: Caller, calls: int, ids: Iterator[int]) -> tuple[list[float], int]:
    """``calls`` sequential noops. :return: the latencies of the results, and the failures."""
    latencies = []
    failures = 0
    for _ in range(calls):
        started = time.perf_counter()
        try:
            reply = await caller.call({"id": next(ids), "function": "noop"}, 10)
        except (asyncio.TimeoutError, ConnectionError):
            failures += 1
            continue
        if "result" in reply:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1
    return latencies, failures


class DirectCaller:
    """A worker-port client: one connection at a time, opened when needed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, request: dict[str, Any], wait: float) -> dict[str, Any]:
        """
        Send ``request`` and wait at most ``wait`` s for its final reply.

        :raises ConnectionError: refused, reset, closed, or a goodbye.
        :raises asyncio.TimeoutError: no reply in time.
        """
        deadline = time.monotonic() + wait
        try:
            if self._streams is None:
                self._streams = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), wait
                )
            reader, writer = self._streams
            writer.write(json.dumps(request).encode() + b"\n")
            while True:
                line = await asyncio.wait_for(
                    reader.readline(), max(deadline - time.monotonic(), 0.001)
                )
                if not line.endswith(b"\n"):
                    raise ConnectionError("closed")
                reply: dict[str, Any] = json.loads(line)
                if "goodbye" in reply:
                    raise ConnectionError("goodbye")
                if "progress" not in reply:
                    return reply
        except (ConnectionError, asyncio.TimeoutError):
            self.close_now()
            raise
        except OSError as e:
            self.close_now()
            raise ConnectionError(str(e)) from e

    def close_now(self) -> None:
        """Drop the connection, if one is open; the next call opens another."""
        if self._streams is not None:
            self._streams[1].transport.abort()  # type: ignore[attr-defined]  # a socket transport
            self._streams = None

    async def close(self) -> None:
        """Drop the connection (as :class:`Caller`'s ``close``, awaitable)."""
        self.close_now()


async def open_bounded(
    opener: Callable[[], Awaitable[Any]], count: int, concurrency: int
) -> tuple[list[Any], int]:
    """Run ``opener`` ``count`` times, ``concurrency`` at once. :return: the opened, the failures."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one() -> Any:
        nonlocal failures
        async with gate:
            try:
                return await asyncio.wait_for(opener(), 30)
            except (OSError, asyncio.TimeoutError):
                failures += 1
                return None

    opened = await asyncio.gather(*(one() for _ in range(count)))
    return [o for o in opened if o is not None], failures
