"""
What the integration tests share: the real ``twistd -n taskoffload`` in a
subprocess on loopback, and :class:`IntegrationTestCase`, the base of every
integration test.

The tests are ``twisted.trial.unittest.TestCase`` classes, so one suite runs
under both runners: ``python -m twisted.trial tests`` and ``pytest`` (which
collects trial test cases natively).  Each process tree gets its own session
(process group); cleanup ends the whole group and checks that nothing of it is
left.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from twisted.trial import unittest

from harness.processes import TwistdTree, free_port, free_ports

T = TypeVar("T")

__all__ = [
    "IntegrationTestCase",
    "LineClient",
    "Twistd",
    "accepted_by_workers",
    "client_ports",
    "free_port",
    "free_ports",
    "poll",
    "wait_for",
]


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll ``predicate`` until it returns something true, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def poll(predicate: Callable[[], T], timeout: float, what: str = "condition") -> T:
    """Like :func:`wait_for`, for a test running on the reactor: poll ``predicate``
    without blocking the reactor; :return: its first true value."""
    from twisted.internet import reactor, task

    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)
    return value


class Twistd(TwistdTree):
    """
    One ``twistd -n taskoffload`` process tree (:class:`harness.processes.TwistdTree`)
    as the integration tests use it: run in ``directory``, logging to
    ``twistd.log`` there, with psutil's view of its processes, and a stop that
    fails the test if anything of its process group is left.
    """

    def __init__(self, directory: Path, args: list[str]) -> None:
        super().__init__(args, directory, name="twistd")

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{self.log()}")
            return text in self.log()

        wait_for(seen, timeout, what=f"{text!r} in the log")

    def group_processes(self) -> list[psutil.Process]:
        """Every live process in this tree's process group."""
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) == self.pid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        return found

    def fork_server(self) -> psutil.Process:
        children = psutil.Process(self.pid).children()
        assert len(children) == 1, children
        return children[0]

    def worker_pids(self) -> set[int]:
        """PIDs of the live worker processes."""
        try:
            return {
                p.pid for p in self.fork_server().children() if p.status() != psutil.STATUS_ZOMBIE
            }
        except (psutil.NoSuchProcess, AssertionError):
            return set()

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop the tree as :meth:`TwistdTree.stop` does (SIGTERM to ``twistd`` alone,
        then SIGKILL to the process group), then fail unless the whole group is gone.
        """
        if self._process is None:
            return
        super().stop(timeout)
        wait_for(lambda: not self.group_processes(), 5.0, what="the process group to end")


class LineClient:
    """A blocking newline-JSON client for raw protocol tests."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def reply(self) -> dict:
        """Read one reply line and decode it."""
        while b"\n" not in self.buffer:
            chunk = self.socket.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def closed(self) -> bool:
        """True once the server has closed the connection (after any unread replies)."""
        try:
            return self.socket.recv(65536) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.socket.close()


def accepted_by_workers(tree: Twistd, local_ports: set[int]) -> bool:
    """True once every client socket with one of ``local_ports`` is held by a worker."""
    taken = set()
    for pid in tree.worker_pids():
        try:
            connections = psutil.Process(pid).net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        for conn in connections:
            if conn.raddr and conn.raddr.port in local_ports:
                taken.add(conn.raddr.port)
    return taken == local_ports


def client_ports(tree: Twistd, pool_port: int) -> set[int]:
    """Local ports of this test process's TCP connections to ``pool_port``."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == pool_port and c.status == psutil.CONN_ESTABLISHED
    }


class IntegrationTestCase(unittest.TestCase):
    """
    The base of every integration test: starts real process trees and ends them.

    Every tree started with :meth:`twistd`, :meth:`pool` or :meth:`role_all` is
    stopped in cleanup, and its whole process group must be gone.  Under pytest
    these tests carry the ``integration`` marker, so ``pytest -m 'not
    integration'`` runs only the in-memory tier.
    """

    pytestmark = [pytest.mark.integration]

    #: Seconds a test may take under trial (pytest-timeout bounds it under pytest).
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.tmp_path = Path(tempfile.mkdtemp(prefix="taskoffload-test-"))
        self.addCleanup(shutil.rmtree, self.tmp_path, True)

    def setenv(self, name: str, value: str) -> None:
        """Set environment variable ``name`` (which started trees inherit) for this test."""
        old = os.environ.get(name)
        os.environ[name] = value
        if old is None:
            self.addCleanup(os.environ.pop, name, None)
        else:
            self.addCleanup(os.environ.__setitem__, name, old)

    def use(self, context: AbstractContextManager[T]) -> T:
        """Enter ``context`` now and exit it in cleanup; :return: what it gives."""
        value = context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)
        return value

    def add_pythonpath(self, directory: Path) -> None:
        """Put ``directory`` first on the ``PYTHONPATH`` of trees started from now on."""
        path = [str(directory), *filter(None, [os.environ.get("PYTHONPATH")])]
        self.setenv("PYTHONPATH", os.pathsep.join(path))

    def tasks_module(self, name: str, source: str) -> Path:
        """Write the task module ``name`` into the test's directory, which trees started
        from now on import from (``--tasks NAME``). :return: its path."""
        path = self.tmp_path / f"{name}.py"
        path.write_text(source)
        self.add_pythonpath(self.tmp_path)
        return path

    def refused_start(self, name: str, source: str) -> str:
        """Start a one-worker pool on the task module ``name`` (``source``), which is
        expected to be refused; wait for twistd to exit. :return: its log."""
        self.tasks_module(name, source)
        tree = self.twistd(
            "--role=worker",
            "--count=1",
            "--listen",
            f"tcp:{free_port()}:interface=127.0.0.1",
            "--tasks",
            name,
        )
        tree.process.wait(timeout=30)
        return tree.log()

    def twistd(self, *args: str, directory: Path | None = None) -> Twistd:
        """Start ``twistd -n taskoffload ARGS...`` in ``directory`` (the test's own by
        default); it is ended in cleanup."""
        if directory is None:
            directory = self.tmp_path
        directory.mkdir(parents=True, exist_ok=True)
        tree = Twistd(directory, list(args)).start()
        self.addCleanup(tree.stop)
        return tree

    def twistd_tree(self, *args: str) -> Twistd:
        """Like :meth:`twistd`, but the tree runs in, and logs to, a directory of its own."""
        self._trees = getattr(self, "_trees", 0) + 1
        return self.twistd(*args, directory=self.tmp_path / f"twistd-{self._trees}")

    def pool(self, count: int = 8, *extra: str) -> tuple[Twistd, int]:
        """Start a worker pool on a free port and wait until every worker serves.

        :return: the tree and its port.
        """
        port = free_port()
        tree = self.twistd(
            "--role=worker",
            f"--count={count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        )
        tree.wait_for_log(f"All {count} workers serving")
        return tree, port

    def gateway(self, *pools: str) -> tuple[Twistd, int]:
        """Start a gateway (role gateway, a directory of its own) on a free port, with
        ``--pool`` each of ``pools``; wait until it listens.

        :return: the tree and its port.
        """
        port = free_port()
        tree = self.twistd_tree(
            "--role=gateway",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *(arg for pool in pools for arg in ("--pool", pool)),
        )
        tree.wait_for_log("Gateway listening on")
        return tree, port

    def role_all(self, count: int = 2, *extra: str) -> tuple[Twistd, int, int]:
        """Start role all (gateway and pool in one tree) on free ports; wait until both serve.

        :return: the tree, the gateway's port and the pool's port.
        """
        gateway_port, pool_port = free_ports(2)
        tree = self.twistd(
            f"--count={count}",
            "--listen",
            f"tcp:{gateway_port}:interface=127.0.0.1",
            "--pool-listen",
            f"tcp:{pool_port}:interface=127.0.0.1",
            *extra,
        )
        tree.wait_for_log("Gateway listening on")
        tree.wait_for_log(f"All {count} workers serving")
        return tree, gateway_port, pool_port
