"""
The harness's own pieces that need no process: where it is loaded from, the
command lines it builds, the process-tree wrapper before it starts, the
measurement helpers and the bench's command line.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

import harness
from harness.bench import cli
from harness.measure import milliseconds, nearest_rank, percentile
from harness.processes import CHECKOUT, TwistdTree, harness_command, twistd_command
from tests._trial_bridge import pytest_module

REPO = Path(__file__).resolve().parents[1]


def test_harness_is_the_checkouts() -> None:
    """The harness the tests import is the checkout's harness/ directory."""
    assert Path(harness.__file__).resolve() == REPO / "harness" / "__init__.py"
    assert CHECKOUT == REPO


def test_harness_command_runs_a_module_of_this_interpreter() -> None:
    """A client process of the harness is ``python -m MODULE ARGS`` with this interpreter."""
    assert harness_command("harness.bench", "_probe", "ws://x", "5") == [
        sys.executable,
        "-m",
        "harness.bench",
        "_probe",
        "ws://x",
        "5",
    ]


def test_twistd_command_runs_the_plugin_in_the_foreground() -> None:
    """twistd runs the taskoffload plugin with -n, no pid file, and the arguments after it."""
    command = twistd_command("--role=worker", "--count=2")
    assert command[-5:] == ["-n", "--pidfile=", "taskoffload", "--role=worker", "--count=2"]


def test_tree_does_nothing_until_started(tmp_path: Path) -> None:
    """A tree not started has no process and no log, and stopping it does nothing."""
    tree = TwistdTree(["--role=worker"], tmp_path, name="idle")
    assert tree.log_path == tmp_path / "idle.log"
    with pytest.raises(RuntimeError, match="not started"):
        tree.process  # noqa: B018  # the property is what is tested
    tree.stop()
    assert not tree.log_path.exists()


def test_quantiles_and_milliseconds() -> None:
    """nearest_rank sorts first; no values give NaN; milliseconds keeps None."""
    assert nearest_rank([3.0, 1.0, 2.0], 0.5) == 2.0
    assert nearest_rank([3.0, 1.0, 2.0], 0.99) == 3.0
    assert math.isnan(percentile([], 0.5))
    assert milliseconds(0.25) == 250.0
    assert milliseconds(None) is None


def test_bench_command_line_defaults() -> None:
    """The bench's options keep their documented defaults, and refuse a level below 1."""
    options = cli.build_parser().parse_args(["emails"])
    assert (options.count, options.tasks_total, options.task_seconds) == (100, 1000, 0.05)
    assert (options.senders, options.clients, options.duration) == (100, [1, 10, 100], 3.0)
    assert (options.warmup, options.max_calls, options.inline) == (0.5, 200_000, 100)
    assert (options.timeout, options.prefetch, options.repeat) == (60.0, 0, 3)
    assert options.gateway is None and options.pool is None and not options.smtp
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["noop-gateway", "--clients", "0"])


def test_bench_faults_runs_the_fault_suite() -> None:
    """``harness.bench faults`` hands its arguments to the fault suite, which refuses an
    unknown scenario before it starts anything."""
    with pytest.raises(ValueError, match="no scenario named nope"):
        cli.main(["faults", "--only", "nope"])


testSuite = pytest_module(__file__)
