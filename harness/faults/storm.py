"""
The kill storm: workers SIGKILLed under load through the gateway of a role-all
tree, with traced tasks that record every run, so the counts say what ran and
not only what callers saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.faults.clients import Caller, read_status, status_document
from harness.faults.trees import scenario_trees
from harness.measure import nearest_rank
from harness.processes import TwistdTree
from taskoffload import wire

__all__ = [
    "DOCUMENTED_MAX_LATENCY_S",
    "LATENCY_FACTOR",
    "RECOVERY_LIMIT_S",
    "TRACED_MODULE",
    "TRACE_VARIABLE",
    "kill_storm",
    "read_trace",
]

#: The module of traced tasks the kill storm writes into its directory and serves.
TRACED_MODULE = "taskoffload_faults_traced"
#: The environment variable naming the trace file the traced tasks append to.
TRACE_VARIABLE = "TASKOFFLOAD_FAULTS_TRACE"
#: The traced tasks: each run appends ``TOKEN\n`` to the trace file as it starts (so a
#: run its worker's death cut short counts too), then returns the token.
_TRACED_SOURCE = '''"""
The fault suite's traced tasks (written by harness.faults; do not edit): each
run appends one line, its token, to the file ``$TASKOFFLOAD_FAULTS_TRACE``.
"""

import os
import time

from taskoffload.registry import task

_TRACE = os.environ["TASKOFFLOAD_FAULTS_TRACE"]


def _ran(token):
    # O_APPEND: one short write per run, never interleaved with another worker's.
    fd = os.open(_TRACE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, token.encode("ascii") + b"\\n")
    finally:
        os.close(fd)


@task
def traced_noop(token):
    _ran(token)
    return token


@task
def traced_sleep(token, seconds):
    _ran(token)
    time.sleep(seconds)
    return token


@task(retry=True)
def traced_retry(token, seconds):
    _ran(token)
    time.sleep(seconds)
    return token
'''
#: The traced tasks that are not idempotent: a run of one twice is a violation.
_ONCE_TASKS = ("traced_noop", "traced_sleep")
#: The traced task registered ``retry=True``: it may run twice, never three times.
_RETRY_TASK = "traced_retry"
#: The kill storm's figure for its longest reply (``docs/reliability.rst``: 10 clients
#: with 4 requests in flight each, 8 workers), in seconds; the bound is
#: :data:`LATENCY_FACTOR` times it.
DOCUMENTED_MAX_LATENCY_S = 0.32
LATENCY_FACTOR = 3.0
#: The pool must be whole again this long after the last kill.
RECOVERY_LIMIT_S = 1.0


def _traced_environment(directory: Path) -> dict[str, str]:
    """
    Write the traced tasks module into ``directory``; :return: the environment that
    serves it (``directory`` first on ``PYTHONPATH``, the trace file named).
    """
    (directory / f"{TRACED_MODULE}.py").write_text(_TRACED_SOURCE)
    trace = directory / "executions.trace"
    trace.write_bytes(b"")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), env.get("PYTHONPATH")]))
    env[TRACE_VARIABLE] = str(trace)
    return env


def read_trace(path: str | Path) -> Counter[str]:
    """:return: how many times each token ran, from a trace file of the traced tasks."""
    text = Path(path).read_bytes().decode("ascii", "replace")
    return Counter(line for line in text.split("\n") if line)


def kill_storm(
    duration: float = 10.0,
    *,
    clients: int = 10,
    in_flight: int = 4,
    count: int = 8,
    kill_interval: float = 0.2,
    deadline: float = 10.0,
    seed: int | None = None,
    directory: str | Path | None = None,
    prefetch: int = 0,
    options: Sequence[str] = (),
) -> dict[str, Any]:
    """
    ``clients`` WebSocket clients each keep ``in_flight`` requests outstanding
    through the gateway of a role-all tree of ``count`` workers for ``duration``
    s, while a random serving worker is SIGKILLed every ``kill_interval`` s.
    ``prefetch`` is passed as ``--prefetch`` (the loss a kill may cost depends on
    it); ``options`` are more ``twistd taskoffload`` options, not ``--prefetch``.

    The requests call the traced tasks (:data:`TRACED_MODULE`, written into the
    scenario's directory): ``traced_noop``, ``traced_sleep`` (20 ms) and
    ``traced_retry`` (20 ms, ``retry=True``), each with a token unique to the
    request and ``"timeout": deadline``.  Each run appends the token to a trace
    file, read at the end: so the counts say how many times each request *ran*,
    not only what its caller saw.

    Victims are taken from the workers ``/status`` lists as serving: a worker
    that served is no crash loop, so any restart the supervisor delays is a
    regression, not the documented backoff.

    :return: counts: ``sent`` (and ``sent_by_function``); final replies:
        ``results``, ``worker_lost``, ``other_errors`` (by code);
        ``wrong_results`` (a result that is not the request's token);
        ``duplicates`` (a second final reply to an id), ``unknown`` (a reply to
        an id never sent), ``missing`` (no final reply within ``deadline`` + 2 s),
        ``connection_closed``, ``late`` (a reply after more than ``deadline`` s);
        ``max_latency_s``, ``p99_latency_s``, ``latency_limit_s``; from the trace,
        ``executions`` (runs), ``ran_twice`` (non-``retry`` requests that ran more
        than once; ``ran_twice_tokens`` names a few), ``retry_ran_thrice``,
        ``results_not_run`` (a result without a run), ``ran_unsent`` (a run of a
        token never sent); ``kills``, ``kill_skips`` (ticks with no serving
        worker to kill); ``recovery_s``, the seconds from the last kill until
        ``/status`` shows every worker serving again and no killed pid among
        them (``None`` if not within 15 s); ``backoff_restarts`` (killed workers
        whose restart the supervisor delayed) and ``max_restart_delay_s``;
        ``unexpected_exits`` (workers that died without being killed);
        ``status`` (``/status`` afterwards, as deltas over the storm:
        ``inflight``, ``clients``, ``requests``, ``ok``, ``worker_lost``,
        ``by_function``; empty if it could not be read before or after) and
        ``status_error`` (what could not be read, when; ``None`` if nothing);
        ``twistd_alive``.
    """
    if any(option.split("=", 1)[0] == "--prefetch" for option in options):
        raise ValueError("pass prefetch=N, not --prefetch in options")
    rng = random.Random(seed)
    extra = ("--prefetch", str(prefetch)) if prefetch else ()
    with scenario_trees(directory, "kill_storm") as trees:
        env = _traced_environment(trees.directory)
        tree, gateway, _ = trees.all(count, "--tasks", TRACED_MODULE, *extra, *options, env=env)
        counts = asyncio.run(
            _kill_storm(
                tree, gateway, duration, clients, in_flight, count, kill_interval, deadline, rng
            )
        )
        executions = read_trace(env[TRACE_VARIABLE])
    requests: dict[str, str] = counts.pop("requests")
    answered: set[str] = counts.pop("answered_with_result")
    counts.update({"in_flight": in_flight, "prefetch": prefetch})
    counts.update(_trace_counts(requests, answered, executions))
    return counts


def _trace_counts(
    requests: dict[str, str], answered: set[str], executions: Counter[str]
) -> dict[str, Any]:
    """
    What ran, by the trace: :func:`kill_storm`'s ``executions``, ``ran_twice``,
    ``ran_twice_tokens``, ``retry_ran_thrice``, ``results_not_run`` and ``ran_unsent``.

    :param requests: the function each token was sent to.
    :param answered: the tokens answered with a result.
    :param executions: how many times each token ran.
    """
    once = [t for t, f in requests.items() if f in _ONCE_TASKS and executions.get(t, 0) > 1]
    return {
        "executions": sum(executions.values()),
        "ran_twice": len(once),
        "ran_twice_tokens": sorted(once)[:10],
        "retry_ran_thrice": sum(
            1 for t, f in requests.items() if f == _RETRY_TASK and executions.get(t, 0) > 2
        ),
        "results_not_run": sum(1 for t in answered if not executions.get(t)),
        "ran_unsent": sum(1 for t in executions if t not in requests),
    }


class _Storm:
    """
    One kill storm under way: the requests its senders sent and what came back,
    and the workers its killer killed.
    """

    def __init__(
        self,
        port: int,
        count: int,
        kill_interval: float,
        deadline: float,
        rng: random.Random,
        stop_at: float,
    ) -> None:
        self.port = port
        self.count = count
        self.kill_interval = kill_interval
        self.deadline = deadline
        self.rng = rng
        self.stop_at = stop_at
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.requests: dict[str, str] = {}  # token: function
        self.answered_with_result: set[str] = set()  # tokens
        self.wrong_results = 0
        self.killed: dict[int, float] = {}  # pid: when
        self.last_kill = time.monotonic()
        self.skips = 0
        self.recovery: float | None = None

    async def send(self, index: int, caller: Caller, ids: Iterator[int]) -> None:
        """One sender: a request at a time on ``caller`` until the storm ends."""
        for request_id in ids:  # bounded; the clock ends it long before
            if time.monotonic() >= self.stop_at:
                return
            token = f"{index}.{request_id}"
            draw = self.rng.random()
            function = (
                "traced_noop" if draw < 0.4 else "traced_sleep" if draw < 0.8 else _RETRY_TASK
            )
            args: list[Any] = [token] if function == "traced_noop" else [token, 0.02]
            request = {
                "id": request_id,
                "function": function,
                "args": args,
                "timeout": self.deadline,
            }
            started = time.monotonic()
            self.requests[token] = function
            try:
                reply = await caller.call(request, self.deadline + 2.0)
            except asyncio.TimeoutError:
                self.outcomes["missing"] += 1
                continue
            except ConnectionError:
                self.outcomes["connection_closed"] += 1
                return
            self.latencies.append(time.monotonic() - started)
            if "result" in reply:
                self.outcomes["results"] += 1
                self.answered_with_result.add(token)
                if reply["result"] != token:
                    self.wrong_results += 1
            else:
                code = str((reply.get("error") or {}).get("code"))
                self.outcomes[f"error:{code}"] += 1

    async def kill(self) -> None:
        """The killer: a serving worker SIGKILLed each tick; then wait for the pool to recover."""
        next_kill = time.monotonic() + self.kill_interval
        while next_kill < self.stop_at:
            await asyncio.sleep(max(next_kill - time.monotonic(), 0))
            next_kill += self.kill_interval
            document = await status_document(self.port, timeout=self.kill_interval)
            workers = ((document or {}).get("pool") or {}).get("workers", [])
            serving = sorted(
                w["pid"]
                for w in workers
                if w.get("state") == "serving" and w["pid"] not in self.killed
            )
            if not serving:
                self.skips += 1
                continue
            victim = self.rng.choice(serving)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
                self.last_kill = self.killed[victim] = time.monotonic()
        self.recovery = await _recovery(
            self.port, self.count, set(self.killed), self.last_kill, limit=15.0
        )

    def reply_counts(self, duplicates: int, unknown: int) -> dict[str, Any]:
        """:func:`kill_storm`'s counts of what was sent and what came back."""
        errors = {k[6:]: v for k, v in self.outcomes.items() if k.startswith("error:")}
        latencies = self.latencies
        return {
            "sent": len(self.requests),
            "sent_by_function": dict(Counter(self.requests.values())),
            "results": self.outcomes["results"],
            "worker_lost": errors.pop(wire.WORKER_LOST, 0),
            "other_errors": errors,
            "wrong_results": self.wrong_results,
            "duplicates": duplicates,
            "unknown": unknown,
            "missing": self.outcomes["missing"],
            "connection_closed": self.outcomes["connection_closed"],
            "deadline_s": self.deadline,
            "late": sum(1 for x in latencies if x > self.deadline),
            "max_latency_s": round(max(latencies, default=0.0), 3),
            "p99_latency_s": round(nearest_rank(latencies, 0.99), 3) if latencies else None,
            "latency_limit_s": round(LATENCY_FACTOR * DOCUMENTED_MAX_LATENCY_S, 3),
        }

    def kill_counts(self, delays: dict[int, float]) -> dict[str, Any]:
        """:func:`kill_storm`'s counts of the kills, given the restart delays logged."""
        killed = self.killed
        return {
            "kill_interval_s": self.kill_interval,
            "kills": len(killed),
            "kill_skips": self.skips,
            "recovery_s": self.recovery,
            "backoff_restarts": sum(1 for pid in killed if delays.get(pid, 0.0) > 0),
            "max_restart_delay_s": max((delays.get(pid, 0.0) for pid in killed), default=0.0),
            "unexpected_exits": sum(1 for pid in delays if pid not in killed),
        }


async def _kill_storm(
    tree: TwistdTree,
    port: int,
    duration: float,
    clients: int,
    in_flight: int,
    count: int,
    kill_interval: float,
    deadline: float,
    rng: random.Random,
) -> dict[str, Any]:
    before, before_error = await read_status(port)
    callers = await asyncio.gather(*(Caller.open(port) for _ in range(clients)))
    storm = _Storm(port, count, kill_interval, deadline, rng, time.monotonic() + duration)
    senders = []
    for index, caller in enumerate(callers):
        ids = iter(range(1_000_000))  # shared by the caller's senders: ids unique on it
        senders += [storm.send(index, caller, ids) for _ in range(in_flight)]
    await asyncio.gather(storm.kill(), *senders)
    await asyncio.sleep(0.3)  # a duplicate reply would arrive now
    after, after_error = await read_status(port)
    status_errors = [
        f"/status could not be read {when}: {error}"
        for when, error in (("before the storm", before_error), ("after it", after_error))
        if error
    ]
    duplicates = sum(c.duplicates for c in callers)
    unknown = sum(c.unknown for c in callers)
    await asyncio.gather(*(c.close() for c in callers))
    return {
        "duration_s": duration,
        "clients": len(callers),
        **storm.reply_counts(duplicates, unknown),
        **storm.kill_counts(_restart_delays(tree.log())),
        # Deltas only when both were read: an unreadable "before" would make them totals.
        "status": {} if before is None or after is None else _status_delta(before, after),
        "status_error": "; ".join(status_errors) or None,
        "twistd_alive": tree.alive(),
        "requests": storm.requests,
        "answered_with_result": storm.answered_with_result,
    }


def _status_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The gateway's ``/status`` after a scenario, its totals as increases over ``before``."""
    was, now = before.get("gateway") or {}, after.get("gateway") or {}
    if not now:
        return {}

    def grew(key: str, name: str) -> int:
        return int((now.get(key) or {}).get(name, 0)) - int((was.get(key) or {}).get(name, 0))

    return {
        "inflight": now.get("inflight"),
        "clients": now.get("clients"),
        "requests": now.get("requests", 0) - was.get("requests", 0),
        "ok": grew("by_outcome", "ok"),
        "worker_lost": grew("by_outcome", wire.WORKER_LOST),
        "by_function": {
            name: grew("by_function", name)
            for name in sorted({*(now.get("by_function") or {}), *(was.get("by_function") or {})})
            if grew("by_function", name)
        },
    }


_RESTART = re.compile(r"\(pid (\d+)\) exited with \S+ after \S+ s; restarting in ([\d.]+) s")


def _restart_delays(log: str) -> dict[int, float]:
    """The restart delay the supervisor logged for each worker pid that exited."""
    return {int(pid): float(delay) for pid, delay in _RESTART.findall(log)}


async def _recovery(
    port: int, count: int, killed: set[int], since: float, limit: float
) -> float | None:
    """Seconds from ``since`` until every worker serves and none of ``killed`` is listed."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        document = await status_document(port)
        pool = (document or {}).get("pool") or {}
        pids = {w.get("pid") for w in pool.get("workers", [])}
        if pool.get("serving") == count and pool.get("alive") == count and not pids & killed:
            return round(time.monotonic() - since, 3)
        await asyncio.sleep(0.01)
    return None
