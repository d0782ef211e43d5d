"""
Smoke tests of ``python -m harness.bench``: every scenario runs at a tiny size
against real ``twistd`` processes and reports figures that add up.  Speed targets
are never asserted here (docs/performance.rst has the figures).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from harness.bench import cli, services
from tests._trial_bridge import pytest_module

pytestmark = pytest.mark.integration

TINY_EMAILS = ["--count=4", "--tasks-total=20", "--senders=3", "--task-seconds=0.01"]
TINY_NOOP = ["--count=2", "--clients=1,2", "--duration=0.5", "--warmup=0.1"]


def run(tmp_path: Path, *args: str) -> dict[str, Any]:
    """Run the bench once with ``args``; :return: its ``--json`` output."""
    out = tmp_path / "figures.json"
    assert cli.main([*args, "--repeat=1", f"--json={out}"]) == 0
    report: dict[str, Any] = json.loads(out.read_text())
    assert report["scenario"] == args[0]
    assert len(report["runs"]) == 1
    run = report["runs"][0]
    for key, value in run.items():
        assert report["summary"][key] == {"median": value, "min": value, "max": value}
    return run


def test_blocking_baseline(tmp_path: Path) -> None:
    """The inline baseline takes at least its tasks' sleeps and projects linearly."""
    figures = run(tmp_path, "blocking-baseline", "--inline=4", "--task-seconds=0.01")
    assert figures["tasks"] == 4
    assert figures["measured_s"] >= 0.04
    assert figures["projected_total_s"] == pytest.approx(figures["measured_s"] * 1000 / 4)


def _check_emails(figures: dict[str, Any]) -> None:
    assert figures["results"] == 20
    assert figures["errors"] == 0
    assert 0 < figures["wall_s"] < 30
    assert 1 <= figures["workers_used"] <= 4
    assert 20 / 4 <= figures["max_tasks_per_worker"] <= 20
    for key in ("machine_cpu_pct", "loadgen_cpu_pct", "gateway_cpu_pct", "workers_cpu_pct"):
        assert 0 <= figures[key] <= 100 * 1024


def test_emails(tmp_path: Path) -> None:
    """Every task of the burst is answered with a result, and by the pool's workers."""
    _check_emails(run(tmp_path, "emails", *TINY_EMAILS))


def test_emails_smtp(tmp_path: Path) -> None:
    """The --smtp variant sends every mail to the sink and gets a result for each."""
    figures = run(tmp_path, "emails", "--smtp", *TINY_EMAILS)
    _check_emails(figures)
    assert figures["smtp_sink_cpu_pct"] >= 0


def test_responsive(tmp_path: Path) -> None:
    """The probe's noop calls are answered with results while the burst runs."""
    figures = run(tmp_path, "responsive", *TINY_EMAILS)
    _check_emails(figures)
    assert figures["noop_calls"] >= 1
    assert figures["noop_errors"] == 0
    assert 0 < figures["noop_p50_ms"] <= figures["noop_p99_ms"] <= figures["noop_max_ms"]


def _check_levels(figures: dict[str, Any], shares: tuple[str, ...]) -> None:
    for clients in (1, 2):
        prefix = f"c{clients}_"
        assert figures[prefix + "calls"] > 0
        assert figures[prefix + "errors"] == 0
        # calls over a window of about --duration seconds
        assert figures[prefix + "tasks_per_s"] == pytest.approx(
            figures[prefix + "calls"] / 0.5, rel=0.5
        )
        assert 0 < figures[prefix + "p50_ms"] <= figures[prefix + "p99_ms"]
        for share in ("machine_cpu_pct", *shares):
            assert not math.isnan(figures[prefix + share])
            assert figures[prefix + share] >= 0


def test_noop_gateway(tmp_path: Path) -> None:
    """Each client level makes calls through the gateway, all answered with results."""
    figures = run(tmp_path, "noop-gateway", *TINY_NOOP)
    _check_levels(figures, ("loadgen_cpu_pct", "gateway_cpu_pct", "workers_cpu_pct"))


def test_noop_direct(tmp_path: Path) -> None:
    """Each level of outstanding TaskClient calls is answered; the pool's memory is reported."""
    figures = run(tmp_path, "noop-direct", *TINY_NOOP)
    _check_levels(figures, ("loadgen_cpu_pct", "pool_cpu_pct"))
    assert 0 < figures["pool_pss_mib"] <= figures["pool_rss_mib"]


TINY_COMPARE = ["--clients=2", "--duration=0.5", "--warmup=0.1"]


def _check_comparison(figures: dict[str, Any], cost: str) -> None:
    """Both sides made calls, none failed, and each ratio is the two sides' quotient."""
    for prefix in ("", "ref_"):
        assert figures[f"{prefix}c2_calls"] > 0
        assert figures[f"{prefix}c2_errors"] == 0
        assert figures[f"{prefix}c2_{cost}"] > 0
    assert figures["ratio_c2_tasks_per_s"] == pytest.approx(
        figures["c2_tasks_per_s"] / figures["ref_c2_tasks_per_s"]
    )
    assert figures[f"ratio_c2_{cost}"] == pytest.approx(
        figures[f"c2_{cost}"] / figures[f"ref_c2_{cost}"]
    )


def test_compare_gateway(tmp_path: Path) -> None:
    """The gateway and the reference chain both answer every call; the ratios are theirs."""
    _check_comparison(run(tmp_path, "compare-gateway", *TINY_COMPARE), "server_us_per_task")


def test_compare_worker(tmp_path: Path) -> None:
    """One worker and the bare echo both answer every line; the ratios are theirs."""
    _check_comparison(run(tmp_path, "compare-worker", *TINY_COMPARE), "process_us_per_task")


def test_compare_startup(tmp_path: Path) -> None:
    """A small pool and the fork reference both start; the ratios are theirs."""
    figures = run(tmp_path, "compare-startup", "--count=3")
    assert 0 < figures["ref_launch_to_all_ready_s"] < 60
    assert 0 < figures["ref_pss_per_worker_mib"]
    assert figures["ratio_launch_s"] == pytest.approx(
        figures["launch_to_all_answering_s"] / figures["ref_launch_to_all_ready_s"]
    )
    assert figures["ratio_pss_per_worker"] == pytest.approx(
        figures["pss_per_worker_mib"] / figures["ref_pss_per_worker_mib"]
    )


def test_startup(tmp_path: Path) -> None:
    """Every worker of a small pool answers, and the pool's memory is reported."""
    figures = run(tmp_path, "startup", "--count=3")
    assert 0 < figures["supervisor_start_to_all_serving_s"] < 60
    assert 0 < figures["launch_to_all_answering_s"] < 60
    assert 0 < figures["pss_mib"] <= figures["rss_mib"]


def test_targets_running_services(tmp_path: Path) -> None:
    """--gateway and --pool measure services the bench did not start."""
    service, url = services.start_all(
        cli.build_parser().parse_args(["emails", "--count=2"]), str(tmp_path)
    )
    try:
        figures = run(tmp_path, "noop-gateway", *TINY_NOOP, f"--gateway={url}")
        _check_levels(figures, ("loadgen_cpu_pct",))
        assert "c1_gateway_cpu_pct" not in figures
        emails = run(tmp_path, "emails", *TINY_EMAILS, f"--gateway={url}")
        assert emails["results"] == 20 and emails["errors"] == 0
        assert "max_tasks_per_worker" not in emails
    finally:
        service.stop()
    pool, address = services.start_pool(
        cli.build_parser().parse_args(["noop-direct", "--count=2"]), str(tmp_path)
    )
    try:
        figures = run(tmp_path, "noop-direct", *TINY_NOOP, f"--pool={address}")
        _check_levels(figures, ("loadgen_cpu_pct",))
        assert "pool_pss_mib" not in figures
    finally:
        pool.stop()


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
