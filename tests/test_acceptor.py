"""
Unit tests for :mod:`taskoffload.acceptor`: the ``SharedSocketAcceptor`` over a
real loopback listening socket and a fake reactor that records what it is asked.
"""

from __future__ import annotations

import errno
import select
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from taskoffload.acceptor import SharedSocketAcceptor
from taskoffload.registry import TaskRegistry
from taskoffload.worker import TaskServerFactory
from tests._trial_bridge import pytest_module


def _registry() -> TaskRegistry:
    """No task: the acceptor never runs one."""
    return TaskRegistry.from_functions([])


class FakeReactor(Clock):
    """Records the acceptor's reader registrations and adopted connections."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []
        self.registrations: list[str] = []
        self.adopted: list[dict[str, Any]] = []

    def addReader(self, reader: Any) -> None:
        self.registrations.append("addReader")
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        self.registrations.append("removeReader")
        self.readers.remove(reader)

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> None:
        # The acceptor closes its copy afterwards, as the real reactor dups it.
        with socket.socket(fileno=socket.dup(fd)) as adopted:
            self.adopted.append(
                {
                    "peer": adopted.getpeername(),
                    "family": family,
                    "factory": factory,
                    "nodelay": adopted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                }
            )


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def clients() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def connect_clients(
    listening: socket.socket, clients: list[socket.socket], count: int
) -> list[Any]:
    """Connect ``count`` clients and wait until a connection is ready to accept."""
    for _ in range(count):
        client = socket.create_connection(listening.getsockname(), timeout=5)
        clients.append(client)
    readable, _, _ = select.select([listening], [], [], 5.0)
    assert readable, "no connection became ready to accept within 5 s"
    return [c.getsockname() for c in clients]


def make_acceptor(listening: socket.socket) -> tuple[SharedSocketAcceptor, FakeReactor]:
    reactor = FakeReactor()
    factory = TaskServerFactory(_registry(), reactor)
    return SharedSocketAcceptor(reactor, listening, factory), reactor


def test_accepts_one_connection_per_read(
    listening: socket.socket, clients: list[socket.socket]
) -> None:
    """Each wake-up accepts exactly one pending connection and leaves the rest queued."""
    acceptor, reactor = make_acceptor(listening)
    addresses = connect_clients(listening, clients, 3)
    acceptor.doRead()
    assert len(reactor.adopted) == 1
    acceptor.doRead()
    acceptor.doRead()
    assert sorted(a["peer"] for a in reactor.adopted) == sorted(addresses)
    assert acceptor.accepted == 3


def test_adopts_into_factory_with_nodelay(
    listening: socket.socket, clients: list[socket.socket]
) -> None:
    """An accepted TCP connection is handed to the task factory with Nagle off."""
    acceptor, reactor = make_acceptor(listening)
    connect_clients(listening, clients, 1)
    acceptor.doRead()
    [adopted] = reactor.adopted
    assert adopted["family"] == socket.AF_INET
    assert adopted["factory"] is acceptor._factory
    assert adopted["nodelay"]


def test_read_with_nothing_pending(listening: socket.socket) -> None:
    """A wake-up with no connection pending (another process took it) does nothing."""
    acceptor, reactor = make_acceptor(listening)
    acceptor.resume()
    acceptor.doRead()
    assert reactor.adopted == []
    assert reactor.registrations == ["addReader"]


class Room:
    """A factory whose capacity the test sets."""

    def __init__(self, has_capacity: bool) -> None:
        self.has_capacity = has_capacity


def test_capacity_pauses_and_resumes(
    listening: socket.socket, clients: list[socket.socket]
) -> None:
    """Without capacity, a waiting connection is left queued and reading stops; with
    capacity again, reading starts and the connection is taken, registering once each."""
    room = Room(True)
    reactor = FakeReactor()
    acceptor = SharedSocketAcceptor(reactor, listening, room)
    acceptor.set_capacity(True)
    acceptor.set_capacity(True)
    assert reactor.readers == [acceptor]
    room.has_capacity = False
    acceptor.set_capacity(False)
    acceptor.set_capacity(False)
    assert reactor.registrations == ["addReader"]  # losing capacity costs no call
    connect_clients(listening, clients, 1)
    acceptor.doRead()
    assert reactor.adopted == []
    assert reactor.readers == []
    room.has_capacity = True
    acceptor.set_capacity(True)
    assert reactor.readers == [acceptor]
    acceptor.doRead()
    assert len(reactor.adopted) == 1
    assert reactor.registrations == ["addReader", "removeReader", "addReader"]


def test_stop(listening: socket.socket) -> None:
    """After ``stop()`` the acceptor stops reading, closes its socket and never resumes."""
    acceptor, reactor = make_acceptor(listening)
    acceptor.resume()
    acceptor.stop()
    acceptor.set_capacity(True)
    assert reactor.readers == []
    assert listening.fileno() == -1


class ExhaustedSocket:
    """A listening socket whose ``accept()`` fails as when out of descriptors."""

    family = socket.AF_INET

    def __init__(self, error: int) -> None:
        self.error = error

    def accept(self) -> Any:
        raise OSError(self.error, "accept failed")


def test_out_of_descriptors_backs_off() -> None:
    """Out of descriptors, the acceptor pauses 1 s instead of spinning."""
    reactor = FakeReactor()
    factory = TaskServerFactory(_registry(), reactor)
    acceptor = SharedSocketAcceptor(reactor, ExhaustedSocket(errno.EMFILE), factory)  # type: ignore[arg-type]  # a fake socket
    acceptor.resume()
    with capturedLogs() as events:
        acceptor.doRead()
    assert reactor.readers == []
    assert any("pausing" in e["log_format"] for e in events)
    acceptor.set_capacity(True)
    assert reactor.readers == []
    reactor.advance(1.0)
    assert reactor.readers == [acceptor]


def test_aborted_connection_ignored() -> None:
    """A connection aborted before it was accepted is skipped; reading goes on."""
    reactor = FakeReactor()
    factory = TaskServerFactory(_registry(), reactor)
    acceptor = SharedSocketAcceptor(reactor, ExhaustedSocket(errno.ECONNABORTED), factory)  # type: ignore[arg-type]  # a fake socket
    acceptor.resume()
    acceptor.doRead()
    assert reactor.readers == [acceptor]
    assert reactor.adopted == []


testSuite = pytest_module(__file__)
