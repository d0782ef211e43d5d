"""
Exchanges with a running tree: send an input on a new connection, to the worker
port as a line or to the gateway as WebSocket frames, and compare what comes
back with the replies expected (:mod:`harness.faults.oracle`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from harness.faults.oracle import BAD, compare, documented_reply, short
from harness.faults.raw_websocket import OP_BINARY, OP_CONTINUATION, OP_TEXT, RawWebSocket, ws_frame

__all__ = [
    "Send",
    "binary_frame",
    "byte_by_byte",
    "check_gateway_input",
    "check_worker_input",
    "fragmented",
    "frame_exchange",
    "line_exchange",
    "text_frame",
    "text_frames",
]

_SENTINEL = b'{"id": "sentinel", "function": "noop"}'


async def _read_lines(
    reader: asyncio.StreamReader, count: int, timeout: float
) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``count`` reply lines. :return: them, and whether the server closed the connection."""
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(replies) < count:
        try:
            line = await asyncio.wait_for(
                reader.readline(), max(deadline - time.monotonic(), 0.001)
            )
        except asyncio.TimeoutError:
            return replies, False
        except (ConnectionError, ValueError):
            return replies, True
        if not line.endswith(b"\n"):
            return replies, True
        try:
            replies.append(json.loads(line))
        except ValueError:
            replies.append({"unreadable": line[:200].decode("utf-8", "replace")})
    return replies, False


async def line_exchange(
    port: int,
    data: bytes,
    expected: list[dict[str, Any]],
    *,
    closes: bool = False,
    per_write: int | None = None,
    timeout: float = 15.0,
) -> list[str]:
    """
    Send ``data`` on a new connection to the worker port and check what comes back.

    :param expected: the replies ``data`` must get, in any order.
    :param closes: the worker must then close the connection; otherwise a noop
        sent after ``data`` must be answered, with nothing else before it.
    :param per_write: write that many bytes at a time (each drained, 1 ms apart).
    :return: the problems found; empty if all is as documented.
    """
    problems: list[str] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=32 * 1024 * 1024)
    try:
        sending = asyncio.create_task(_write(writer, data, per_write))
        replies, closed = await _read_lines(reader, len(expected), timeout)
        with contextlib.suppress(OSError):
            await asyncio.wait_for(sending, timeout)
        problems += compare(replies, expected)
        if closes:
            if not closed:
                more, closed = await _read_lines(reader, 1, 5.0)
                if more:
                    problems.append(f"more replies before the close: {short(more)}")
            if not closed:
                problems.append("the connection was not closed")
        elif closed:
            problems.append("the connection was closed")
        else:
            writer.write(_SENTINEL + b"\n")
            extra: list[dict[str, Any]] = []
            for _ in range(len(expected) + 10):
                more, closed = await _read_lines(reader, 1, timeout)
                if not more:
                    problems.append("no answer to a noop sent after it")
                    break
                if more[0] == {"id": "sentinel", "result": None}:
                    break
                extra += more
            if extra:
                problems.append(f"unexpected replies: {short(extra)}")
    except OSError as e:
        problems.append(f"connection error: {e!r}")
    finally:
        writer.transport.abort()  # type: ignore[attr-defined]  # a socket transport
    return problems


async def _write(writer: asyncio.StreamWriter, data: bytes, per_write: int | None) -> None:
    if per_write is None:
        writer.write(data)
        await writer.drain()
        return
    for start in range(0, len(data), per_write):
        writer.write(data[start : start + per_write])
        await writer.drain()
        await asyncio.sleep(0.001)


#: A gateway exchange: what to send, on one new WebSocket connection.
Send = Callable[[RawWebSocket], Coroutine[Any, Any, None]]


async def frame_exchange(
    port: int,
    send: Send,
    expected: list[dict[str, Any]],
    *,
    close_code: int | None = None,
    timeout: float = 15.0,
) -> list[str]:
    """
    Open a WebSocket to the gateway, ``send`` on it, and check what comes back.

    :param expected: the replies that must come, in any order.
    :param close_code: the gateway must then close the connection with this
        code (or reset it, when it closes while we still send: the close frame
        is then lost); if ``None``, a noop sent afterwards must be answered,
        with nothing else before it.
    :return: the problems found.
    """
    problems: list[str] = []
    try:
        ws = await RawWebSocket.open(port)
    except (OSError, asyncio.TimeoutError) as e:
        return [f"could not open a WebSocket: {e!r}"]
    try:
        sending = asyncio.create_task(send(ws))
        replies: list[dict[str, Any]] = []
        closed = False
        deadline = time.monotonic() + timeout
        while len(replies) < len(expected):
            try:
                reply = await ws.recv(max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                break
            if reply is None:
                closed = True
                break
            if "progress" not in reply:
                replies.append(reply)
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(sending, timeout)
        problems += compare(replies, expected)
        if close_code is not None:
            if not closed:
                with contextlib.suppress(asyncio.TimeoutError):
                    more = await ws.recv(5.0)
                    closed = more is None
                    if more is not None:
                        problems.append(f"more replies before the close: {short(more)}")
            if not closed:
                problems.append("the connection was not closed")
            elif ws.close_code != close_code and not ws.reset:
                problems.append(f"closed with code {ws.close_code}, not {close_code}")
        elif closed:
            problems.append(f"the connection was closed (code {ws.close_code})")
        else:
            await ws.send(_SENTINEL.decode())
            extra = []
            for _ in range(len(expected) + 10):
                try:
                    more = await ws.recv(timeout)
                except asyncio.TimeoutError:
                    more = None
                if more is None:
                    problems.append("no answer to a noop sent after it")
                    break
                if more == {"id": "sentinel", "result": None}:
                    break
                if "progress" not in more:
                    extra.append(more)
            if extra:
                problems.append(f"unexpected replies: {short(extra)}")
    except OSError as e:
        problems.append(f"connection error: {e!r}")
    finally:
        ws.abort()
    return problems


def text_frame(payload: bytes) -> Send:
    """For :func:`frame_exchange`: send ``payload`` as one text frame, valid UTF-8 or not."""

    async def send(ws: RawWebSocket) -> None:
        await ws.send(payload, OP_TEXT)

    return send


def binary_frame(payload: bytes) -> Send:
    async def send(ws: RawWebSocket) -> None:
        await ws.send(payload, OP_BINARY)

    return send


def text_frames(payloads: Sequence[bytes]) -> Send:
    """Send each payload as a text frame, all in one write."""

    async def send(ws: RawWebSocket) -> None:
        await ws.send_raw(b"".join(ws_frame(OP_TEXT, p) for p in payloads))

    return send


def fragmented(payload: bytes, size: int = 1) -> Send:
    """One text message in fragments of ``size`` bytes: a text frame, then continuations."""

    async def send(ws: RawWebSocket) -> None:
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        frames = [
            ws_frame(OP_TEXT if i == 0 else OP_CONTINUATION, chunk, fin=i == len(chunks) - 1)
            for i, chunk in enumerate(chunks)
        ]
        await ws.send_raw(b"".join(frames))

    return send


def byte_by_byte(payload: bytes) -> Send:
    """One text frame written one byte per write."""

    async def send(ws: RawWebSocket) -> None:
        await ws.send_raw(ws_frame(OP_TEXT, payload), per_write=1, pause=0.001)

    return send


async def check_worker_input(port: int, payload: bytes) -> tuple[list[str], bool]:
    """
    Send ``payload`` as one line (any ``\\n`` in it replaced by a space) to the
    worker port and check the replies against :func:`documented_reply`.

    :return: the problems found, and whether the input was judged (an input the
        documents do not fix is neither sent nor judged, and has no problem).
    """
    payload = payload.replace(b"\n", b" ")
    expected = documented_reply(payload, "worker")
    if expected is None:
        return [], False
    return await line_exchange(port, payload + b"\n", expected), True


async def check_gateway_input(port: int, payload: bytes) -> tuple[list[str], bool]:
    """
    Send ``payload`` to the gateway: as a text frame if it is UTF-8, else as a
    binary frame (``bad_request``); check the replies against :func:`documented_reply`.

    :return: the problems found, and whether the input was judged (an input the
        documents do not fix is neither sent nor judged, and has no problem).
    """
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return await frame_exchange(port, binary_frame(payload), BAD), True
    expected = documented_reply(payload, "gateway")
    if expected is None:
        return [], False
    return await frame_exchange(port, text_frame(payload), expected), True
