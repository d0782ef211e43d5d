"""
Process trees: the ``twistd -n taskoffload`` trees the harness and the
integration tests start, what ``/proc`` says about them, and the command lines
of the harness's own client processes.

Each tree runs in a session (process group) of its own, so that it can be ended
as a whole, and in a directory of its own, not the checkout: ``twistd`` must use
the installed ``taskoffload``, never the checkout's copy.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = [
    "CHECKOUT",
    "TwistdTree",
    "children",
    "free_port",
    "free_ports",
    "group_pids",
    "harness_command",
    "memory_kib",
    "read_text",
    "twistd_command",
]

#: The checkout the harness runs from: the directory that holds ``harness/``.
CHECKOUT = Path(__file__).resolve().parent.parent

_Tree = TypeVar("_Tree", bound="TwistdTree")


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def twistd_command(*args: str) -> list[str]:
    """The command line running ``twistd -n taskoffload ARGS`` with this interpreter."""
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        return [str(twistd), "-n", "--pidfile=", "taskoffload", *args]
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "taskoffload",
        *args,
    ]


def harness_command(module: str, *args: str) -> list[str]:
    """
    The command line of a client process of the harness: ``python -m MODULE ARGS``
    with this interpreter.  Run it with ``cwd=CHECKOUT`` (:data:`CHECKOUT`), where
    ``python -m`` finds ``harness``.
    """
    return [sys.executable, "-m", module, *args]


def read_text(path: str) -> str | None:
    """A file's text, or ``None`` if it cannot be read (a process that is gone)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), or ``None`` if it is gone."""
    stat = read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat[stat.rindex(")") + 2]


def children(pid: int) -> list[int]:
    """The live (not zombie) children of ``pid``."""
    text = read_text(f"/proc/{pid}/task/{pid}/children")
    if text is None:
        return []
    return [c for c in map(int, text.split()) if _state(c) not in (None, "Z")]


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == pgid and _state(int(entry)) not in (None, "Z"):
                found.append(int(entry))
        except ProcessLookupError:
            continue
    return found


def memory_kib(pids: Iterable[int]) -> tuple[int, int]:
    """Total (RSS, PSS) of the processes ``pids`` in KiB, from ``/proc/PID/smaps_rollup``."""
    rss = pss = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss, pss


class TwistdTree:
    """
    One ``twistd -n taskoffload`` process tree, in a session (process group) of
    its own, run in ``directory`` and logging to a file there.  Nothing starts
    until :meth:`start`.

    :param args: the arguments after ``taskoffload``.
    :param directory: its working directory, where its log goes.
    :param env: its environment; by default this process's.
    :param name: the log file's name, without ``.log``; by default a unique one.
    """

    def __init__(
        self,
        args: Sequence[str],
        directory: str | Path,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.args = list(args)
        self.directory = Path(directory)
        self.env = env
        name = name or f"twistd-{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = self.directory / f"{name}.log"
        #: When :meth:`start` launched ``twistd`` (monotonic clock).
        self.started = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self: _Tree) -> _Tree:
        """Launch ``twistd``; :return: this tree."""
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                twistd_command(*self.args),
                cwd=self.directory,  # not the checkout: the installed package must be found
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The ``twistd`` process. :raises RuntimeError: before :meth:`start`."""
        if self._process is None:
            raise RuntimeError("the tree was not started")
        return self._process

    @property
    def pid(self) -> int:
        """The ``twistd`` process id, which is also the tree's process group id."""
        return self.process.pid

    def log(self) -> str:
        """Everything the tree logged so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """The ``twistd`` process still runs."""
        return self.process.poll() is None

    def wait_for_match(self, pattern: str, timeout: float) -> re.Match[str]:
        """
        :return: the first match of the regular expression ``pattern`` in the log.
        :raises RuntimeError: if ``twistd`` exits or ``timeout`` s pass first.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log())
            if found:
                return found
            if not self.alive():
                raise RuntimeError(f"twistd exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} in {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.01)

    def wait_for_log(self, text: str, timeout: float) -> re.Match[str]:
        """
        Wait until ``text`` is in the log.

        :raises RuntimeError: if ``twistd`` exits or ``timeout`` s pass first.
        """
        return self.wait_for_match(re.escape(text), timeout)

    def pids(self) -> list[int]:
        """The live processes of the tree's process group."""
        return group_pids(self.pid)

    def worker_pids(self) -> set[int]:
        """The live worker processes (the fork servers' children)."""
        return {pid for server in children(self.pid) for pid in children(server)}

    def memory_kib(self) -> tuple[int, int]:
        """Total (RSS, PSS) of the tree in KiB."""
        return memory_kib(self.pids())

    def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM to ``twistd`` alone (it stops its workers), then SIGKILL to whatever
        of the process group is left after ``timeout`` s; wait, bounded, until the
        group is gone.  Nothing if the tree was never started.

        (Not SIGTERM to the whole group: workers that exit before their supervisor
        has taken its own SIGTERM are restarted, and a restarted one can miss the
        supervisor's SIGTERM and hold the stop for ``--stop-timeout``.)
        """
        if self._process is None:
            return
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            elif not self.alive():
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.05)
