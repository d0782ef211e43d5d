"""
The counters of several gateway processes serving one port
(``--gateway-processes N``), kept so that ``/status`` and ``/metrics`` say the
same whichever process a request lands on, and a counter never jumps back.

Each process counts in prometheus_client's multiprocess mode: its values live in
files of one directory (``PROMETHEUS_MULTIPROC_DIR``, made and removed by the
parent), and every process reads them all when asked (``MultiProcessCollector``).
A process that dies leaves its counts behind, so totals never fall.  The pool's
state, in role all, is the parent's: it writes it to a file there
(:func:`write_pool_status`), which each process reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from taskoffload.stats import (
    DETACHED,
    EXPIRED,
    LATENCY_BUCKETS,
    NO_DETACHED,
    NO_POISON,
    PENDING_HELP,
    POISON_KILLS,
    POISONED,
    QUARANTINED,
    RESUMED,
    TASK_SECONDS,
    GatewayStats,
    LaneCollector,
    ReplyCounter,
    pool_families,
)

__all__ = [
    "MULTIPROCESS_DIRECTORY",
    "POOL_STATUS_FILE",
    "SharedGatewayMetrics",
    "read_pool_status",
    "shared_gateway_status",
    "write_pool_status",
]

#: The environment variable that puts prometheus_client in multiprocess mode.
MULTIPROCESS_DIRECTORY: Final = "PROMETHEUS_MULTIPROC_DIR"

#: The file, in that directory, holding the pool's state (role all).
POOL_STATUS_FILE: Final = "pool-status.json"


def write_pool_status(directory: str, status: dict[str, Any]) -> None:
    """Replace the pool's state in ``directory`` with ``status``, whole or not at all."""
    path = os.path.join(directory, POOL_STATUS_FILE)
    partial = f"{path}.{os.getpid()}"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(status, f)
    os.replace(partial, path)


def read_pool_status(directory: str) -> dict[str, Any] | None:
    """:return: the pool's state the parent last wrote, or ``None`` if none yet."""
    try:
        with open(os.path.join(directory, POOL_STATUS_FILE), encoding="utf-8") as f:
            status: dict[str, Any] = json.load(f)
            return status
    except (OSError, ValueError):
        return None


class _PoolGauges(Collector):
    """The pool's figures (role all), read from its state, as GatewayMetrics has them."""

    def __init__(self, status_source: Callable[[], dict[str, Any]]) -> None:
        self._source = status_source

    def collect(self) -> Iterable[Metric]:
        # One process, the parent, counts the restarts: the counter never falls.
        return pool_families(self._source().get("pool") or {})


class SharedGatewayMetrics(ReplyCounter):
    """
    The gateway's metrics in multiprocess mode: what :class:`GatewayMetrics
    <taskoffload.stats.GatewayMetrics>` counts, summed over every process.

    :param status_source: returns this process's ``/status`` document (its
        ``pool`` and lanes are read for the gauges).
    """

    def __init__(self, status_source: Callable[[], dict[str, Any]]) -> None:
        # In multiprocess mode a metric's values go to this process's files, not
        # to a registry: none is given.
        self.requests = Counter(
            "taskoffload_requests",
            "Final replies sent, by task function and outcome (ok or an error code).",
            ["function", "outcome"],
            registry=None,
        )
        self._requests_by_key: dict[tuple[str, str], Any] = {}
        self.latency = Histogram(
            "taskoffload_request_seconds",
            "Seconds from a request reaching the gateway to its final reply.",
            registry=None,
            buckets=LATENCY_BUCKETS,
        )
        self.tasks = Histogram(*TASK_SECONDS, ["function"], registry=None, buckets=LATENCY_BUCKETS)
        self._tasks_by_function: dict[str, Any] = {}
        self.clients = Gauge(
            "taskoffload_clients",
            "WebSocket clients connected.",
            registry=None,
            multiprocess_mode="livesum",
        )
        self.inflight = Gauge(
            "taskoffload_inflight",
            "Requests (batch items included) awaiting their reply.",
            registry=None,
            multiprocess_mode="livesum",
        )
        self.pending = Gauge(
            "taskoffload_pending", PENDING_HELP, registry=None, multiprocess_mode="livesum"
        )
        self.detached = Gauge(*DETACHED, registry=None, multiprocess_mode="livesum")
        self.resumed = Counter(*RESUMED, registry=None)
        self.expired = Counter(*EXPIRED, registry=None)
        self._detached_counted = (0, 0)
        self.quarantined = Gauge(*QUARANTINED, registry=None, multiprocess_mode="livesum")
        self.poisoned = Counter(*POISONED, registry=None)
        self.poison_kills = Counter(*POISON_KILLS, registry=None)
        self._poison_counted = (0, 0)
        #: Every process's counts, alone: what ``/status`` sums.
        self.counts = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.counts)
        #: What ``/metrics`` serves: those counts, and the pool's and lanes' gauges.
        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry)
        self.registry.register(_PoolGauges(status_source))
        self.registry.register(LaneCollector(status_source))

    def sample(self, stats: GatewayStats) -> None:
        """
        Write this process's gauges (clients, requests in flight, calls waiting
        for their share) to its files.
        """
        self.clients.set(stats.clients)
        self.inflight.set(stats.inflight)
        self.pending.set(stats.waiting())
        if stats.detached is not None:
            figures = stats.detached
            self.detached.set(figures.held)
            resumed, expired = self._detached_counted
            self.resumed.inc(figures.resumed - resumed)
            self.expired.inc(figures.expired - expired)
            self._detached_counted = (figures.resumed, figures.expired)
        if stats.poison is not None:
            poison = stats.poison
            self.quarantined.set(poison.quarantined())
            refused, killed = self._poison_counted
            self.poisoned.inc(poison.refused - refused)
            self.poison_kills.inc(poison.killed - killed)
            self._poison_counted = (poison.refused, poison.killed)


def shared_gateway_status(registry: CollectorRegistry) -> dict[str, Any]:
    """
    :return: the ``gateway`` part of ``/status``, summed over every process
        from their files: ``clients``, ``inflight``, ``requests``,
        ``by_function``, ``by_outcome``, and ``latency`` percentiles in ms,
        each the upper bound of the histogram bucket it falls in (so
        ``latency_from`` says ``"histogram"``).
    """
    figures: dict[str, Any] = {
        "clients": 0,
        "inflight": 0,
        "requests": 0,
        "by_function": {},
        "by_outcome": {},
        "latency_from": "histogram",
        "detached": dict(NO_DETACHED),
        "poison": dict(NO_POISON),
    }
    poison = {"taskoffload_poison_quarantined": "quarantined"}
    poison.update(taskoffload_poisoned_total="refused", taskoffload_poison_kills_total="kills")
    detached = {"taskoffload_detached": "held", "taskoffload_resumed_total": "resumed"}
    detached["taskoffload_detached_expired_total"] = "expired"
    buckets: list[tuple[float, float]] = []
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "taskoffload_requests_total":
                count = int(sample.value)
                function, outcome = sample.labels["function"], sample.labels["outcome"]
                figures["requests"] += count
                by_function, by_outcome = figures["by_function"], figures["by_outcome"]
                by_function[function] = by_function.get(function, 0) + count
                by_outcome[outcome] = by_outcome.get(outcome, 0) + count
            elif sample.name in ("taskoffload_clients", "taskoffload_inflight"):
                figures[sample.name.removeprefix("taskoffload_")] = int(sample.value)
            elif sample.name in detached:
                figures["detached"][detached[sample.name]] = int(sample.value)
            elif sample.name in poison:
                figures["poison"][poison[sample.name]] = int(sample.value)
            elif sample.name == "taskoffload_request_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
    figures["latency"] = _bucket_percentiles(sorted(buckets))
    return figures


def _bucket_percentiles(buckets: list[tuple[float, float]]) -> dict[str, float | None]:
    """p50, p90, p99 and max in ms from cumulative ``(upper bound, count)`` buckets."""
    total = buckets[-1][1] if buckets else 0
    result: dict[str, float | None] = {"p50": None, "p90": None, "p99": None, "max": None}
    if not total:
        return result
    for name, share in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        for bound, count in buckets:
            if count >= share * total:
                result[name] = bound * 1000 if bound != float("inf") else None
                break
    return result
