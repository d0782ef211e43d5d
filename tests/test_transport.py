"""Unit tests for :mod:`taskoffload._transport`."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from taskoffload._transport import write_now
from tests._trial_bridge import pytest_module


def connection_pair() -> tuple[tcp.Connection, socket.socket]:
    """A Twisted TCP-style connection over one end of a socket pair, and the other end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    connection = tcp.Connection(ours, Protocol(), MemoryReactorClock())
    connection.connected = True  # as a connected client or server connection is
    return connection, theirs


def test_socket_connection_sends_at_once() -> None:
    """On a socket connection the bytes reach the peer without waiting for a reactor turn."""
    connection, peer = connection_pair()
    write_now(connection, b"hello\n")
    assert peer.recv(100) == b"hello\n"


def test_nothing_buffered_goes_straight_to_the_socket() -> None:
    """Behind an empty buffer, the bytes are sent without registering the socket for writing."""
    connection, peer = connection_pair()
    registered: list[object] = []
    connection.reactor.addWriter = registered.append  # type: ignore[method-assign]  # a recorder
    write_now(connection, b"hello\n")
    assert registered == []
    assert (connection.dataBuffer, connection._tempDataBuffer) == (b"", [])
    assert peer.recv(100) == b"hello\n"


def test_later_messages_of_a_turn_go_together_at_its_end() -> None:
    """The first message of a turn is sent at once; the next ones wait for the turn's
    end and leave in one send; in the next turn the first goes at once again."""
    connection, peer = connection_pair()
    peer.setblocking(False)
    write_now(connection, b"1\n")
    write_now(connection, b"2\n")
    write_now(connection, b"3\n")
    assert peer.recv(100) == b"1\n"
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    connection.doWrite()  # what the reactor does at the end of the turn
    assert peer.recv(100) == b"2\n3\n"
    connection.reactor.advance(0)  # the next turn
    write_now(connection, b"4\n")
    assert peer.recv(100) == b"4\n"


def test_bytes_behind_buffered_ones_keep_their_order() -> None:
    """With bytes already buffered, new ones queue behind them and the two arrive in order."""
    connection, peer = connection_pair()
    connection.write(b"first\n")  # buffered, as an ordinary write is until the reactor's turn
    write_now(connection, b"second\n")
    received = b""
    while len(received) < len(b"first\nsecond\n"):
        received += peer.recv(100)
    assert received == b"first\nsecond\n"


def test_what_the_socket_does_not_take_is_left_to_the_reactor() -> None:
    """A socket with no room keeps the rest in the transport, which sends it when writable."""
    connection, peer = connection_pair()
    connection.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = b"x" * (1 << 22)
    write_now(connection, big)
    assert connection.reactor.getWriters() == [connection]
    received = 0
    peer.setblocking(True)
    while received < len(big):
        received += len(peer.recv(1 << 20))
        connection.doWrite()
    assert received == len(big)


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


class UnusableSocket:
    """A socket that fails the test if anything is sent on it directly."""

    def send(self, data: bytes) -> int:
        raise AssertionError("sent on the socket directly")


class TLSConnection:
    """A socket connection with TLS started, recording its writes."""

    TLS = True
    disconnecting = False

    def __init__(self) -> None:
        self.socket = UnusableSocket()
        self.reactor = MemoryReactorClock()
        self.events: list[str] = []

    def write(self, data: bytes) -> None:
        self.events.append("write")

    def doWrite(self) -> None:
        self.events.append("flush")


def test_tls_connection_is_left_to_the_reactor() -> None:
    """A TLS connection is written as usual, not sent on its socket nor flushed early
    (its bytes must go through TLS first); a plain one sends at once."""
    tls = TLSConnection()
    plain, plain_peer = connection_pair()
    write_now(tls, b"x")
    write_now(plain, b"x")
    assert tls.events == ["write"]
    assert plain_peer.recv(100) == b"x"


class RecordingWrapper(ProtocolWrapper):
    """A wrapping transport (as TLS over an endpoint is), recording what it is given."""

    def __init__(self) -> None:
        super().__init__(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_wrapped_connection_gets_its_wrappers_write() -> None:
    """Over a wrapper (TLS is one), the bytes go to the wrapper, never to the socket
    beneath it, though the wrapper forwards the lookup of ``socket`` to it."""
    connection, peer = connection_pair()
    wrapper = RecordingWrapper()
    wrapper.makeConnection(connection)
    assert wrapper.socket is connection.socket  # what made the mistake possible
    write_now(wrapper, b"secret\n")
    assert wrapper.written == [b"secret\n"]
    peer.setblocking(False)
    with pytest.raises(BlockingIOError):
        peer.recv(100)


def test_other_transports_get_a_plain_write() -> None:
    """A transport that is not a socket connection (a test's StringTransport) is just written to."""
    transport = StringTransport()
    write_now(transport, b"line\n")
    assert transport.value() == b"line\n"


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
