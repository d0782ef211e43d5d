"""Unit tests for :mod:`taskoffload._transport`."""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from taskoffload._transport import write_now
from tests._trial_bridge import pytest_module


def connection_pair() -> tuple[tcp.Connection, socket.socket]:
    """A Twisted TCP-style connection over one end of a socket pair, and the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    connection = tcp.Connection(ours, Protocol(), MemoryReactor())
    connection.connected = True  # as a connected client or server connection is
    return connection, theirs


def test_socket_connection_sends_at_once() -> None:
    """On a socket connection the bytes reach the peer without waiting for a reactor turn."""
    connection, peer = connection_pair()
    write_now(connection, b"hello\n")
    assert peer.recv(100) == b"hello\n"


def test_closing_connection_is_left_to_the_reactor() -> None:
    """A connection that is closing keeps its bytes for the reactor, which sends them as usual."""
    connection, peer = connection_pair()
    connection.disconnecting = True
    write_now(connection, b"later\n")
    peer.setblocking(False)
    try:
        received = peer.recv(100)
    except BlockingIOError:
        received = b""
    assert received == b""
    # What the reactor does once the socket is writable sends them.
    connection.doWrite()
    peer.setblocking(True)
    assert peer.recv(100) == b"later\n"


class RecordingConnection:
    """A socket connection's interface, recording writes and early flushes."""

    def __init__(self, tls: bool) -> None:
        self.TLS = tls
        self.disconnecting = False
        self.events: list[str] = []

    def write(self, data: bytes) -> None:
        self.events.append("write")

    def doWrite(self) -> None:
        self.events.append("flush")


def test_tls_connection_is_left_to_the_reactor() -> None:
    """A TLS connection is written as usual and not flushed early; a plain one is flushed."""
    tls, plain = RecordingConnection(tls=True), RecordingConnection(tls=False)
    write_now(tls, b"x")
    write_now(plain, b"x")
    assert tls.events == ["write"]
    assert plain.events == ["write", "flush"]


def test_other_transports_get_a_plain_write() -> None:
    """A transport that is not a socket connection (a test's StringTransport) is just written to."""
    transport = StringTransport()
    write_now(transport, b"line\n")
    assert transport.value() == b"line\n"


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
