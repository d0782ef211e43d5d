"""
Unit tests for :mod:`taskoffload.deaths` and the supervisor's use of it: the
cause of a worker's death (exit status, signal, the OOM killer from fake
``memory.events`` and ``vmstat`` files), the journal, and which exits are deaths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.logger import capturedLogs, formatEvent

from taskoffload.deaths import JOURNAL_ENV, DeathJournal, Deaths, OomCounter, death_cause
from taskoffload.lost import describe, read_death
from taskoffload.supervisor import PoolConfig, WorkerPoolService
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl
from tests.socket_reactor import SocketReactor
from tests.test_outbox import start, stop
from tests.test_supervisor import Pool


def test_cause_of_an_exit_status() -> None:
    """A worker that exited names its exit status, and its last RSS."""
    assert death_cause(3, 41.25) == {"exit_status": 3, "rss_mib": 41.2}
    assert death_cause(0, None) == {"exit_status": 0}
    assert describe(death_cause(3, 41.25)) == "exit status 3, last RSS 41.2 MiB"


def test_cause_of_a_signal() -> None:
    """A worker killed by a signal names it; oom only with SIGKILL."""
    assert death_cause(-9, 10.0) == {"signal": "SIGKILL", "rss_mib": 10.0}
    assert death_cause(-9, None, oom=True) == {"signal": "SIGKILL", "oom": True}
    assert death_cause(-15, None, oom=True) == {"signal": "SIGTERM"}
    assert death_cause(-200, None) == {"signal": "signal 200"}
    assert describe({"signal": "SIGKILL", "oom": True, "rss_mib": 5.0}) == (
        "killed by SIGKILL (the OOM killer), last RSS 5.0 MiB"
    )


class Kernel:
    """Fake ``/proc/self/cgroup``, cgroup v2 tree and ``/proc/vmstat``."""

    def __init__(self, root: Path, cgroup: bool = True) -> None:
        self.proc_cgroup = root / "cgroup"
        self.cgroup_root = root / "sys"
        self.vmstat = root / "vmstat"
        self.events = self.cgroup_root / "app.slice" / "memory.events"
        self.proc_cgroup.write_text("0::/app.slice\n")
        self.set_vmstat(5)
        if cgroup:
            self.events.parent.mkdir(parents=True)
            self.set_cgroup(0)

    def set_cgroup(self, kills: int) -> None:
        self.events.write_text(f"low 0\nhigh 0\nmax 2\noom 1\noom_kill {kills}\n")

    def set_vmstat(self, kills: int) -> None:
        self.vmstat.write_text(f"nr_free_pages 100\noom_kill {kills}\npgfault 9\n")

    def counter(self) -> OomCounter:
        return OomCounter(str(self.proc_cgroup), str(self.cgroup_root), str(self.vmstat))


def test_oom_from_the_cgroup(tmp_path: Path) -> None:
    """The cgroup's oom_kill rising since the last look is an OOM kill; not rising, none."""
    kernel = Kernel(tmp_path)
    counter = kernel.counter()
    assert counter.source == str(kernel.events)
    assert not counter.rose()
    kernel.set_cgroup(1)
    kernel.set_vmstat(50)
    assert counter.rose()
    assert not counter.rose()  # looked at since
    kernel.set_vmstat(60)  # another cgroup's kill
    assert not counter.rose()


def test_oom_from_vmstat_without_a_cgroup(tmp_path: Path) -> None:
    """Without cgroup v2's memory.events, the system-wide counter is read."""
    kernel = Kernel(tmp_path, cgroup=False)
    counter = kernel.counter()
    assert counter.source == str(kernel.vmstat)
    assert not counter.rose()
    kernel.set_vmstat(6)
    assert counter.rose()


def test_no_counter_no_oom(tmp_path: Path) -> None:
    """With neither file readable, no death is an OOM kill."""
    counter = OomCounter(str(tmp_path / "no"), str(tmp_path), str(tmp_path / "none"))
    assert counter.source is None
    assert not counter.rose()


def test_journal_writes_and_bounds(tmp_path: Path) -> None:
    """One file per death, read back by pid; only the latest ``keep`` stay."""
    journal = DeathJournal(str(tmp_path), keep=2)
    for pid in (11, 12, 13):
        journal.write(pid, {"exit_status": pid})
    assert read_death(str(tmp_path), 11) is None
    assert read_death(str(tmp_path), 12) == {"exit_status": 12}
    assert read_death(str(tmp_path), 13) == {"exit_status": 13}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["12.json", "13.json"]
    journal.remove()
    assert not tmp_path.exists()


def test_journal_is_private() -> None:
    """A journal made for a pool is a directory only its user may read."""
    journal = DeathJournal()
    try:
        assert Path(journal.directory).stat().st_mode & 0o777 == 0o700
    finally:
        journal.remove()


def test_read_death_of_a_garbled_record(tmp_path: Path) -> None:
    """A file that is not a JSON object is no record."""
    (tmp_path / "7.json").write_bytes(b"[1]")
    (tmp_path / "8.json").write_bytes(b"{no")
    assert read_death(str(tmp_path), 7) is None
    assert read_death(str(tmp_path), 8) is None
    assert read_death(None, 7) is None


def pool_with_journal(tmp_path: Path, kernel: Kernel) -> Pool:
    pool = Pool(count=1)
    deaths = Deaths(oom=kernel.counter)
    deaths.journal = DeathJournal(str(tmp_path / "journal"))
    (tmp_path / "journal").mkdir()
    deaths.start()
    pool.service.deaths = deaths
    return pool


def record(tmp_path: Path, pid: int) -> dict[str, Any] | None:
    return read_death(str(tmp_path / "journal"), pid)


def test_supervisor_records_and_logs_a_death(tmp_path: Path) -> None:
    """A worker's exit is logged and journaled with its cause and its last RSS."""
    pool = pool_with_journal(tmp_path, Kernel(tmp_path))
    pool.start_worker(0, 100)
    pool.event("stats", index=0, pid=100, tasks_done=1, rss_mib=41.25, busy=1)
    with capturedLogs() as events:
        pool.event("exited", index=0, pid=100, code=3)
    assert record(tmp_path, 100) == {"exit_status": 3, "rss_mib": 41.2}
    assert "Worker 0 (pid 100) died: exit status 3, last RSS 41.2 MiB" in [
        formatEvent(e) for e in events
    ]


def test_supervisor_names_the_oom_killer(tmp_path: Path) -> None:
    """A SIGKILL while the cgroup's OOM kills rose is the OOM killer's; the next is not."""
    kernel = Kernel(tmp_path)
    pool = pool_with_journal(tmp_path, kernel)
    pool.start_worker(0, 100)
    kernel.set_cgroup(1)
    with capturedLogs() as events:
        pool.event("exited", index=0, pid=100, code=-9)
    assert record(tmp_path, 100) == {"signal": "SIGKILL", "oom": True}
    assert any("killed by SIGKILL (the OOM killer)" in formatEvent(e) for e in events)
    pool.start_worker(0, 101)
    pool.event("exited", index=0, pid=101, code=-9)
    assert record(tmp_path, 101) == {"signal": "SIGKILL"}


def test_planned_exits_are_no_deaths(tmp_path: Path) -> None:
    """A worker that recycles itself, or exits at the pool's stop, leaves no record."""
    pool = pool_with_journal(tmp_path, Kernel(tmp_path))
    pool.start_worker(0, 100)
    pool.event("recycling", index=0, pid=100, reason="ran 3 tasks")
    pool.event("exited", index=0, pid=100, code=0)
    assert record(tmp_path, 100) is None
    pool.start_worker(0, 101)
    pool.service._stopping = True
    pool.event("exited", index=0, pid=101, code=0)
    assert record(tmp_path, 101) is None


def test_the_workers_learn_the_journal() -> None:
    """The pool's start makes the journal and names it in the fork server's line; its stop removes it."""
    reactor, processes = SocketReactor(), FakeProcessControl()
    pool = WorkerPoolService(
        PoolConfig(listen="tcp:0:interface=127.0.0.1", count=1),
        reactor=reactor,
        processes=processes,
    )
    sent = start(pool, processes)
    directory = sent.env[JOURNAL_ENV]
    assert pool.deaths.journal is not None
    assert directory == pool.deaths.journal.directory
    assert Path(directory).is_dir()
    stop(pool, reactor)
    assert not Path(directory).exists()


testSuite = pytest_module(__file__)
