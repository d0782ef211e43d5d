"""
Why a worker died, as the supervisor sees it: the cause built from its exit
code, its last reported memory and the kernel's OOM-kill counter
(:func:`death_cause`, :class:`OomCounter`), said for people (:func:`describe`),
and the death journal the workers read it back from (:class:`DeathJournal`,
read by :func:`taskoffload.lost.read_death`).

What Linux lets the supervisor know (docs/reliability.rst, "Why a worker died"):
the exit status or the signal, always; that the OOM killer did it, only as a
SIGKILL while the OOM-kill counter of the supervisor's cgroup (cgroup v2
``memory.events``, which counts its workers too), else of the whole system
(``/proc/vmstat``), rose since the last look.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections import deque
from typing import Any, Final

import orjson
from twisted.logger import Logger

from taskoffload.lost import JOURNAL_ENV, death_file, describe

__all__ = [
    "JOURNAL_ENV",
    "KEEP_DEATHS",
    "DeathJournal",
    "Deaths",
    "OomCounter",
    "death_cause",
    "describe",
]

_log = Logger(namespace="taskoffload.supervisor")

#: Death records the journal keeps: the latest.
KEEP_DEATHS: Final = 256


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def death_cause(code: int | None, rss_mib: float | None, oom: bool = False) -> dict[str, Any]:
    """
    :param code: the exit code as :func:`os.waitstatus_to_exitcode` gives it:
        negative for the signal that killed the process; ``None`` if unknown.
    :param rss_mib: the resident memory the process last reported, if any.
    :param oom: the kernel's OOM killer did it (only with SIGKILL).
    :return: the cause: ``{"exit_status": N}`` or ``{"signal": "SIGKILL"}``,
        with ``"oom": true`` and ``"rss_mib"`` when known.
    """
    cause: dict[str, Any]
    if code is not None and code < 0:
        cause = {"signal": _signal_name(-code)}
        if oom and -code == signal.SIGKILL:
            cause["oom"] = True
    else:
        cause = {"exit_status": code}
    if rss_mib is not None:
        cause["rss_mib"] = round(rss_mib, 1)
    return cause


def _read_counter(path: str, name: str) -> int | None:
    """:return: the value of ``name`` in a ``NAME VALUE`` file, or ``None``."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        return None
    return None


def own_cgroup_events(proc_cgroup: str, cgroup_root: str) -> str | None:
    """
    :return: the ``memory.events`` file of the cgroup v2 that ``proc_cgroup``
        (``/proc/self/cgroup``) names, under ``cgroup_root``, or ``None``.
    """
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    path = line[3:].strip().lstrip("/")
                    return os.path.join(cgroup_root, path, "memory.events")
    except OSError:
        return None
    return None


class OomCounter:
    """
    The kernel's count of OOM kills, looked at after each death: whether it rose.

    :param proc_cgroup: where the process's cgroups are listed.
    :param cgroup_root: where cgroup v2 is mounted.
    :param vmstat: the system-wide counters, read when the cgroup's cannot be.
    """

    def __init__(
        self,
        proc_cgroup: str = "/proc/self/cgroup",
        cgroup_root: str = "/sys/fs/cgroup",
        vmstat: str = "/proc/vmstat",
    ) -> None:
        events = own_cgroup_events(proc_cgroup, cgroup_root)
        self._sources = [(vmstat, "oom_kill")]
        if events is not None and _read_counter(events, "oom_kill") is not None:
            self._sources.insert(0, (events, "oom_kill"))
        self._last = self._read()

    @property
    def source(self) -> str | None:
        """The file read, or ``None`` if neither can be."""
        for path, name in self._sources:
            if _read_counter(path, name) is not None:
                return path
        return None

    def _read(self) -> int | None:
        for path, name in self._sources:
            value = _read_counter(path, name)
            if value is not None:
                return value
        return None

    def rose(self) -> bool:
        """:return: whether the count rose since the last look (or the start)."""
        now = self._read()
        last, self._last = self._last, now
        return now is not None and last is not None and now > last


class DeathJournal:
    """
    A private directory of one small JSON file per unplanned worker exit,
    ``PID.json``, the latest :data:`KEEP_DEATHS` kept.

    :param directory: the directory, made (mode 0700) if not given.
    """

    def __init__(self, directory: str | None = None, keep: int = KEEP_DEATHS) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="taskoffload-deaths-")
        self._keep = keep
        self._written: deque[str] = deque()

    def write(self, pid: int, cause: dict[str, Any]) -> None:
        """Record worker ``pid``'s death, whole or not at all; drop the oldest beyond the bound."""
        path = death_file(self.directory, pid)
        partial = f"{path}.partial"
        try:
            with open(partial, "wb") as f:
                f.write(orjson.dumps(cause))
            os.replace(partial, path)
        except OSError:
            return
        self._written.append(path)
        while len(self._written) > self._keep:
            try:
                os.unlink(self._written.popleft())
            except OSError:
                pass

    def remove(self) -> None:
        """Remove the directory and every record in it."""
        shutil.rmtree(self.directory, ignore_errors=True)


class Deaths:
    """
    What a pool keeps of its workers' deaths: the journal (made at the pool's
    start, removed at its stop) and the OOM-kill counter looked at each death.

    :param oom: makes the counter (its files injectable, for tests).
    """

    def __init__(self, oom: Any = OomCounter) -> None:
        self._make_oom = oom
        self.journal: DeathJournal | None = None
        self._oom: OomCounter | None = None

    def start(self) -> str:
        """Make the journal and take the first look at the counter; :return: its directory."""
        if self.journal is None:
            self.journal = DeathJournal()
        self._oom = self._make_oom()
        return self.journal.directory

    def died(self, index: int, pid: int, code: int | None, rss_mib: float | None) -> dict[str, Any]:
        """
        Worker ``pid`` of slot ``index`` exited unplanned with ``code``: log why
        and record it.

        :param rss_mib: the resident memory it last reported.
        :return: the cause.
        """
        # Looked at every death; death_cause takes it only with SIGKILL.
        oom = self._oom is not None and self._oom.rose()
        cause = death_cause(code, rss_mib, oom)
        _log.warn(
            "Worker {index} (pid {pid}) died: {cause}",
            index=index,
            pid=pid,
            cause=describe(cause),
            death=cause,
        )
        if self.journal is not None:
            self.journal.write(pid, cause)
        return cause

    def stop(self) -> None:
        """Remove the journal."""
        if self.journal is not None:
            self.journal.remove()
            self.journal = None
