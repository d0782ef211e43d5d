"""
Unit tests for :mod:`taskoffload.stats`: the gateway's counters (:class:`GatewayStats`),
its latency percentiles, and its Prometheus metrics (:class:`GatewayMetrics`).
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest

import taskoffload.stats as stats_module
from taskoffload import wire
from taskoffload.stats import GatewayMetrics, GatewayStats, latency_percentiles
from tests._trial_bridge import pytest_module

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


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
