"""
What the harness measures with: CPU shares from ``/proc``, latency quantiles, the
closed-loop call window, and the summary of repeated runs.

CPU shares are percent of one core over the measured window (200 % is both cores
of a 2-core machine).
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from harness.processes import group_pids

__all__ = [
    "ClosedLoop",
    "CpuMeter",
    "group_cpu_seconds",
    "latency_figures",
    "machine_cpu_seconds",
    "milliseconds",
    "nearest_rank",
    "own_cpu_seconds",
    "percentile",
    "process_cpu_seconds",
    "summarize",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process so far (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the parenthesized command name; utime and stime are 14 and 15.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def group_cpu_seconds(pgid: int) -> dict[int, float]:
    """CPU seconds so far of every process in group ``pgid``, by pid."""
    return {pid: process_cpu_seconds(pid) for pid in group_pids(pgid)}


def machine_cpu_seconds() -> float:
    """CPU seconds all cores of the machine have spent busy (not idle or waiting) so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    # guest and guest_nice (9, 10) are already counted in user and nice.
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds this process (every thread of it) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """
    CPU shares over a window: this process, and, when given, a service's ``twistd``
    process and the rest of its group.
    """

    def __init__(self, service_pid: int | None, others: dict[str, int] | None = None) -> None:
        """
        :param service_pid: a started service's ``twistd`` pid (its process group).
        :param others: more processes to report, by the name their figure takes.
        """
        self._service_pid = service_pid
        self._others = others or {}
        self._start: tuple[float, float, float, dict[int, float]] | None = None

    def _snapshot(self) -> tuple[float, float, float, dict[int, float]]:
        group = group_cpu_seconds(self._service_pid) if self._service_pid else {}
        for pid in self._others.values():
            group[pid] = process_cpu_seconds(pid)
        return time.monotonic(), machine_cpu_seconds(), own_cpu_seconds(), group

    def start(self) -> None:
        """Open the window: take the CPU seconds so far."""
        self._start = self._snapshot()

    def stop(self, prefix: str = "", gateway: bool = True) -> dict[str, float]:
        """
        :param gateway: the ``twistd`` process runs the gateway (else it is a
            pool's supervisor, counted with its workers as ``pool``).
        :return: the shares in percent of one core since :meth:`start`.
        """
        assert self._start is not None
        t0, machine0, own0, group0 = self._start
        t1, machine1, own1, group1 = self._snapshot()
        wall = max(t1 - t0, 1e-9)
        figures = {
            f"{prefix}machine_cpu_pct": 100 * (machine1 - machine0) / wall,
            f"{prefix}loadgen_cpu_pct": 100 * (own1 - own0) / wall,
        }
        # Processes that started in the window count from zero.
        used = {pid: cpu - group0.get(pid, 0.0) for pid, cpu in group1.items()}
        for name, pid in self._others.items():
            figures[f"{prefix}{name}_cpu_pct"] = 100 * used.pop(pid, 0.0) / wall
        if self._service_pid:
            top = used.pop(self._service_pid, 0.0)
            rest = sum(used.values())
            if gateway:
                figures[f"{prefix}gateway_cpu_pct"] = 100 * top / wall
                figures[f"{prefix}workers_cpu_pct"] = 100 * rest / wall
            else:
                figures[f"{prefix}pool_cpu_pct"] = 100 * (top + rest) / wall
        return figures


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of sorted values (NaN for none)."""
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` in any order, nearest rank (as the benchmarks count)."""
    return percentile(sorted(values), q)


def milliseconds(seconds: float | None) -> float | None:
    """``seconds`` in milliseconds, rounded to the microsecond (``None`` stays ``None``)."""
    return None if seconds is None else round(seconds * 1000, 3)


def latency_figures(latencies: list[float], prefix: str = "") -> dict[str, float]:
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    ordered = sorted(latencies)
    return {
        f"{prefix}p50_ms": 1000 * percentile(ordered, 0.50),
        f"{prefix}p99_ms": 1000 * percentile(ordered, 0.99),
        f"{prefix}max_ms": 1000 * ordered[-1] if ordered else math.nan,
    }


class ClosedLoop:
    """
    Clients each with one call in flight, measured over a window that starts after
    a warm-up and ends after ``duration`` seconds or ``max_calls`` calls.
    """

    def __init__(self, duration: float, max_calls: int) -> None:
        self.duration = duration
        self.max_calls = max_calls
        self.measuring = False
        self.stopped = False
        self.latencies: list[float] = []
        self.errors = 0
        self.window = (0.0, 0.0)

    def record(self, sent: float, ok: bool) -> None:
        """Count one call that was answered now."""
        if self.measuring:
            self.latencies.append(time.perf_counter() - sent)
            if not ok:
                self.errors += 1
            if len(self.latencies) >= self.max_calls:
                self.stopped = True

    def figures(self, prefix: str) -> dict[str, float]:
        """Calls per second, calls, errors, p50 and p99 over the window, names prefixed."""
        elapsed = self.window[1] - self.window[0]
        figures = {
            f"{prefix}tasks_per_s": len(self.latencies) / elapsed if elapsed > 0 else 0.0,
            f"{prefix}calls": float(len(self.latencies)),
            f"{prefix}errors": float(self.errors),
        }
        latency = latency_figures(self.latencies, prefix)
        del latency[f"{prefix}max_ms"]
        figures.update(latency)
        return figures


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every figure over the runs."""
    summary = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        summary[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return summary
