"""
What the gateway counts: :class:`GatewayStats`, read by ``/status``, and
:class:`GatewayMetrics`, the Prometheus metrics served at ``/metrics``.

``/status`` reports latency percentiles computed here (:func:`latency_percentiles`);
``/metrics`` reports a histogram, from which Prometheus computes its own.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PrometheusCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from taskoffload import wire
from taskoffload.fairshare import FairShare, LaneShares

if TYPE_CHECKING:
    from taskoffload.detach import DetachedCalls
    from taskoffload.poison import PoisonTable

__all__ = [
    "LATENCY_WINDOW",
    "MAX_FUNCTION_NAMES",
    "OTHER_FUNCTIONS",
    "UNKNOWN_FUNCTIONS",
    "GatewayMetrics",
    "GatewayStats",
    "latency_percentiles",
    "pool_families",
]

#: Latencies kept for the percentiles in ``/status``.
LATENCY_WINDOW = 10_000

#: Distinct function names counted in ``/status`` and ``/metrics``; calls to
#: others are counted as ``OTHER_FUNCTIONS``.  Names come from clients, so
#: without a bound a client could grow the counters without end.
MAX_FUNCTION_NAMES = 1000
#: How calls to names the pool does not know are counted.
UNKNOWN_FUNCTIONS = "(unknown)"
#: How calls beyond :data:`MAX_FUNCTION_NAMES` are counted.
OTHER_FUNCTIONS = "(other)"


def latency_percentiles(latencies: Iterable[float]) -> dict[str, float | None]:
    """
    :param latencies: seconds, in any order.
    :return: ``p50_ms``, ``p90_ms``, ``p99_ms`` and ``max_ms``: milliseconds,
        rounded to the microsecond, or all ``None`` when there are none.  The
        ``q`` percentile of ``n`` sorted values is the one at index ``int(q * n)``
        (the last one at most).
    """
    ordered = sorted(latencies)
    if not ordered:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


class GatewayStats:
    """
    What ``/status`` and ``/metrics`` report: clients, requests in flight, totals
    by function and by outcome, and recent latencies.

    :param on_finished: also called with (function, outcome, seconds) for each
        final reply, e.g. to feed Prometheus metrics.
    """

    def __init__(self, on_finished: Callable[[str, str, float], None] | None = None) -> None:
        self.clients = 0
        self.inflight = 0
        self.requests = 0
        self.by_function: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        #: Where the gateway's calls wait for their share of the pool: set by
        #: each session (:class:`~taskoffload.session.GatewaySession`), read by
        #: :meth:`waiting`.
        self.shares: FairShare | LaneShares | None = None
        #: The gateway's detachable calls (set by its factory), for ``detached``.
        self.detached: DetachedCalls | None = None
        #: The gateway's poison table (set by its service), for ``poison``.
        self.poison: PoisonTable | None = None
        self._on_finished = on_finished

    def started(self, count: int = 1) -> None:
        """Count ``count`` requests (batch items included) now in flight."""
        self.inflight += count

    def _name(self, function: str, outcome: str) -> str:
        # The name a call is counted under: see MAX_FUNCTION_NAMES.
        if outcome == wire.UNKNOWN_FUNCTION:
            return UNKNOWN_FUNCTIONS
        if function in self.by_function or len(self.by_function) < MAX_FUNCTION_NAMES:
            return function
        return OTHER_FUNCTIONS

    def finished(self, function: str, outcome: str, seconds: float) -> None:
        """Count one final reply; ``outcome`` is ``ok`` or an error code."""
        function = self._name(function, outcome)
        self.inflight -= 1
        self.requests += 1
        self.by_function[function] += 1
        self.by_outcome[outcome] += 1
        self.latencies.append(seconds)
        if self._on_finished is not None:
            self._on_finished(function, outcome, seconds)

    def rejected(self, function: str, outcome: str) -> None:
        """Count a request answered without reaching the pool."""
        function = self._name(function, outcome)
        self.requests += 1
        self.by_function[function] += 1
        self.by_outcome[outcome] += 1
        if self._on_finished is not None:
            self._on_finished(function, outcome, 0.0)

    def waiting(self) -> int:
        """
        :return: the calls waiting in the gateway for their share of the pool,
            over every lane (the sum of ``/status``'s ``gateway.lanes[*].waiting``);
            0 before the first client.
        """
        shares = self.shares
        if shares is None:
            return 0
        lanes = shares.lanes.values() if isinstance(shares, LaneShares) else [shares]
        return sum(line.waiting for share in lanes for line in share.active)

    def percentiles(self) -> dict[str, float | None]:
        """p50, p90, p99 and max of the recent latencies, in milliseconds."""
        return latency_percentiles(self.latencies)

    def to_json(self) -> dict[str, Any]:
        """The ``gateway`` part of the ``/status`` document."""
        return {
            "clients": self.clients,
            "inflight": self.inflight,
            "requests": self.requests,
            "by_function": dict(self.by_function),
            "by_outcome": dict(self.by_outcome),
            "latency": self.percentiles(),
            "detached": (
                self.detached.status() if self.detached is not None else dict(NO_DETACHED)
            ),
            "poison": (self.poison.status() if self.poison is not None else dict(NO_POISON)),
        }


#: The buckets of ``taskoffload_request_seconds``, in seconds.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # fmt: skip


#: The outcomes of requests refused before any task was tried: they are not
#: in ``taskoffload_task_seconds``.
REFUSED: Final = frozenset({wire.OVERLOADED, wire.BAD_REQUEST})

#: What ``taskoffload_task_seconds`` measures (made alike in both kinds of metrics).
TASK_SECONDS: Final = (
    "taskoffload_task_seconds",
    "Seconds from a call reaching the gateway to its final reply, by task function "
    "(calls refused as overloaded or bad_request are left out).",
)


class ReplyCounter:
    """
    Counts each final reply in ``requests`` (by function and outcome), its
    latency in ``latency`` and, for a call that was tried, in ``tasks`` by
    function: what the gateway's metrics, one process's or shared, record alike.
    """

    requests: Any
    latency: Any
    tasks: Any
    _requests_by_key: dict[tuple[str, str], Any]
    _tasks_by_function: dict[str, Any]

    def finished(self, function: str, outcome: str, seconds: float) -> None:
        """Record one final reply (see :class:`GatewayStats`)."""
        # labels() takes a lock and validates its arguments on every call; the
        # names are bounded (GatewayStats), so their children can be kept.
        key = (function, outcome)
        counter = self._requests_by_key.get(key)
        if counter is None:
            counter = self._requests_by_key[key] = self.requests.labels(function, outcome)
        counter.inc()
        if outcome != "overloaded":
            self.latency.observe(seconds)
        if outcome not in REFUSED:
            timer = self._tasks_by_function.get(function)
            if timer is None:
                timer = self._tasks_by_function[function] = self.tasks.labels(function)
            timer.observe(seconds)


class GatewayMetrics(ReplyCounter):
    """
    Prometheus metrics of one gateway, in a registry of their own.

    :param stats_source: returns the ``/status`` document, read for the gauges.
    """

    def __init__(self, stats_source: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = PrometheusCounter(
            "taskoffload_requests",
            "Final replies sent, by task function and outcome (ok or an error code).",
            ["function", "outcome"],
            registry=self.registry,
        )
        self._requests_by_key: dict[tuple[str, str], Any] = {}
        self.latency = Histogram(
            "taskoffload_request_seconds",
            "Seconds from a request reaching the gateway to its final reply.",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.tasks = Histogram(
            *TASK_SECONDS, ["function"], registry=self.registry, buckets=LATENCY_BUCKETS
        )
        self._tasks_by_function: dict[str, Any] = {}
        self.registry.register(StatusCollector(stats_source))
        self.registry.register(LaneCollector(stats_source))


#: The help of ``taskoffload_pending`` (made alike in both kinds of metrics).
PENDING_HELP: Final = "Calls waiting in the gateway for their share of the pool, over every lane."


class StatusCollector(Collector):
    """
    The gauges of one gateway process, from one read of the ``/status``
    document per scrape: clients, requests in flight, calls waiting (the sum of
    ``gateway.lanes[*].waiting``) and the pool's figures (:func:`pool_families`).

    :param stats_source: returns the ``/status`` document.
    """

    def __init__(self, stats_source: Callable[[], dict[str, Any]]) -> None:
        self._source = stats_source

    def collect(self) -> Iterable[Metric]:
        document = self._source()
        gateway = document.get("gateway") or {}
        yield GaugeMetricFamily(
            "taskoffload_clients", "WebSocket clients connected.", value=gateway.get("clients", 0)
        )
        yield GaugeMetricFamily(
            "taskoffload_inflight",
            "Requests (batch items included) awaiting their reply.",
            value=gateway.get("inflight", 0),
        )
        lanes = (gateway.get("lanes") or {}).values()
        yield GaugeMetricFamily(
            "taskoffload_pending", PENDING_HELP, value=sum(lane.get("waiting", 0) for lane in lanes)
        )
        yield from detached_families(gateway.get("detached") or {})
        yield from poison_families(gateway.get("poison") or {})
        yield from pool_families(document.get("pool") or {})


#: ``gateway.detached`` and ``gateway.poison`` of ``/status`` before anything was counted.
NO_DETACHED: Final = {"held": 0, "resumed": 0, "expired": 0}
NO_POISON: Final = {"quarantined": 0, "refused": 0, "kills": 0}

#: The detached calls' metrics: name, help (made alike in both kinds of metrics).
DETACHED: Final = ("taskoffload_detached", "Detached calls no connection holds, kept for a resume.")
RESUMED: Final = ("taskoffload_resumed", "Resumes that found their detached call.")
EXPIRED: Final = ("taskoffload_detached_expired", "Detached calls forgotten unresumed.")


def detached_families(detached: Mapping[str, Any]) -> Iterator[Metric]:
    """The detached calls' gauge and counters, from ``/status``'s ``gateway.detached``."""
    yield GaugeMetricFamily(*DETACHED, value=detached.get("held", 0))
    yield CounterMetricFamily(*RESUMED, value=detached.get("resumed", 0))
    yield CounterMetricFamily(*EXPIRED, value=detached.get("expired", 0))


#: The poison quarantine's metrics: name, help (made alike in both kinds of metrics).
QUARANTINED: Final = (
    "taskoffload_poison_quarantined",
    "Calls (function and arguments) quarantined now: they killed two workers lately.",
)
POISONED: Final = ("taskoffload_poisoned", "Calls answered poisoned, never sent to a worker.")
POISON_KILLS: Final = (
    "taskoffload_poison_kills",
    "Worker deaths counted against the calls in flight to them (one per call and death).",
)


def poison_families(poison: Mapping[str, Any]) -> Iterator[Metric]:
    """The quarantine's gauge and counters, from ``/status``'s ``gateway.poison``."""
    yield GaugeMetricFamily(*QUARANTINED, value=poison.get("quarantined", 0))
    yield CounterMetricFamily(*POISONED, value=poison.get("refused", 0))
    yield CounterMetricFamily(*POISON_KILLS, value=poison.get("kills", 0))


def pool_families(pool: Mapping[str, Any]) -> Iterator[Metric]:
    """
    The pool's figures on the gateway's ``/metrics``, from ``/status``'s
    ``pool``: those of a pool in this process tree (role all).

    ``taskoffload_workers_busy`` and the counter ``taskoffload_worker_restarts_total``
    are left out for a pool elsewhere (role gateway, whose ``pool`` holds only
    addresses): the gateway does not know them, and the pool's own ``/metrics``
    (``--status-listen``) has them.  ``taskoffload_workers_serving`` and the
    gauge ``taskoffload_worker_restarts`` (deprecated: the counter replaces
    it) read 0 there, as they always have.
    """
    yield GaugeMetricFamily(
        "taskoffload_workers_serving",
        "Worker processes serving (role all only).",
        value=pool.get("serving", 0),
    )
    # The old gauge stays for the dashboards that read it.  It shares the
    # counter's family name, which only the text format 0.0.4 that /metrics
    # serves allows (not OpenMetrics): drop it before serving OpenMetrics.
    yield GaugeMetricFamily(
        "taskoffload_worker_restarts",
        "Worker processes restarted (role all only; deprecated: use "
        "taskoffload_worker_restarts_total).",
        value=pool.get("restarts", 0),
    )
    if "busy" in pool:
        yield GaugeMetricFamily(
            "taskoffload_workers_busy",
            "Task slots taken: tasks queued or running, or a connection about to bring one "
            "(role all only).",
            value=pool["busy"],
        )
    if "restarts" in pool:
        yield CounterMetricFamily(
            "taskoffload_worker_restarts",
            "Workers replaced after they died (role all only).",
            value=pool["restarts"],
        )


class LaneCollector(Collector):
    """
    The gauges of each lane, from the ``/status`` document: what the gateway
    holds of it (``gateway.lanes``) and, with the pool in the same process tree
    or on its own ``/status``, its workers (``pool.lanes``).  One label, the
    lane, whose values are the pool's lanes: bounded.

    :param stats_source: returns the ``/status`` document.
    """

    def __init__(self, stats_source: Callable[[], dict[str, Any]]) -> None:
        self._source = stats_source

    def collect(self) -> Iterable[Metric]:
        document = self._source()
        gateway = (document.get("gateway") or {}).get("lanes") or {}
        pool = (document.get("pool") or {}).get("lanes") or {}
        families = [
            (
                "taskoffload_lane_waiting",
                "Calls waiting in the gateway for their lane's share.",
                gateway,
                "waiting",
            ),
            (
                "taskoffload_lane_at_pool",
                "Calls the gateway has at its lane's workers.",
                gateway,
                "at_pool",
            ),
            (
                "taskoffload_lane_slots",
                "Task slots of the lane, as its pools said.",
                gateway,
                "slots",
            ),
            (
                "taskoffload_lane_workers",
                "Worker processes the lane is configured to run.",
                pool,
                "count",
            ),
            (
                "taskoffload_lane_workers_serving",
                "Worker processes of the lane taking connections.",
                pool,
                "serving",
            ),
        ]
        for name, documentation, lanes, key in families:
            if not lanes:
                continue
            family = GaugeMetricFamily(name, documentation, labels=["lane"])
            for lane, figures in sorted(lanes.items()):
                value = figures.get(key)
                if value is not None:
                    family.add_metric([lane], value)
            yield family
