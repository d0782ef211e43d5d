"""
The gateway's documented lifecycle on the real ``twistd -n taskoffload``: dropping
a peer that stops answering pings, the graceful SIGTERM, and the per-client bound
on a batch.  WebSockets through ``websockets.sync`` (it answers pings in its own
thread) or, for a peer that must stay silent, a raw socket.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
import urllib.request
from contextlib import ExitStack
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.integration.support import IntegrationTestCase, wait_for

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def status(port: int) -> dict[str, Any]:
    """The gateway part of ``/status``."""
    with _http.open(f"http://127.0.0.1:{port}/status", timeout=10) as response:
        return json.loads(response.read())["gateway"]


def send(ws: ClientConnection, request: dict[str, Any]) -> None:
    ws.send(json.dumps(request))


def receive(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


def refuses_connections(port: int) -> bool:
    """True once nothing accepts TCP connections on ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class SilentPeer:
    """A WebSocket client on a raw socket: it opens the connection, then never answers."""

    def __init__(self, port: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.socket.recv(4096)
            assert chunk, f"closed during the handshake: {response!r}"
            response += chunk
        head, _, self.received = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def dropped(self) -> bool:
        """Read what has come (pings, which go unanswered); True once the gateway closed."""
        self.socket.settimeout(0.05)
        try:
            chunk = self.socket.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        self.received += chunk
        return chunk == b""

    def opcodes(self) -> list[int]:
        """The opcodes of the (small, unmasked) frames received so far."""
        found, data = [], self.received
        while len(data) >= 2 and (data[1] & 0x7F) < 126:
            length = data[1] & 0x7F
            found.append(data[0] & 0x0F)
            data = data[2 + length :]
        return found

    def close(self) -> None:
        self.socket.close()


PING = 0x9


class GatewayLifecycleTests(IntegrationTestCase):
    """The gateway's documented pings, stop and bounds, end to end."""

    def open_ws(self, port: int) -> ClientConnection:
        """A WebSocket client of the gateway (closed in cleanup) that answers pings and
        sends none of its own."""
        stack = ExitStack()
        self.addCleanup(stack.close)
        return stack.enter_context(
            connect(
                f"ws://127.0.0.1:{port}/ws",
                proxy=None,
                compression=None,
                ping_interval=None,
                open_timeout=10,
            )
        )

    def test_auto_ping_drops_a_silent_peer(self):
        """docs/gateway.rst (Bounds): with ``--auto-ping 1`` a client that leaves the
        gateway's pings unanswered is dropped; one that answers them is kept and served."""
        # --auto-ping takes whole seconds (Autobahn's timers, txaio's batched timer,
        # count in whole seconds); 1 is the smallest.
        _, port, _ = self.role_all(1, "--auto-ping", "1")
        silent = SilentPeer(port)
        self.addCleanup(silent.close)
        answering = self.open_ws(port)
        wait_for(lambda: status(port)["clients"] == 2, 5, what="both clients counted")
        wait_for(silent.dropped, 10, what="the silent peer to be dropped")
        assert PING in silent.opcodes()  # the gateway asked, and was not answered
        wait_for(lambda: status(port)["clients"] == 1, 5, what="the gateway to count one client")
        # The answering client outlives two more ping rounds (one ping and its
        # deadline each): it is kept because it answers, not because its turn
        # has not come yet.
        rounds_end = time.monotonic() + 2 * 2 * 1.0
        while time.monotonic() < rounds_end:
            assert status(port)["clients"] == 1, "the answering client was dropped"
            time.sleep(0.1)
        send(answering, {"id": 1, "function": "echo", "args": {"still": "here"}})
        assert receive(answering) == {"id": 1, "result": {"still": "here"}}

    def _sigterm_finishes_requests_in_flight_then_exits_zero(self, role: str):
        """README (SIGTERM): the gateway stops taking clients at once, the request in flight
        still gets its result, then twistd exits 0."""
        # One worker, and a first call answered before the slow one is sent: the
        # slow call then goes over a connection the worker has already accepted.
        # (Sent over a fresh connection, it could still sit in the listening
        # backlog when the pool stops accepting, and be answered with an error
        # before the gateway's refusal is seen: one CI run under trial saw it.)
        if role == "gateway":
            _, pool_port = self.pool(1)
            tree, port = self.gateway(f"tcp:127.0.0.1:{pool_port}")
        else:
            tree, port, _ = self.role_all(1)
        ws = self.open_ws(port)
        send(ws, {"id": "first", "function": "echo", "args": {}})
        assert receive(ws) == {"id": "first", "result": {}}
        # Long enough that the refusal, checked below, comes first even on a loaded
        # machine (one CI run under trial saw a 3 s reply arrive before it).
        send(ws, {"id": "slow", "function": "whoami", "args": {"delay": 8}})
        wait_for(lambda: status(port)["inflight"] == 1, 5, what="the request to be in flight")
        os.kill(tree.pid, signal.SIGTERM)
        wait_for(lambda: refuses_connections(port), 6, what="the gateway to refuse clients")
        # Refused while the request is still in flight, not only once all has stopped.
        try:
            early = ws.recv(timeout=0.05)
        except TimeoutError:
            pass
        else:
            self.fail(f"a message came before the gateway's refusal was seen: {early!r}")
        reply = receive(ws)
        assert reply["id"] == "slow" and "pid" in reply["result"], reply
        assert tree.process.wait(timeout=15) == 0, tree.log()

    def test_sigterm_finishes_requests_in_flight_then_exits_zero_role_gateway(self):
        """SIGTERM, role gateway: the gateway stops taking clients, finishes the request in flight, exits 0."""
        self._sigterm_finishes_requests_in_flight_then_exits_zero("gateway")

    def test_sigterm_finishes_requests_in_flight_then_exits_zero_role_all(self):
        """SIGTERM, role all: the gateway stops taking clients, finishes the request in flight, exits 0."""
        self._sigterm_finishes_requests_in_flight_then_exits_zero("all")

    def test_batch_over_the_per_client_bound_is_overloaded(self):
        """docs/gateway.rst (Bounds): batch items count toward
        ``--max-inflight-per-client``; a batch that would go over it is answered
        ``overloaded`` at once, and one that fits runs."""
        _, port, _ = self.role_all(2, "--max-inflight-per-client", "4")
        ws = self.open_ws(port)
        send(ws, {"id": "w", "function": "whoami", "args": {"delay": 1.5}})
        send(ws, {"id": "over", "function": "echo", "batch": [{"n": n} for n in range(4)]})
        send(ws, {"id": "fits", "function": "echo", "batch": [{"n": n} for n in range(3)]})
        finals: list[dict[str, Any]] = []
        progress: list[Any] = []
        while len(finals) < 3:
            message = receive(ws)
            if "progress" in message:
                progress.append(message["id"])
            else:
                finals.append(message)
        by_id = {m["id"]: m for m in finals}
        assert by_id["over"]["error"]["code"] == "overloaded", by_id["over"]
        assert finals[0]["id"] == "over"  # at once: before anything in flight ended
        assert "over" not in progress
        assert by_id["fits"]["result"] == [{"result": {"n": n}} for n in range(3)]
        assert "pid" in by_id["w"]["result"]
