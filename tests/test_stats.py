"""
Unit tests for :mod:`taskoffload.stats`: the gateway's counters (:class:`GatewayStats`),
its latency percentiles, and its Prometheus metrics (:class:`GatewayMetrics`, and
what :class:`~taskoffload.shared_metrics.SharedGatewayMetrics` has of them).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from prometheus_client import generate_latest, values
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import getChildForRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

import taskoffload.stats as stats_module
from taskoffload import wire
from taskoffload.fairshare import FIRST_SHARE, FairShare
from taskoffload.service import GatewayService
from taskoffload.session import GatewayLimits, GatewaySession
from taskoffload.shared_metrics import MULTIPROCESS_DIRECTORY, SharedGatewayMetrics
from taskoffload.stats import GatewayMetrics, GatewayStats, latency_percentiles
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module
from tests.test_gateway_processes import FakeProcesses

# GatewayStats


def test_stats_count_unknown_functions_under_one_name() -> None:
    """Calls to names the pool does not know are counted together, whatever the names."""
    seen: list[str] = []
    stats = GatewayStats(on_finished=lambda function, *rest: seen.append(function))
    for n in range(3):
        stats.started()
        stats.finished(f"nope{n}", wire.UNKNOWN_FUNCTION, 0.001)
    assert stats.by_function == {stats_module.UNKNOWN_FUNCTIONS: 3}
    assert seen == [stats_module.UNKNOWN_FUNCTIONS] * 3


def test_stats_bound_the_function_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_FUNCTION_NAMES distinct names, further names are counted as one."""
    monkeypatch.setattr(stats_module, "MAX_FUNCTION_NAMES", 2)
    stats = GatewayStats()
    for function in ["a", "b", "c", "a", "d"]:
        stats.rejected(function, wire.OVERLOADED)
    assert stats.by_function == {"a": 2, "b": 1, stats_module.OTHER_FUNCTIONS: 2}


def test_stats_on_finished_hook() -> None:
    """on_finished sees each final reply's function, outcome and seconds."""
    seen: list[tuple[str, str, float]] = []
    stats = GatewayStats(on_finished=lambda *args: seen.append(args))
    stats.started()
    stats.finished("f", "ok", 0.5)
    stats.rejected("g", "overloaded")
    assert seen == [("f", "ok", 0.5), ("g", "overloaded", 0.0)]
    assert stats.inflight == 0


def test_percentiles_empty() -> None:
    """With no latencies recorded, every percentile is None."""
    assert set(GatewayStats().percentiles().values()) == {None}


def test_percentiles_known_latencies() -> None:
    """Percentiles come from the recorded latencies, in milliseconds."""
    stats = GatewayStats()
    latencies = [0.010] * 60 + [0.020] * 35 + [0.030] * 3 + [0.500] * 2
    stats.latencies.extend(reversed(latencies))
    assert stats.percentiles() == {"p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 500.0, "max_ms": 500.0}


def test_percentiles_single_latency() -> None:
    """One latency is every percentile."""
    stats = GatewayStats()
    stats.latencies.append(0.0123)
    assert set(stats.percentiles().values()) == {12.3}


def test_percentiles_index_rule() -> None:
    """The q percentile of n sorted latencies is the one at index int(q * n), in any input order."""
    assert latency_percentiles([0.5, 0.25]) == {
        "p50_ms": 500.0,
        "p90_ms": 500.0,
        "p99_ms": 500.0,
        "max_ms": 500.0,
    }
    ten = [n / 1000 for n in range(10, 0, -1)]
    assert latency_percentiles(ten) == {
        "p50_ms": 6.0,
        "p90_ms": 10.0,
        "p99_ms": 10.0,
        "max_ms": 10.0,
    }


def test_status_percentiles_are_latency_percentiles() -> None:
    """The /status latency figures are latency_percentiles of the latencies kept."""
    stats = GatewayStats()
    for seconds in [0.003, 0.001, 0.002]:
        stats.started()
        stats.finished("f", "ok", seconds)
    assert stats.to_json()["latency"] == latency_percentiles([0.001, 0.002, 0.003])


def test_latency_window_keeps_the_latest() -> None:
    """Only the latest LATENCY_WINDOW latencies are kept for the percentiles."""
    stats = GatewayStats()
    for _ in range(stats_module.LATENCY_WINDOW):
        stats.started()
        stats.finished("f", "ok", 9.0)
    stats.started()
    stats.finished("f", "ok", 1.0)
    assert len(stats.latencies) == stats_module.LATENCY_WINDOW
    assert stats.latencies[-1] == 1.0


# GatewayMetrics


def metrics_text(metrics: GatewayMetrics) -> list[str]:
    """The lines of the metrics' exposition."""
    return generate_latest(metrics.registry).decode().splitlines()


def test_metrics_count_by_function_and_outcome() -> None:
    """Each final reply counts under its function and outcome; all but overloaded are timed."""
    document: dict[str, Any] = {"gateway": {}, "pool": None}
    metrics = GatewayMetrics(lambda: document)
    metrics.finished("f", "ok", 0.002)
    metrics.finished("f", "ok", 0.004)
    metrics.finished("g", "overloaded", 0.0)
    lines = metrics_text(metrics)
    assert 'taskoffload_requests_total{function="f",outcome="ok"} 2.0' in lines
    assert 'taskoffload_requests_total{function="g",outcome="overloaded"} 1.0' in lines
    assert "taskoffload_request_seconds_count 2.0" in lines


def test_metrics_fed_by_stats() -> None:
    """GatewayStats' on_finished hook feeds the metrics, under the bounded names."""
    metrics = GatewayMetrics(lambda: {"gateway": {}, "pool": None})
    stats = GatewayStats(on_finished=metrics.finished)
    stats.started()
    stats.finished("nope", wire.UNKNOWN_FUNCTION, 0.001)
    stats.rejected("f", wire.OVERLOADED)
    lines = metrics_text(metrics)
    unknown = stats_module.UNKNOWN_FUNCTIONS
    assert f'taskoffload_requests_total{{function="{unknown}",outcome="unknown_function"}} 1.0' in (
        lines
    )
    assert 'taskoffload_requests_total{function="f",outcome="overloaded"} 1.0' in lines
    assert "taskoffload_request_seconds_count 1.0" in lines


def test_metrics_gauges_read_the_status_on_each_scrape() -> None:
    """The gauges read the status document when scraped, not when made."""
    document: dict[str, Any] = {"gateway": {"clients": 1, "inflight": 0}, "pool": None}
    metrics = GatewayMetrics(lambda: document)
    assert "taskoffload_clients 1.0" in metrics_text(metrics)
    document["gateway"]["clients"] = 4
    document["pool"] = {"serving": 2, "restarts": 3}
    lines = metrics_text(metrics)
    assert "taskoffload_clients 4.0" in lines
    assert "taskoffload_workers_serving 2.0" in lines
    assert "taskoffload_worker_restarts 3.0" in lines


# The metrics operators expect: pending, workers busy, task seconds, restarts


def gateway_in_memory(pool_service: Any = None) -> tuple[GatewayService, Site]:
    """A started gateway on a memory reactor, sending to a pool that never answers
    (its calls stay at the pool), and its site."""
    reactor = MemoryReactorClock()
    service = GatewayService(
        "tcp:8080", pool_addresses=["tcp:127.0.0.1:1"], pool_service=pool_service, reactor=reactor
    )
    service.privilegedStartService()
    [(_port, site, _backlog, _interface)] = reactor.tcpServers
    return service, site


def scrape(site: Site) -> list[str]:
    """The lines of the site's /metrics, rendered as a scrape would."""
    request = DummyRequest([b"metrics"])
    body = getChildForRequest(site.resource, request).render(request)
    return cast(bytes, body).decode().splitlines()


def value(lines: list[str], name: str) -> float | None:
    """The value of the sample ``name`` (labels included), or ``None`` if absent."""
    found = [line.rsplit(" ", 1)[1] for line in lines if line.rsplit(" ", 1)[0] == name]
    assert len(found) <= 1
    return float(found[0]) if found else None


def test_pending_follows_the_calls_waiting_in_the_gateway() -> None:
    """taskoffload_pending is the sum of /status's gateway.lanes[*].waiting: the calls
    a client has beyond its share of the pool wait in the gateway, and leave with it."""
    service, site = gateway_in_memory()
    assert service.factory is not None
    assert value(scrape(site), "taskoffload_pending") == 0
    session = service.factory.session(lambda data: None)
    # Until the pool says its capacity, a lone client's share is FIRST_SHARE calls.
    for n in range(FIRST_SHARE + 4):
        session.received(orjson.dumps({"id": n, "function": "sleep"}))
    lanes = service.status()["gateway"]["lanes"]
    assert sum(lane["waiting"] for lane in lanes.values()) == 4
    assert value(scrape(site), "taskoffload_pending") == 4
    session.close()
    assert value(scrape(site), "taskoffload_pending") == 0


class StubPool:
    """What the gateway reads of a pool in its process tree (role all): its status."""

    port = None

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {"serving": 2, "busy": 3, "restarts": 1}

    def status(self) -> dict[str, Any]:
        return dict(self.figures)


def test_workers_busy_and_restarts_follow_the_pool() -> None:
    """In role all, taskoffload_workers_busy is the pool's busy slots and the counter
    taskoffload_worker_restarts_total its restarts; the old gauge stays beside it."""
    pool = StubPool()
    _service, site = gateway_in_memory(pool)
    lines = scrape(site)
    assert value(lines, "taskoffload_workers_busy") == 3
    assert value(lines, "taskoffload_worker_restarts_total") == 1
    assert "# TYPE taskoffload_worker_restarts_total counter" in lines
    pool.figures.update(busy=5, restarts=2)
    lines = scrape(site)
    assert value(lines, "taskoffload_workers_busy") == 5
    assert value(lines, "taskoffload_worker_restarts_total") == 2
    assert value(lines, "taskoffload_worker_restarts") == 2  # deprecated, kept
    assert "# TYPE taskoffload_worker_restarts gauge" in lines


@pytest.mark.parametrize("pool", [{"addresses": ["tcp:10.0.0.2:12345"]}, None])
def test_a_remote_pools_busy_and_restarts_are_left_out(pool: dict[str, Any] | None) -> None:
    """In role gateway the gateway does not know the pool's busy slots or restarts: it
    says nothing of them (the pool's own /metrics does), rather than 0."""
    lines = metrics_text(GatewayMetrics(lambda: {"gateway": {}, "pool": pool}))
    samples = {line.split("{")[0].split()[0] for line in lines if not line.startswith("#")}
    assert "taskoffload_workers_busy" not in samples
    assert "taskoffload_worker_restarts_total" not in samples
    assert value(lines, "taskoffload_workers_serving") == 0


def test_task_seconds_count_each_call_tried_by_function() -> None:
    """taskoffload_task_seconds times each call from request to final reply, by
    function, whatever its outcome, but not the requests refused untried."""
    metrics = GatewayMetrics(lambda: {"gateway": {}, "pool": None})
    stats = GatewayStats(on_finished=metrics.finished)
    for function, outcome, seconds in [
        ("echo", "ok", 0.002),
        ("echo", wire.TASK_FAILED, 0.5),
        ("sleep", wire.TIMEOUT, 3.0),
        ("nope", wire.UNKNOWN_FUNCTION, 0.001),
    ]:
        stats.started()
        stats.finished(function, outcome, seconds)
    stats.rejected("echo", wire.OVERLOADED)
    stats.rejected("-", wire.BAD_REQUEST)
    stats.started()
    stats.finished("echo", wire.BAD_REQUEST, 0.0)  # a bad batch item, never sent
    lines = metrics_text(metrics)
    unknown = stats_module.UNKNOWN_FUNCTIONS
    assert value(lines, 'taskoffload_task_seconds_count{function="echo"}') == 2
    assert value(lines, 'taskoffload_task_seconds_sum{function="echo"}') == 0.502
    assert value(lines, 'taskoffload_task_seconds_bucket{function="echo",le="0.0025"}') == 1
    assert value(lines, 'taskoffload_task_seconds_count{function="sleep"}') == 1
    assert value(lines, f'taskoffload_task_seconds_count{{function="{unknown}"}}') == 1
    assert value(lines, 'taskoffload_task_seconds_count{function="-"}') is None
    assert "taskoffload_request_seconds_count 6.0" in lines  # all but overloaded, as before


def test_task_seconds_names_are_bounded_as_requests_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """The function label takes the names taskoffload_requests counts under."""
    monkeypatch.setattr(stats_module, "MAX_FUNCTION_NAMES", 2)
    metrics = GatewayMetrics(lambda: {"gateway": {}, "pool": None})
    stats = GatewayStats(on_finished=metrics.finished)
    for function in ["a", "b", "c", "d", "a"]:
        stats.started()
        stats.finished(function, "ok", 0.01)
    lines = metrics_text(metrics)
    other = stats_module.OTHER_FUNCTIONS
    timed = {
        line.split('"')[1]: float(line.split()[1])
        for line in lines
        if line.startswith("taskoffload_task_seconds_count{")
    }
    assert timed == {"a": 2, "b": 1, other: 2}
    assert set(timed) == {
        line.split('"')[1] for line in lines if line.startswith("taskoffload_requests_total{")
    }


# The same in multiprocess mode (--gateway-processes N)


@pytest.fixture
def processes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProcesses]:
    monkeypatch.setenv(MULTIPROCESS_DIRECTORY, str(tmp_path))
    yield FakeProcesses(tmp_path)
    values.close_all_multiprocess_files()


def stats_with_waiting(calls: int) -> GatewayStats:
    """The counters of a gateway process whose one client sent ``calls`` calls to a
    pool of one slot: all but one wait in the gateway."""
    clock = Clock()
    stats = GatewayStats()
    session = GatewaySession(
        lambda data: None, FairShare(FakeTaskPool(slots=1), clock), stats, GatewayLimits(), clock
    )
    for n in range(calls):
        session.received(orjson.dumps({"id": n, "function": "sleep"}))
    return stats


def test_shared_metrics_carry_pending_task_seconds_and_the_pool(processes: FakeProcesses) -> None:
    """With several gateway processes, pending sums each one's waiting calls (livesum),
    task seconds sum by function over them, and the pool's figures come from its state."""
    pool = {"serving": 4, "busy": 2, "restarts": 3}
    made = {}
    for pid in (201, 202):
        with processes.process(pid):
            made[pid] = SharedGatewayMetrics(lambda: {"gateway": {}, "pool": pool})
    with processes.process(201):
        made[201].finished("echo", "ok", 0.01)
        made[201].sample(stats_with_waiting(3))
    with processes.process(202):
        made[202].finished("echo", "ok", 0.02)
        made[202].finished("noop", wire.OVERLOADED, 0.0)
        made[202].sample(stats_with_waiting(4))
    lines = generate_latest(made[201].registry).decode().splitlines()
    assert value(lines, "taskoffload_pending") == 2 + 3
    assert value(lines, 'taskoffload_task_seconds_count{function="echo"}') == 2
    assert value(lines, 'taskoffload_task_seconds_count{function="noop"}') is None
    assert value(lines, "taskoffload_workers_busy") == 2
    assert value(lines, "taskoffload_worker_restarts_total") == 3
    assert "# TYPE taskoffload_worker_restarts_total counter" in lines
    assert "# TYPE taskoffload_pending gauge" in lines


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
