"""
Unit tests for :mod:`taskoffload._forkserver` without forking: command parsing,
forking, reaping and the stop deadline, with ``fork``, ``waitpid``, ``kill`` and
the clock stood in for, and pipes for the descriptors it reads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest

from taskoffload._forkserver import ForkServer, fork_commands, read_line
from taskoffload.config import PoolConfig
from taskoffload.events import Event, EventWriter, Exited, Forked, decode
from tests._trial_bridge import pytest_module


class FakeOS:
    """Stands in for ``os.fork``, ``os.waitpid``, ``os.kill`` and the clocks."""

    def __init__(self) -> None:
        self._pids = iter(range(100, 200))
        #: ``(pid, wait status)`` of each child that has exited and is not reaped.
        self.exits: list[tuple[int, int]] = []
        self.no_children = False
        self.killed: list[tuple[int, int]] = []
        #: Whether a SIGKILLed child exits at once.
        self.kill_ends = True
        self.now = 0.0
        self.slept: list[float] = []

    def fork(self) -> int:
        return next(self._pids)

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        assert (pid, options) == (-1, os.WNOHANG)
        if self.no_children:
            raise ChildProcessError
        return self.exits.pop(0) if self.exits else (0, 0)

    def kill(self, pid: int, signum: int) -> None:
        self.killed.append((pid, signum))
        if self.kill_ends:
            self.exits.append((pid, signum))  # the wait status of a death by signum

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


class Server:
    """A fork server over pipes, with a :class:`FakeOS`."""

    def __init__(self) -> None:
        self.os = FakeOS()
        self._fds: list[int] = []
        self.events_r, events_w = self.pipe()
        os.set_blocking(self.events_r, False)
        self.commands_r, self.commands_w = self.pipe()
        self.lifeline_r, self.lifeline_w = self.pipe()
        self.wake_r, self.wake_w = self.pipe()
        os.set_blocking(self.wake_r, False)
        self.server = ForkServer(
            PoolConfig(stop_timeout=10.0),
            EventWriter(events_w, None),
            (self.wake_r, self.wake_w),
            command_fd=self.commands_r,
            lifeline_fd=self.lifeline_r,
            fork=self.os.fork,
            waitpid=self.os.waitpid,
            kill=self.os.kill,
            monotonic=self.os.monotonic,
            sleep=self.os.sleep,
        )

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self._fds += [r, w]
        return r, w

    def events(self) -> list[Event]:
        """The events the fork server has sent since the last call."""
        try:
            data = os.read(self.events_r, 65536)
        except BlockingIOError:
            return []
        return [decode(line) for line in data.splitlines()]

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass  # the test closed it already


@pytest.fixture
def s() -> Iterator[Server]:
    """A fork server over pipes, closed after the test."""
    server = Server()
    yield server
    server.close()


def fork_command(index: int) -> bytes:
    return orjson.dumps({"cmd": "fork", "index": index}) + b"\n"


# Reading commands


def test_fork_commands_yields_each_fork_and_keeps_a_partial_line() -> None:
    """Whole lines are taken off the buffer; other commands are skipped, a partial line kept."""
    buffer = bytearray(fork_command(0) + b'{"cmd": "other"}\n' + fork_command(2) + b'{"cmd":"fo')
    assert list(fork_commands(buffer)) == [0, 2]
    assert buffer == b'{"cmd":"fo'


def test_fork_commands_raise_on_garbage_after_the_commands_before_it() -> None:
    """A line that is not JSON raises ValueError, once the commands before it are yielded."""
    commands = fork_commands(bytearray(fork_command(0) + b"garbage\n"))
    assert next(commands) == 0
    with pytest.raises(ValueError):
        next(commands)


def test_read_line() -> None:
    """read_line returns one line at a time, and None at end-of-file."""
    r, w = os.pipe()
    try:
        os.write(w, b"first\nsec")
        buffer = bytearray()
        assert read_line(r, buffer) == b"first"
        os.write(w, b"ond\n")
        assert read_line(r, buffer) == b"second"
        os.close(w)
        assert read_line(r, buffer) is None
    finally:
        os.close(r)


# Forking and reaping


def test_fork_commands_fork_and_report_each_worker(s: Server) -> None:
    """Each fork command forks a worker, remembered by its slot and reported as forked."""
    s.server.commands_received(fork_command(0) + fork_command(1))
    assert s.server.children == {100: 0, 101: 1}
    assert s.events() == [Forked(index=0, pid=100), Forked(index=1, pid=101)]


def test_a_command_split_over_reads_forks_once_whole(s: Server) -> None:
    """A command that arrives in two reads forks when its line is whole."""
    s.server.commands_received(fork_command(3)[:5])
    assert s.server.children == {}
    s.server.commands_received(fork_command(3)[5:])
    assert s.server.children == {100: 3}


def test_fork_leaves_sigterm_unblocked(s: Server) -> None:
    """SIGTERM, blocked around the fork, is unblocked again in the fork server."""
    s.server.fork(0)
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_reap_reports_each_exit_with_its_code(s: Server) -> None:
    """Reaped workers are reported with their exit code, negative when killed by a signal."""
    s.server.commands_received(fork_command(0) + fork_command(1))
    s.events()
    s.os.exits = [(100, 3 << 8), (101, signal.SIGKILL)]
    s.server.reap()
    assert s.events() == [Exited(index=0, pid=100, code=3), Exited(index=1, pid=101, code=-9)]
    assert s.server.children == {}


def test_reap_reports_an_unknown_child_without_a_slot(s: Server) -> None:
    """A child the fork server did not fork as a worker is reported with no slot."""
    s.server.fork(0)
    s.events()
    s.os.exits = [(555, 0)]
    s.server.reap()
    assert s.events() == [Exited(index=None, pid=555, code=0)]
    assert s.server.children == {100: 0}


def test_reap_without_children_reports_nothing(s: Server) -> None:
    """With no child left to wait for, reaping stops quietly."""
    s.server.fork(0)
    s.events()
    s.os.no_children = True
    s.server.reap()
    assert s.events() == []


# Stopping


def test_end_of_commands_sets_the_stop_deadline(s: Server) -> None:
    """Once the command pipe closes, the workers get the stop timeout and 2 s more."""
    s.os.now = 5.0
    s.server.commands_received(b"")
    assert (s.server.stdin_open, s.server.deadline) == (False, 17.0)
    assert s.server.watched() == [s.wake_r]


def test_supervisor_gone_sets_the_stop_deadline(s: Server) -> None:
    """The lifeline's end-of-file sets the deadline; the lifeline is no longer watched."""
    assert s.server.watched() == [s.wake_r, s.commands_r, s.lifeline_r]
    s.os.now = 1.0
    s.server.supervisor_gone()
    assert s.server.deadline == 13.0
    assert s.server.watched() == [s.wake_r, s.commands_r]


def test_not_done_until_stopping(s: Server) -> None:
    """With no deadline set the fork server runs on, even with no worker."""
    assert not s.server.done()


def test_done_at_once_without_workers(s: Server) -> None:
    """A fork server told to stop with no worker left is done at once."""
    s.server.commands_received(b"")
    assert s.server.done()
    assert s.os.killed == []


def test_stragglers_are_killed_past_the_deadline(s: Server) -> None:
    """Workers still running past the deadline are SIGKILLed, then reaped, and it is done."""
    s.server.commands_received(fork_command(0) + fork_command(1))
    s.server.commands_received(b"")
    s.os.exits = [(101, 0)]
    s.os.now = 12.0
    assert not s.server.done()
    s.server.reap()
    assert not s.server.done()
    assert s.os.killed == []
    s.os.now = 12.5
    assert s.server.done()
    assert s.os.killed == [(100, signal.SIGKILL)]
    assert s.os.slept == [0.1]
    assert s.events()[-1] == Exited(index=0, pid=100, code=-9)


def test_a_straggler_that_survives_its_kill_is_killed_again(s: Server) -> None:
    """A worker not yet reaped after its SIGKILL keeps the fork server up, and is killed again."""
    s.server.fork(0)
    s.server.commands_received(b"")
    s.os.kill_ends = False
    s.os.now = 13.0
    assert not s.server.done()
    assert not s.server.done()
    assert s.os.killed == [(100, signal.SIGKILL)] * 2


def test_step_reads_the_descriptors_found_readable(s: Server) -> None:
    """A step drains the wake-up pipe, forks on commands, and stops at the lifeline's end."""
    os.write(s.wake_w, b"\0\0")
    os.write(s.commands_w, fork_command(0))
    assert not s.server.step([s.wake_r, s.commands_r])
    assert s.server.children == {100: 0}
    with pytest.raises(BlockingIOError):
        os.read(s.wake_r, 1)
    os.close(s.lifeline_w)
    assert not s.server.step([s.lifeline_r])
    assert s.server.deadline == 12.0
    s.os.exits = [(100, 0)]
    assert s.server.step([])


def test_step_at_the_end_of_commands(s: Server) -> None:
    """A step that reads end-of-file on the command pipe stops the fork server."""
    os.close(s.commands_w)
    assert s.server.step([s.commands_r])
    assert not s.server.stdin_open


#: Run in a fresh interpreter: warm up as the fork server does, then list what a
#: worker would still import after the fork.
_AFTER_WARM_UP = """
import sys
from taskoffload._forkserver import _warm_up
from taskoffload.config import PoolConfig
_warm_up(PoolConfig())
before = set(sys.modules)
from taskoffload._child import run_worker
print(sorted(set(sys.modules) - before))
"""


@pytest.mark.integration
def test_the_warm_up_imports_what_a_worker_runs() -> None:
    """Before it forks, the fork server has imported every module a worker imports to
    run (each one imported after the fork costs every worker pages of its own)."""
    done = subprocess.run(
        [sys.executable, "-c", _AFTER_WARM_UP], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


testSuite = pytest_module(__file__)
