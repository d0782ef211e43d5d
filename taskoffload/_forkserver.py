"""
The fork server: one process, spawned by the supervisor, that imports Twisted and
the task modules once, freezes its heap, and forks a worker whenever the supervisor
asks.  Forking from a warm process is what makes a hundred workers start in well
under a second and share most of their memory.

It runs no reactor (a forked child must start with none), just a ``select`` loop
over three descriptors:

- fd 0, commands from the supervisor, one JSON object per line; the first line is
  the pool's configuration; then ``{"cmd": "fork", "index": N}``;
- fd 4, the lifeline: end-of-file there means the supervisor died;
- a self-pipe woken by ``SIGCHLD``, to reap workers and report their exits.

Events go to the supervisor on fd 1, one JSON line per write.  fd 2 is the
supervisor's raw log of anything written to standard error; fd 3 is the shared
listening socket, which the fork server never touches but passes to its children.
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
from typing import Any, NoReturn

import orjson

from taskoffload.events import EventWriter, Exited, Failed, Forked, Ready

LISTEN_FD = 3
LIFELINE_FD = 4

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the lifeline pipe still ends the worker


def _read_line(fd: int, buffer: bytearray) -> bytes | None:
    while b"\n" not in buffer:
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line


def _warm_up(config: dict[str, Any]) -> None:
    """Import everything a worker needs, so that forked children share it."""
    import twisted.internet.default
    import twisted.internet.epollreactor
    import twisted.internet.tcp
    import twisted.internet.unix
    import twisted.logger  # noqa: F401

    import taskoffload.worker  # noqa: F401
    from taskoffload.registry import load_tasks

    load_tasks(config["tasks"])
    if "twisted.internet.reactor" in sys.modules:
        raise RuntimeError(
            "a task module imported twisted.internet.reactor at import time; import it "
            "inside the task function instead (workers are forked before any reactor "
            "exists, and each installs its own)"
        )


def main() -> NoReturn:
    """Run the fork server until the supervisor closes its command pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A signal to the whole process group must not take the fork server (and, by
    # the parent-death signal, every worker) down before the workers finish.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server_pid = os.getpid()
    events = EventWriter(1, None)
    commands = bytearray()
    first = _read_line(0, commands)
    if first is None:
        os._exit(0)
    config = orjson.loads(first)
    os.environ.update(config.get("env", {}))
    sys.path[:0] = [p for p in config.get("path", []) if p not in sys.path]
    try:
        _warm_up(config)
    except BaseException:
        events.send(Failed(pid=events.pid, text=traceback.format_exc()))
        os._exit(3)
    gc.collect()
    gc.freeze()  # keep the imported heap out of the collector: pages stay shared
    events.send(Ready(pid=events.pid))

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    children: dict[int, int] = {}
    stdin_open = True
    deadline: float | None = None
    stop_timeout = float(config["stop_timeout"])

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = children.pop(pid, None)
            events.send(Exited(index=index, pid=pid, code=os.waitstatus_to_exitcode(status)))

    def fork(index: int) -> None:
        # The fork server ignores SIGTERM, and a child inherits that until it
        # resets it: a SIGTERM sent in between (a stop right after a fork) would
        # be lost.  Blocked, it stays pending instead, even while ignored, and is
        # delivered when the child unblocks it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        else:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                os.close(wake_r)
                os.close(wake_w)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.close(devnull)
                events_fd = os.dup(1)
                os.dup2(2, 1)  # stray prints go to the raw log, not into the events
                _die_with_parent(signal.SIGKILL)
                if os.getppid() != server_pid:
                    os._exit(1)
                from taskoffload._child import run_worker

                run_worker(config, index, events_fd, LISTEN_FD, LIFELINE_FD)
            except BaseException:
                try:
                    os.write(2, traceback.format_exc().encode("utf-8", "replace"))
                finally:
                    os._exit(1)
        children[pid] = index
        events.send(Forked(index=index, pid=pid))

    while True:
        watched = [wake_r]
        if stdin_open:
            watched.append(0)
        if deadline is None:
            watched.append(LIFELINE_FD)
        try:
            readable, _, _ = select.select(watched, [], [], 0.5)
        except InterruptedError:
            readable = []
        if wake_r in readable:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        reap()
        if 0 in readable:
            chunk = os.read(0, 65536)
            if not chunk:
                stdin_open = False
                if deadline is None:
                    deadline = time.monotonic() + stop_timeout + 2
            else:
                commands.extend(chunk)
                while b"\n" in commands:
                    line, _, rest = bytes(commands).partition(b"\n")
                    commands[:] = rest
                    command = orjson.loads(line)
                    if command.get("cmd") == "fork":
                        fork(int(command["index"]))
        if LIFELINE_FD in readable and not os.read(LIFELINE_FD, 64):
            # The supervisor died: the workers see the same end-of-file and stop
            # gracefully; give them the stop timeout, then make sure.
            deadline = time.monotonic() + stop_timeout + 2
        if deadline is not None:
            if not children:
                os._exit(0)
            if time.monotonic() > deadline:
                for pid in list(children):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.1)
                reap()
                if not children:
                    os._exit(0)


if __name__ == "__main__":
    main()
