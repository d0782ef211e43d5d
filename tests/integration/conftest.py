"""
Fixtures that run the real ``twistd -n taskoffload`` in a subprocess on loopback.

Each process tree gets its own session (process group); teardown ends the whole
group and checks that nothing of it is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from taskoffload.bench import free_port, free_ports

__all__ = ["free_port", "free_ports"]  # for the test modules, which import them from here


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


class Twistd:
    """One ``twistd -n taskoffload`` process tree."""

    def __init__(self, directory: Path, args: list[str]) -> None:
        self.directory = directory
        self.args = args
        self.log_path = directory / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Twistd:
        log = self.log_path.open("wb")
        twistd = Path(sys.executable).with_name("twistd")
        command = [str(twistd), "-n", "--pidfile=", "taskoffload", *self.args]
        self.process = subprocess.Popen(
            command,
            cwd=self.directory,  # not the repository: the installed package must be found
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        def seen() -> bool:
            assert self.process is not None
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

    def stop(self) -> None:
        """End the whole process group: SIGTERM, then SIGKILL; wait until it is gone."""
        if self.process is None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process.poll() is None:
            self.process.wait(timeout=5)
        wait_for(lambda: not self.group_processes(), 5.0, what="the process group to end")


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[callable]:
    """Start ``twistd -n taskoffload ARGS...``; every tree started is ended on teardown."""
    started: list[Twistd] = []

    def start(*args: str) -> Twistd:
        tree = Twistd(tmp_path, list(args)).start()
        started.append(tree)
        return tree

    yield start
    for tree in started:
        tree.stop()


@pytest.fixture
def pool(twistd) -> Iterator[callable]:
    """Start a worker pool on a free port and wait until every worker serves."""

    def start(count: int = 8, *extra: str) -> tuple[Twistd, int]:
        port = free_port()
        tree = twistd(
            "--role=worker",
            f"--count={count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        )
        tree.wait_for_log(f"All {count} workers serving")
        return tree, port

    yield start


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


@pytest.fixture
def twistd_trees(tmp_path: Path) -> Iterator[callable]:
    """Like ``twistd``, but each tree runs in, and logs to, a directory of its own."""
    started: list[Twistd] = []

    def start(*args: str) -> Twistd:
        directory = tmp_path / f"twistd-{len(started)}"
        directory.mkdir()
        tree = Twistd(directory, list(args)).start()
        started.append(tree)
        return tree

    yield start
    for tree in started:
        tree.stop()


@pytest.fixture
def role_all(twistd) -> Iterator[callable]:
    """Start role all (gateway and pool in one tree) on free ports; wait until both serve."""

    def start(count: int = 2, *extra: str) -> tuple[Twistd, int, int]:
        """:return: the tree, the gateway's port and the pool's port."""
        gateway_port = free_port()
        pool_port = wait_for(lambda: (p := free_port()) != gateway_port and p, 5, what="a port")
        tree = twistd(
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

    yield start
