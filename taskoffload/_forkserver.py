"""
The fork server: one process, spawned by the supervisor, that imports Twisted and
the task modules once, freezes its heap, and forks a worker whenever the supervisor
asks.  Forking from a warm process is what makes a hundred workers start in well
under a second and share most of their memory.

It runs no reactor (a forked child must start with none), just a ``select`` loop
(:class:`ForkServer`) over three descriptors:

- fd 0, commands from the supervisor, one JSON object per line; the first line is
  the pool's configuration (:meth:`PoolConfig.to_json
  <taskoffload.config.PoolConfig.to_json>`); then ``{"cmd": "fork", "index": N}``;
- fd 4, the lifeline: end-of-file there means the supervisor died;
- a self-pipe woken by ``SIGCHLD``, to reap workers and report their exits.

Events go to the supervisor on fd 1, one JSON line per write.  fd 2 is the
supervisor's raw log of anything written to standard error; fd 3 is the shared
listening socket, which the fork server never touches but passes to its children,
and fds 5 and up are the listening sockets of the pool's lanes, in order.
"""

from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Collection, Iterator
from typing import NoReturn

import orjson

from taskoffload.config import PoolConfig
from taskoffload.events import EventWriter, Exited, Failed, Forked, Ready

LISTEN_FD = 3
LIFELINE_FD = 4
#: The listening socket of the pool's first lane; each next lane's is the next fd.
FIRST_LANE_FD = 5


def listen_fd(config: PoolConfig, index: int) -> int:
    """:return: the fd of the listening socket worker slot ``index`` serves."""
    position = config.lane_of_slot(index)
    return LISTEN_FD if position is None else FIRST_LANE_FD + position


_PR_SET_PDEATHSIG = 1

#: Seconds the workers get beyond the stop timeout, once the fork server stops,
#: before it kills those still running.
STOP_MARGIN = 2.0
#: The longest the loop sleeps with nothing to read (it checks the stop deadline).
POLL_SECONDS = 0.5


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the lifeline pipe still ends the worker


def read_line(fd: int, buffer: bytearray) -> bytes | None:
    """
    Read from ``fd`` until ``buffer`` holds a whole line, and take it off.

    :return: the line, without its delimiter; ``None`` at end-of-file.
    """
    while b"\n" not in buffer:
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def fork_commands(buffer: bytearray) -> Iterator[int]:
    """
    Take each whole command line off ``buffer``, one at a time, and yield the slot
    index of each fork command; a partial last line stays in ``buffer``.

    :raises ValueError: for a line that is not a JSON command.
    """
    while b"\n" in buffer:
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        command = orjson.loads(line)
        if command.get("cmd") == "fork":
            yield int(command["index"])


def _warm_up(config: PoolConfig) -> None:
    """Import everything a worker needs, so that forked children share it."""
    import twisted.internet.default
    import twisted.internet.epollreactor
    import twisted.internet.tcp
    import twisted.internet.unix
    import twisted.logger  # noqa: F401

    # The worker process's own module too: imported after the fork, it would
    # cost every worker about 2 MiB of pages of its own.
    import taskoffload._child
    import taskoffload.worker  # noqa: F401
    from taskoffload.registry import load_tasks

    load_tasks(config.tasks).check_lanes(lane.name for lane in config.lanes)
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError(
            "a task module imported twisted.internet.reactor at import time; import it "
            "inside the task function instead (workers are forked before any reactor "
            "exists, and each installs its own)"
        )


class ForkServer:
    """
    Fork workers on command, reap them, and stop once the supervisor closes the
    command pipe or dies.

    :param config: the pool's configuration, passed on to each worker.
    :param events: the events pipe to the supervisor.
    :param wake: the read and write ends of the self-pipe ``SIGCHLD`` wakes.
    :param commands: bytes already read from ``command_fd``, not yet handled.
    :param command_fd: the supervisor's commands.
    :param lifeline_fd: the lifeline, at end-of-file once the supervisor is gone.
    :param fork: :func:`os.fork`, or a stand-in for tests.
    :param waitpid: :func:`os.waitpid`, or a stand-in.
    :param kill: :func:`os.kill`, or a stand-in.
    :param monotonic: :func:`time.monotonic`, or a stand-in.
    :param sleep: :func:`time.sleep`, or a stand-in.
    :ivar children: the slot index of each worker process not yet reaped.
    :ivar stdin_open: whether the supervisor's command pipe is still open.
    :ivar deadline: when (``monotonic()``) the workers still running are killed;
        ``None`` until the fork server stops.
    """

    def __init__(
        self,
        config: PoolConfig,
        events: EventWriter,
        wake: tuple[int, int],
        commands: bytearray | None = None,
        command_fd: int = 0,
        lifeline_fd: int = LIFELINE_FD,
        fork: Callable[[], int] = os.fork,
        waitpid: Callable[[int, int], tuple[int, int]] = os.waitpid,
        kill: Callable[[int, int], None] = os.kill,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._config = config
        self._events = events
        self._wake_r, self._wake_w = wake
        self._commands = commands if commands is not None else bytearray()
        self._command_fd = command_fd
        self._lifeline_fd = lifeline_fd
        self._fork = fork
        self._waitpid = waitpid
        self._kill = kill
        self._monotonic = monotonic
        self._sleep = sleep
        self.children: dict[int, int] = {}
        self.stdin_open = True
        self.deadline: float | None = None

    def serve(self) -> None:
        """Run the loop until the fork server has stopped and its workers exited."""
        while not self.step(self._wait()):
            pass

    def watched(self) -> list[int]:
        """The descriptors to wait on: the lifeline only until the fork server stops."""
        watched = [self._wake_r]
        if self.stdin_open:
            watched.append(self._command_fd)
        if self.deadline is None:
            watched.append(self._lifeline_fd)
        return watched

    def _wait(self) -> list[int]:
        try:
            readable, _, _ = select.select(self.watched(), [], [], POLL_SECONDS)
        except InterruptedError:
            return []
        return readable

    def step(self, readable: Collection[int]) -> bool:
        """
        Handle what ``select`` found ``readable``, and reap the workers that exited.

        :return: whether the fork server is done and should exit.
        """
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        self.reap()
        if self._command_fd in readable:
            self.commands_received(os.read(self._command_fd, 65536))
        if self._lifeline_fd in readable and not os.read(self._lifeline_fd, 64):
            self.supervisor_gone()
        return self.done()

    def commands_received(self, chunk: bytes) -> None:
        """Fork a worker for each fork command; an empty ``chunk`` (end-of-file) stops."""
        if not chunk:
            self.stdin_open = False
            if self.deadline is None:
                self.deadline = self._monotonic() + self._config.stop_timeout + STOP_MARGIN
            return
        self._commands.extend(chunk)
        for index in fork_commands(self._commands):
            self.fork(index)

    def supervisor_gone(self) -> None:
        """The lifeline closed: the supervisor died."""
        # The workers see the same end-of-file and stop gracefully; give them the
        # stop timeout, then make sure.
        self.deadline = self._monotonic() + self._config.stop_timeout + STOP_MARGIN

    def done(self) -> bool:
        """
        :return: whether the fork server has stopped and every worker exited; past
            the deadline, kill the workers still running first.
        """
        if self.deadline is None:
            return False
        if not self.children:
            return True
        if self._monotonic() > self.deadline:
            for pid in list(self.children):
                try:
                    self._kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._sleep(0.1)
            self.reap()
            if not self.children:
                return True
        return False

    def reap(self) -> None:
        """Report the exit of every worker that has exited."""
        while self.children:
            try:
                pid, status = self._waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            self._events.send(Exited(index=index, pid=pid, code=code))

    def fork(self, index: int) -> None:
        """Fork a worker for slot ``index``, and report it."""
        # The fork server ignores SIGTERM, and a child inherits that until it
        # resets it: a SIGTERM sent in between (a stop right after a fork) would
        # be lost.  Blocked, it stays pending instead, even while ignored, and is
        # delivered when the child unblocks it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = self._fork()
        if pid == 0:
            self._become_worker(index)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        self.children[pid] = index
        self._events.send(Forked(index=index, pid=pid))

    def _become_worker(self, index: int) -> NoReturn:
        """In the forked child: become the worker for slot ``index``."""
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.close(self._wake_r)
            os.close(self._wake_w)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            events_fd = os.dup(1)
            os.dup2(2, 1)  # stray prints go to the raw log, not into the events
            _die_with_parent(signal.SIGKILL)
            if os.getppid() != self._events.pid:
                os._exit(1)
            from taskoffload._child import run_worker

            run_worker(self._config, index, events_fd, listen_fd(self._config, index), LIFELINE_FD)
        except BaseException:
            try:
                os.write(2, traceback.format_exc().encode("utf-8", "replace"))
            finally:
                os._exit(1)


def _wake_on_sigchld() -> tuple[int, int]:
    """A non-blocking self-pipe that each ``SIGCHLD`` writes to."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    return wake_r, wake_w


def main() -> NoReturn:
    """Run the fork server until the supervisor closes its command pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A signal to the whole process group must not take the fork server (and, by
    # the parent-death signal, every worker) down before the workers finish.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    events = EventWriter(1, None)
    commands = bytearray()
    first = read_line(0, commands)
    if first is None:
        os._exit(0)
    config = PoolConfig.from_json(first)
    os.environ.update(config.env)
    sys.path[:0] = [p for p in config.import_path if p not in sys.path]
    try:
        _warm_up(config)
    except BaseException:
        events.send(Failed(pid=events.pid, text=traceback.format_exc()))
        os._exit(3)
    gc.collect()
    gc.freeze()  # keep the imported heap out of the collector: pages stay shared
    events.send(Ready(pid=events.pid))
    ForkServer(config, events, _wake_on_sigchld(), commands).serve()
    os._exit(0)


if __name__ == "__main__":
    main()
