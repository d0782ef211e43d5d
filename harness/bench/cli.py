"""
``python -m harness.bench SCENARIO``: measure taskoffload on this machine.
Run it from a checkout's root (the harness is not installed with the package).

Each scenario starts what it needs as real ``twistd`` processes on loopback (or
targets running ones with ``--gateway URL`` / ``--pool ADDR``), runs ``--repeat``
times and prints the median with min-max of every figure.  The load generators
are lean: asyncio with one coroutine per simulated WebSocket client, and, for
``noop-direct``, a Twisted :class:`~taskoffload.client.TaskClient` in a child
process.  Every load loop is bounded in count and in time.

CPU shares are percent of one core over the measured window (200 % is both cores
of a 2-core machine): ``machine`` every process on the machine, others' included,
``loadgen`` the load generator itself, ``gateway`` the
``twistd`` process (gateway and supervisor), ``workers`` the rest of its process
group (fork server and workers), ``pool`` the whole worker pool's group.

Scenarios:

``emails``
    ``--tasks-total`` (1000) tasks of ``--task-seconds`` (0.05) of blocking sleep,
    sent at once through the gateway of ``--count`` (100) workers over
    ``--senders`` (100) WebSocket connections; seconds from the first send to the
    last reply, and the most tasks any one worker ran.  With ``--smtp`` each task
    sends a mail with :func:`~taskoffload.examples.send_mail` to an SMTP sink that
    waits ``--task-seconds`` per message.

``noop-gateway``
    ``noop`` round trips through the gateway with each of ``--clients`` (1,10,100)
    WebSocket clients, one call in flight each, for ``--duration`` (3) seconds or
    ``--max-calls``: tasks/s, p50 and p99 in ms.

``noop-direct``
    The same through ``TaskClient`` with ``--clients`` outstanding calls, against a
    ``--role=worker`` pool; then the pool's total RSS and PSS.

``responsive``
    p50, p99 and max of sequential ``noop`` calls from one extra WebSocket client
    while ``emails`` runs.

``startup``
    ``--count`` workers: seconds from launching ``twistd`` until every worker has
    answered a call, the supervisor's own "all serving" figure, and the pool's total
    RSS and PSS (summed over the supervisor, the fork server and the workers, from
    ``/proc/PID/smaps_rollup``).

``blocking-baseline``
    ``--inline`` (100) of the same blocking tasks run one after another in one
    process, and the projection to ``--tasks-total``.

``compare-gateway``
    ``noop-gateway`` through role all with its default ``--count``, and the same
    load through the reference chain (``harness.reference``: an Autobahn gateway
    forwarding each message over one pipelined connection to a ``LineReceiver``
    echo), the two sides taking turns to go first: tasks/s and server CPU per
    task (the machine's CPU minus the load generator's, over the tasks) of each
    (``ref_`` the reference), and their ratios (``ratio_``, taskoffload over the
    reference).

``compare-worker``
    ``noop`` lines over ``--clients`` raw connections to one worker
    (``--count=1``) and to the bare echo: tasks/s and that one process's CPU per
    task, and their ratios.

``compare-startup``
    ``startup`` beside a parent with Twisted imported that forks ``--count``
    children, each installing a reactor, listening and reporting: launch to all
    answering (all reported, for the reference) and PSS per worker, and their
    ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.bench.clients import noop_direct_load, probe_main
from harness.bench.compare import (
    scenario_compare_gateway,
    scenario_compare_startup,
    scenario_compare_worker,
)
from harness.bench.scenarios import SCENARIOS as MEASURES
from harness.bench.services import smtp_sink_main
from harness.faults import report as faults_report
from harness.measure import summarize

__all__ = ["build_parser", "main"]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers such as 1,10,100") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each number must be at least 1")
    return values


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be above 0")
        return value

    parse.__name__ = kind.__name__
    return parse


#: Every scenario, by the name the command line takes.
SCENARIOS = {
    **MEASURES,
    "compare-gateway": scenario_compare_gateway,
    "compare-startup": scenario_compare_startup,
    "compare-worker": scenario_compare_worker,
}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m harness.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--repeat", type=_positive(int), default=3, help="runs (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    _add_burst_options(parser)
    _add_loop_options(parser)
    _add_target_options(parser)
    return parser


def _add_burst_options(parser: argparse.ArgumentParser) -> None:
    """The sizes of the pool and of the ``emails`` burst."""
    parser.add_argument(
        "--count", type=_positive(int), default=100, help="workers of a started pool (100)"
    )
    parser.add_argument(
        "--tasks-total",
        type=_positive(int),
        default=1000,
        help="emails, responsive: tasks sent at once; blocking-baseline: projected (1000)",
    )
    parser.add_argument(
        "--task-seconds",
        type=_positive(float),
        default=0.05,
        help="blocking time of one emails task, or the SMTP sink's delay (0.05)",
    )
    parser.add_argument(
        "--senders",
        type=_positive(int),
        default=100,
        help="emails, responsive: WebSocket connections the tasks are spread over (100)",
    )
    parser.add_argument(
        "--smtp",
        action="store_true",
        help="emails, responsive: send_mail to an SMTP sink instead of sleeping",
    )


def _add_loop_options(parser: argparse.ArgumentParser) -> None:
    """The closed loops of ``noop-*``, and the bounds of every run."""
    parser.add_argument(
        "--clients",
        type=_int_list,
        default=[1, 10, 100],
        help="noop-*: clients (calls in flight), one level after another (1,10,100)",
    )
    parser.add_argument(
        "--duration", type=_positive(float), default=3.0, help="noop-*: seconds per level (3)"
    )
    parser.add_argument(
        "--warmup",
        type=_positive(float),
        default=0.5,
        help="noop-*: seconds of calls before each level's measurement (0.5)",
    )
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="measure from the first call (emails, responsive: no untimed burst first)",
    )
    parser.add_argument(
        "--max-calls",
        type=_positive(int),
        default=200_000,
        help="noop-*: calls per level; responsive: probe calls (200000)",
    )
    parser.add_argument(
        "--inline",
        type=_positive(int),
        default=100,
        help="blocking-baseline: tasks run inline (100)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        default=60.0,
        help="seconds any one burst or level may take before the run fails (60)",
    )


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    """Running services to measure instead of started ones, and prefetch."""
    parser.add_argument(
        "--gateway",
        metavar="URL",
        help="emails, responsive, noop-gateway: use this running gateway "
        "(e.g. ws://127.0.0.1:8080/ws); figures that need the bench tasks are left out",
    )
    parser.add_argument(
        "--pool", metavar="ADDR", help="noop-direct: use this running pool (tcp:HOST:PORT)"
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=0,
        metavar="N",
        help="calls a started gateway, or noop-direct's TaskClient, sends ahead to each busy "
        "worker (0: none; see docs/performance.rst)",
    )
    parser.add_argument(
        "--gateway-processes",
        type=int,
        default=1,
        metavar="N",
        help="emails, responsive, noop-gateway: the started gateway's processes (1)",
    )
    parser.add_argument(
        "--lane",
        metavar="NAME=COUNT",
        help="emails, responsive: start the pool with this lane, and noop on it "
        "(e.g. interactive=4: the probe's calls run on its workers)",
    )


def _noop_direct_client_main(argv: list[str]) -> None:
    """Hidden subcommand: the ``noop-direct`` load, printed as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m harness.bench _noop-direct-client")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--clients", type=_int_list, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--max-calls", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--pgid", type=int)
    parser.add_argument("--prefetch", type=int, default=0)
    noop_direct_load(parser.parse_args(argv))


def _run(options: argparse.Namespace) -> None:
    """Run the scenario ``--repeat`` times; print (and with ``--json`` save) the figures."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="taskoffload-bench-") as directory:
        for n in range(options.repeat):
            run = SCENARIOS[options.scenario](options, directory)
            runs.append(run)
            print(f"run {n + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in run.items()), flush=True)
    summary = summarize(runs)
    print(f"{options.scenario}: median (min-max) over {len(runs)} runs")
    for key, figures in summary.items():
        print(f"  {key:36} {figures['median']:10.3f}  ({figures['min']:.3f}-{figures['max']:.3f})")
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {
                    "scenario": options.scenario,
                    "options": {k: v for k, v in vars(options).items() if k != "json"},
                    "runs": runs,
                    "summary": summary,
                },
                indent=2,
            )
        )


def main(argv: list[str] | None = None) -> int:
    """Run a scenario and print (and optionally save) its figures."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_noop-direct-client"]:
        _noop_direct_client_main(argv[1:])
        return 0
    if argv[:1] == ["_probe"]:
        probe_main(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["_smtp-sink"]:
        smtp_sink_main(int(argv[1]), float(argv[2]))
        return 0
    if argv[:1] == ["faults"]:
        # The fault suite at full size: kill storm, slowloris, hostile
        # input, supervisor crash, idle WebSockets.  See harness.faults.
        return faults_report.main(argv[1:])
    _run(build_parser().parse_args(argv))
    return 0
