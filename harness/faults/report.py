"""
The fault suite: scenarios that break things on purpose and
count what callers saw.

Each scenario starts the real ``twistd -n taskoffload`` processes it needs, on
loopback and free ports, each tree in its own session (process group), drives
them with asyncio clients, stops every tree it started, and returns a dict of
counts.  The integration tests run them at small sizes; ``run_all`` and
:func:`main` run them for longer and print the counts (from a checkout's root:
the harness is not installed with the package)::

    python -m harness.faults --duration 10

Scenarios:

:func:`~harness.faults.storm.kill_storm`
    Clients keep several requests in flight each through the gateway of a
    role-all tree while a random serving worker is SIGKILLed at a fixed
    interval.  The tasks leave a trace of every run: no request that is not
    ``retry=True`` may run twice, every request must get exactly one final
    reply (a result, or ``worker_lost``, at most 1 + ``--prefetch`` per kill),
    the pool must be whole within 1 s of the last kill with no restart backed
    off, and ``/status`` must agree with what the clients saw.
:func:`~harness.faults.slowloris.slowloris`
    Connections that send a partial line (worker port) or a partial handshake or
    frame (gateway) and stall: a normal client's noop p99 (median of rounds) is
    measured before and during.
:func:`~harness.faults.hostile.hostile`
    A hand-written corpus and fixed-seed generated inputs on both ports; each
    input must get the documented reply (for generated inputs, the one
    :func:`~harness.faults.oracle.documented_reply`, a reference model of ``docs/protocol.rst``, gives),
    and no process may die.
:func:`~harness.faults.crash.supervisor_crash`
    SIGKILL of a worker pool's supervisor under load (through a separate gateway,
    or from raw worker-port clients): clients get errors, nothing hangs, no
    process of that pool outlives a few seconds, and a pool restarted on the same
    port serves again.
:func:`~harness.faults.idle.idle_websockets`
    Many idle WebSocket clients on the gateway; a normal client still gets its
    noop answered.

The clients: the ``websockets`` library for ordinary WebSocket callers (install
the ``bench`` extra), a minimal hand-rolled RFC 6455 client for what that library
will not send (invalid UTF-8 in a text frame, a frame one byte per write, partial
handshakes), and raw asyncio streams for the worker port.  Every loop is bounded
in count and in time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.faults.crash import supervisor_crash
from harness.faults.hostile import JUDGED_FRACTION, hostile
from harness.faults.idle import idle_websockets
from harness.faults.slowloris import slowloris
from harness.faults.storm import (
    DOCUMENTED_MAX_LATENCY_S,
    LATENCY_FACTOR,
    RECOVERY_LIMIT_S,
    kill_storm,
)
from taskoffload import wire

__all__ = ["main", "problems", "run_all"]


def run_all(
    duration: float = 10.0,
    *,
    connections: int = 500,
    examples: int = 200,
    idle: int = 5000,
    seed: int | None = None,
    only: Sequence[str] = (),
    directory: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """
    Run every scenario (or those named in ``only``): the kill storm for
    ``duration`` s, ``connections`` slowloris connections per port, the corpus
    with ``examples`` generated inputs, the supervisor crash (through a gateway,
    and from raw clients) with phases of ``duration`` / 5 s (at least 2), and
    ``idle`` idle WebSocket clients.

    :param seed: for the kill storm's victims and the generated inputs; a random
        one if ``None`` (each result names the seed it used).
    :return: each scenario's counts, by name.
    """
    if seed is None:
        seed = random.randrange(2**32)
    phase = max(duration / 5, 2.0)
    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "kill_storm": lambda: kill_storm(duration, seed=seed, directory=directory),
        "slowloris": lambda: slowloris(connections, directory=directory),
        "hostile": lambda: hostile(examples, seed=seed, directory=directory),
        "supervisor_crash": lambda: supervisor_crash(phase, directory=directory),
        "supervisor_crash_direct": lambda: supervisor_crash(
            phase, via="direct", directory=directory
        ),
        "idle_websockets": lambda: idle_websockets(idle, directory=directory),
    }
    unknown = set(only) - scenarios.keys()
    if unknown:
        raise ValueError(f"no scenario named {', '.join(sorted(unknown))}")
    results = {}
    for name, scenario in scenarios.items():
        if not only or name in only:
            started = time.monotonic()
            results[name] = {**scenario(), "seed": seed}
            results[name]["scenario_s"] = round(time.monotonic() - started, 1)
    return results


def problems(name: str, counts: dict[str, Any]) -> list[str]:
    """
    What in a scenario's counts breaks the reliability claims (``docs/reliability.rst``);
    empty if nothing.  The integration tests and :func:`main` both judge by it.

    :param name: the scenario, as :func:`run_all` names it.
    """
    found: list[str] = []

    def want(condition: bool, what: str) -> None:
        if not condition:
            found.append(what)

    if name == "kill_storm":
        _kill_storm_problems(counts, want)
        _kill_storm_cost_problems(counts, want)
    elif name == "slowloris":
        _slowloris_problems(counts, want)
    elif name == "hostile":
        _hostile_problems(counts, want)
    elif name.startswith("supervisor_crash"):
        _supervisor_crash_problems(counts, want)
    elif name == "idle_websockets":
        _idle_websockets_problems(counts, want)
    else:
        raise ValueError(f"no scenario named {name!r}")
    return found


def _slowloris_problems(counts: dict[str, Any], want: Callable[[bool, str], None]) -> None:
    """:func:`problems` of a slowloris."""
    want(counts["normal_failures"] == 0, f"normal client failures: {counts['normal_failures']}")
    want(
        counts["open_failures"] == 0,
        f"stalled connections not opened: {counts['open_failures']}",
    )
    want(
        counts["stalled_worker_port"] == counts["stalled_gateway"] == counts["connections"],
        "stalled connections closed before the measurement ended: "
        f"{counts['stalled_worker_port']} on the worker port and {counts['stalled_gateway']} "
        f"on the gateway still open of {counts['connections']} each",
    )
    for kind in ("gateway", "direct"):
        loaded, limit = counts[f"{kind}_loaded_p99_ms"], counts[f"{kind}_limit_ms"]
        want(
            loaded is not None and limit is not None and loaded <= limit,
            f"slowed down: the {kind} client's loaded p99 {loaded} ms is over {limit} ms",
        )
    if "closed_by_idle_timeout" in counts:
        want(
            counts["closed_by_idle_timeout"]
            == counts["answered_bad_request"]
            == counts["connections"],
            f"idle timeout: {counts['closed_by_idle_timeout']} stalled lines closed and "
            f"{counts['answered_bad_request']} answered bad_request, of {counts['connections']}",
        )
    want(counts["twistd_alive"], "twistd died")


def _hostile_problems(counts: dict[str, Any], want: Callable[[bool, str], None]) -> None:
    """:func:`problems` of the hostile corpus."""
    want(
        counts["problems"] == 0,
        f"not as documented: {', '.join(counts['problem_cases'])}",
    )
    # A reference model that answered nothing exactly would judge nothing, and
    # find nothing wrong.
    generated = counts["generated"]
    least = math.floor(JUDGED_FRACTION * generated)
    for port, key in (("worker port", "judged_worker_port"), ("gateway", "judged_gateway")):
        want(
            counts[key] >= least,
            f"too few generated inputs judged on the {port}: {counts[key]} of {generated}, "
            f"not at least {least} ({JUDGED_FRACTION:.0%})",
        )
    want(counts["processes_unchanged"], "a process died")
    want(counts["noop_after"], "no noop after the corpus")


def _supervisor_crash_problems(counts: dict[str, Any], want: Callable[[bool, str], None]) -> None:
    """:func:`problems` of a supervisor crash."""
    want(counts["results_before"] > 0, "no result before the kill")
    want(counts["hangs"] == 0, f"hung requests: {counts['hangs']}")
    errors = counts["errors_after_kill"]
    want(sum(errors.values()) > 0, "no client saw an error after the kill")
    if counts["via"] == "gateway":
        # Through the gateway the pool's loss is the gateway's TaskClient's:
        # its callers get worker_lost, and keep their WebSockets.
        others = {k: v for k, v in errors.items() if k != wire.WORKER_LOST}
        want(not others, f"errors other than worker_lost after the kill: {others}")
        want(
            counts["dropped"] == 0,
            f"dropped WebSockets: the gateway closed {counts['dropped']}",
        )
    # orphans == 0 also says the killed pool's process group emptied (pool_gone_s).
    want(counts["orphans"] == 0, f"orphans: {counts['orphans']} processes of the pool survived")
    want(counts["restart_error"] is None, f"no restart: {counts['restart_error']}")
    want(counts["restart_first_result_s"] is not None, "the restarted pool did not serve")
    want(counts["results_after_restart"] > 0, "no result after the restart")
    want(
        not counts["errors_after_restart"],
        f"errors after the restart: {counts['errors_after_restart']}",
    )
    want(counts["gateway_alive"], "the gateway died")


def _idle_websockets_problems(counts: dict[str, Any], want: Callable[[bool, str], None]) -> None:
    """:func:`problems` of idle WebSockets."""
    n = counts["n"]
    # Every open either succeeds or fails: opened == n says open_failures == 0.
    want(
        counts["opened"] == n,
        f"idle clients not opened: {counts['opened']} of {n} ({counts['open_failures']} failed)",
    )
    want(counts["dropped"] == 0, f"idle clients dropped: {counts['dropped']}")
    error = counts["status_error"]
    want(error is None, str(error))  # it says what could not be read, when
    want(
        counts["status_clients"] >= n,
        f"/status counted fewer clients: at most {counts['status_clients']} of {n} open",
    )
    want(counts["noop_failures"] == 0, f"noops failed: {counts['noop_failures']}")
    after = counts["clients_after_close"]
    # No figure because /status could not be read is reported as that, above.
    want(
        after == 0 or (after is None and error is not None),
        f"/status still counts closed clients: {after} after all {n} closed",
    )
    want(counts["twistd_alive"], "twistd died")


def _kill_storm_problems(counts: dict[str, Any], want: Callable[[bool, str], None]) -> None:
    """:func:`problems` of a kill storm."""
    sent, results, lost = counts["sent"], counts["results"], counts["worker_lost"]
    others = counts["other_errors"]
    # Each request exactly one final reply: one was counted for every request
    # answered, none is missing, none came twice or for an id never sent.
    want(
        sent == results + lost + sum(others.values()),
        f"final replies: {sent} sent, {results} results + {lost} worker_lost "
        f"+ {sum(others.values())} other errors",
    )
    want(counts["missing"] == 0, f"unanswered: {counts['missing']} requests got no final reply")
    want(
        counts["connection_closed"] == 0,
        f"dropped WebSockets: {counts['connection_closed']} closed under a request",
    )
    want(counts["duplicates"] == 0, f"answered twice: {counts['duplicates']} duplicate replies")
    want(counts["unknown"] == 0, f"unknown replies: {counts['unknown']} to ids never sent")
    want(not others, f"errors other than worker_lost: {others}")
    want(
        counts["wrong_results"] == 0,
        f"wrong results: {counts['wrong_results']} results not the request's own",
    )
    # What ran, by the trace the tasks left.
    want(
        counts["ran_twice"] == 0,
        f"ran twice: {counts['ran_twice']} non-retry requests, e.g. {counts['ran_twice_tokens']}",
    )
    want(
        counts["retry_ran_thrice"] == 0,
        f"retry ran thrice: {counts['retry_ran_thrice']} retry=True requests",
    )
    want(
        counts["results_not_run"] == 0,
        f"results without a run: {counts['results_not_run']}",
    )
    want(counts["ran_unsent"] == 0, f"runs of requests never sent: {counts['ran_unsent']}")
    # (No "executions >= results": tokens are unique, so results_not_run == 0 implies it.)


def _kill_storm_cost_problems(counts: dict[str, Any], want: Callable[[bool, str], None]) -> None:
    """:func:`problems` of a kill storm: the kills, what they cost, and ``/status``."""
    sent, results, lost = counts["sent"], counts["results"], counts["worker_lost"]
    # The storm happened, and cost what docs/reliability.rst says: a killed worker
    # loses its running task and, with --prefetch N, the N sent ahead to it.
    expected_kills = int(counts["duration_s"] / counts["kill_interval_s"]) // 2
    want(
        counts["kills"] >= expected_kills,
        f"too few kills: {counts['kills']}, not at least {expected_kills} (half the ticks); "
        f"{counts['kill_skips']} ticks found no serving worker to kill",
    )
    per_kill = 1 + counts["prefetch"]
    want(
        lost <= per_kill * counts["kills"],
        f"worker_lost over the documented figure: {lost} for {counts['kills']} kills "
        f"(at most {per_kill} per kill)",
    )
    # Not implied by the latency bound below when the deadline is under that bound.
    want(
        counts["late"] == 0,
        f"late replies: {counts['late']} after the {counts['deadline_s']} s deadline",
    )
    limit = counts["latency_limit_s"]
    want(
        counts["max_latency_s"] <= limit,
        f"max latency {counts['max_latency_s']} s over {limit} s "
        f"({LATENCY_FACTOR:g} x the documented {DOCUMENTED_MAX_LATENCY_S} s)",
    )
    want(
        counts["recovery_s"] is not None and counts["recovery_s"] <= RECOVERY_LIMIT_S,
        f"recovery: the pool was whole {counts['recovery_s']} s after the last kill, "
        f"not within {RECOVERY_LIMIT_S} s",
    )
    want(
        counts["backoff_restarts"] == 0,
        f"backed-off restarts: {counts['backoff_restarts']} served workers restarted after "
        f"up to {counts['max_restart_delay_s']} s",
    )
    want(counts["unexpected_exits"] == 0, f"unexpected exits: {counts['unexpected_exits']}")
    # What the gateway counted over the storm agrees with what the clients saw;
    # if /status could not be read before or after, that is the problem instead.
    error = counts["status_error"]
    want(error is None, str(error))  # it says what could not be read, when
    if error is None:
        status = counts["status"]
        expected = {
            "inflight": 0,
            "clients": counts["clients"],
            "requests": sent,
            "ok": results,
            "worker_lost": lost,
            "by_function": counts["sent_by_function"],
        }
        for field, value in expected.items():
            seen = status.get(field)
            want(seen == value, f"/status disagrees on {field}: expected {value!r}, saw {seen!r}")
    want(counts["twistd_alive"], "twistd died")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fault suite, print each scenario's counts as JSON; exit 1 on a problem."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.faults", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds of the kill storm (10)"
    )
    parser.add_argument(
        "--connections", type=int, default=500, help="slowloris connections per port (500)"
    )
    parser.add_argument("--examples", type=int, default=200, help="generated hostile inputs (200)")
    parser.add_argument("--idle", type=int, default=5000, help="idle WebSocket clients (5000)")
    parser.add_argument(
        "--only", action="append", default=[], help="run only this scenario (repeatable)"
    )
    parser.add_argument("--seed", type=int, help="for the kill storm and the generated inputs")
    parser.add_argument("--directory", help="keep the twistd logs here")
    options = parser.parse_args(argv)
    results = run_all(
        options.duration,
        connections=options.connections,
        examples=options.examples,
        idle=options.idle,
        seed=options.seed,
        only=options.only,
        directory=options.directory,
    )
    failed = False
    for name, counts in results.items():
        print(json.dumps({"scenario": name, **counts}), flush=True)
        for problem in problems(name, counts):
            failed = True
            print(f"PROBLEM {name}: {problem}", flush=True)
    return 1 if failed else 0
