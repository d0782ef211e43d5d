"""
The reference the benchmark holds taskoffload against: the smallest chain that
does the same job, so that every speed figure can be given as a ratio to it.

- ``python -m harness.reference echo PORT``: a bare ``LineReceiver`` that writes
  every line back (the worker-only reference).
- ``python -m harness.reference gateway PORT ECHO_PORT``: an Autobahn
  ``WebSocketServerProtocol`` that forwards each message as one line over one
  persistent, pipelined connection to the echo, and sends each line that comes
  back to the client whose message it answers (replies come back in order).
- ``python -m harness.reference forks COUNT``: a parent with Twisted imported
  forks COUNT children, each of which installs its own reactor, listens on the
  socket they share (serving the echo) and reports to the parent (the startup
  reference).

Each prints ``ready`` once it listens (``forks``: once every child has reported).  Not a product: no ids, no errors, no
limits, no recovery; only the cost every chain must pay.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import deque
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.protocols.basic import LineReceiver

__all__ = ["Echo", "Forwarder", "Upstream", "main"]

#: The longest line either side accepts (as the product's default --max-message).
MAX_LENGTH = 1024 * 1024


class Echo(LineReceiver):
    """Writes every line back."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LENGTH

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(line)


class Upstream(LineReceiver):
    """The gateway's one connection to the echo: replies return in request order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LENGTH

    def __init__(self) -> None:
        self.waiting: deque[Forwarder] = deque()

    def forward(self, client: Forwarder, payload: bytes) -> None:
        self.waiting.append(client)
        self.sendLine(payload)

    def lineReceived(self, line: bytes) -> None:
        client = self.waiting.popleft()
        if client.state == WebSocketServerProtocol.STATE_OPEN:
            client.sendMessage(line)


class Forwarder(WebSocketServerProtocol):
    """One WebSocket client of the reference gateway."""

    upstream: Upstream

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.upstream.forward(self, payload)


def _serve(factory: protocol.Factory, port: int) -> None:
    from twisted.internet import reactor

    listening = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
    listening.addCallback(lambda _: print("ready", flush=True))


def forks(count: int) -> None:
    """Fork ``count`` children that each install a reactor, listen and report; then wait."""
    # A parent with Twisted imported, as the fork server has it.
    import twisted.internet.default
    import twisted.internet.epollreactor
    import twisted.internet.tcp  # noqa: F401

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1024)
    listening.setblocking(False)
    reported, report = os.pipe()
    for _ in range(count):
        if os.fork() == 0:
            from twisted.internet import default

            default.install()
            from twisted.internet import reactor as child_reactor

            child_reactor.adoptStreamPort(  # type: ignore[attr-defined]  # IReactorSocket
                listening.fileno(), socket.AF_INET, protocol.Factory.forProtocol(Echo)
            )
            child_reactor.callWhenRunning(os.write, report, b".")  # type: ignore[attr-defined]  # IReactorCore
            child_reactor.run()  # type: ignore[attr-defined]  # IReactorCore
            os._exit(0)
    seen = 0
    while seen < count:
        seen += len(os.read(reported, count))
    print("ready", flush=True)
    os.wait()  # until the bench ends the group


def main(argv: list[str]) -> None:
    """Run the echo, the gateway or the forks (see the module's docstring)."""
    if argv[:1] == ["forks"] and len(argv) == 2:
        forks(int(argv[1]))  # before any reactor exists: each child installs its own
        return
    from twisted.internet import reactor

    if argv[:1] == ["echo"] and len(argv) == 2:
        _serve(protocol.Factory.forProtocol(Echo), int(argv[1]))
    elif argv[:1] == ["gateway"] and len(argv) == 3:

        def connected(upstream: Upstream) -> None:
            Forwarder.upstream = upstream
            factory: Any = WebSocketServerFactory(f"ws://127.0.0.1:{argv[1]}")
            factory.protocol = Forwarder
            _serve(factory, int(argv[1]))

        echo = TCP4ClientEndpoint(reactor, "127.0.0.1", int(argv[2]))
        connectProtocol(echo, Upstream()).addCallback(connected)
    else:
        raise SystemExit(
            "usage: python -m harness.reference echo PORT | gateway PORT ECHO_PORT | forks COUNT"
        )
    reactor.run()  # type: ignore[attr-defined]  # the global reactor provides IReactorCore


if __name__ == "__main__":
    main(sys.argv[1:])
