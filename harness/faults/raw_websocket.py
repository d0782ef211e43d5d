"""
Bare RFC 6455 clients over asyncio: they send exactly the bytes they are told to,
so they can send what a real client library refuses to (invalid UTF-8 in a text
frame, a frame one byte per write, partial handshakes), and hold thousands of
idle connections for a few kilobytes each.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import time
from typing import Any

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONTINUATION",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "IdleWebSocket",
    "RawWebSocket",
    "handshake",
    "ws_frame",
]

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    if payload:
        # XOR with the repeated mask, all at once as one big integer.
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            length, "big"
        )
    else:
        masked = b""
    return head + mask + masked


def handshake(path: str = "/ws") -> bytes:
    """A client's opening handshake for ``path``, with a fresh key."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawWebSocket:
    """
    A bare RFC 6455 client over asyncio streams: it sends exactly the bytes it is
    told to, so it can send what a real client library refuses to.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        #: The close code the server sent, once it sent one.
        self.close_code: int | None = None
        #: The server reset the connection (a close frame may have been lost).
        self.reset = False

    @classmethod
    async def open(cls, port: int, timeout: float = 10.0) -> RawWebSocket:
        """Connect and complete the opening handshake."""

        async def opening() -> RawWebSocket:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, limit=32 * 1024 * 1024
            )
            writer.write(handshake())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                writer.close()
                raise ConnectionError(f"handshake refused: {head[:100]!r}")
            return cls(reader, writer)

        return await asyncio.wait_for(opening(), timeout)

    async def send_raw(self, data: bytes, per_write: int | None = None, pause: float = 0.0) -> None:
        """Write ``data``, ``per_write`` bytes at a time (each drained, ``pause`` s apart)."""
        if per_write is None:
            self.writer.write(data)
            await self.writer.drain()
            return
        for start in range(0, len(data), per_write):
            self.writer.write(data[start : start + per_write])
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def send(self, payload: bytes | str, opcode: int | None = None) -> None:
        """Send one unfragmented message (text for ``str``, binary for ``bytes``, unless told)."""
        if isinstance(payload, str):
            payload, default = payload.encode(), OP_TEXT
        else:
            default = OP_BINARY
        await self.send_raw(ws_frame(default if opcode is None else opcode, payload))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """
        The next message, decoded as JSON; pings are answered on the way.

        :return: ``None`` once the server closed the connection (its close code,
            if any, in :attr:`close_code`).
        :raises asyncio.TimeoutError: if nothing came within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            try:
                opcode, fin, payload = await asyncio.wait_for(
                    self._frame(), max(deadline - time.monotonic(), 0.001)
                )
            except ConnectionResetError:
                self.reset = True
                return None
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == OP_PING:
                with contextlib.suppress(ConnectionError):
                    self.writer.write(ws_frame(OP_PONG, payload))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(ConnectionError, RuntimeError):
                    self.writer.write(ws_frame(OP_CLOSE, payload[:2]))
                return None
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                try:
                    decoded: dict[str, Any] = json.loads(data)
                except ValueError:
                    return {"unreadable": data[:200].decode("utf-8", "replace")}
                return decoded

    async def _frame(self) -> tuple[int, bool, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        mask = await self.reader.readexactly(4) if second & 0x80 else b""
        payload = await self.reader.readexactly(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return first & 0x0F, bool(first & 0x80), payload

    def abort(self) -> None:
        """Drop the connection without a closing handshake."""
        transport = self.writer.transport
        transport.abort()  # type: ignore[attr-defined]  # a socket transport


class IdleWebSocket(asyncio.Protocol):
    """
    A WebSocket client that opens, then only answers pings: thousands cost the
    client a few kilobytes each, and no task.
    """

    def __init__(self) -> None:
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(handshake())

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self.opened.done():
            head, found, rest = self._buffer.partition(b"\r\n\r\n")
            if not found:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(f"refused: {head[:80]!r}"))
                return
            self.opened.set_result(None)
            self._buffer = rest
        while len(self._buffer) >= 2:
            length = self._buffer[1] & 0x7F
            start = 2 + {126: 2, 127: 8}.get(length, 0)
            if len(self._buffer) < start:
                return
            if length == 126:
                (length,) = struct.unpack("!H", self._buffer[2:4])
            elif length == 127:
                (length,) = struct.unpack("!Q", self._buffer[2:10])
            if len(self._buffer) < start + length:
                return
            opcode = self._buffer[0] & 0x0F
            payload = self._buffer[start : start + length]
            self._buffer = self._buffer[start + length :]
            if opcode == OP_PING and self.transport is not None:
                self.transport.write(ws_frame(OP_PONG, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
