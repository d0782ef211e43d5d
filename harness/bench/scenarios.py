"""
The benchmark scenarios: each is one run, from its options and a directory for
what it starts, to its figures.  :mod:`harness.bench.cli` says what each
measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from harness.bench.clients import (
    Prober,
    all_answer,
    burst,
    open_clients,
    request,
)
from harness.bench.services import (
    SmtpSink,
    gateway_target,
    smtp_sink,
    start_pool,
    start_pool_tree,
)
from harness.measure import ClosedLoop, CpuMeter, latency_figures
from harness.processes import CHECKOUT, TwistdTree, free_port, harness_command

__all__ = [
    "SCENARIOS",
    "noop_gateway_level",
    "scenario_blocking_baseline",
    "scenario_emails",
    "scenario_noop_direct",
    "scenario_noop_gateway",
    "scenario_responsive",
    "scenario_startup",
]


def _emails_task(options: argparse.Namespace, started: bool) -> tuple[str, Callable[[int], dict]]:
    """The function and arguments of one ``emails`` task."""
    if options.smtp:
        if started:
            return "bench_mail", lambda n: {
                "to": f"user{n}@example.org",
                "subject": f"bench {n}",
                "body": "Hello from the taskoffload benchmark.",
            }
        return "send_mail", lambda n: {
            "to": f"user{n}@example.org",
            "subject": f"bench {n}",
            "body": "Hello from the taskoffload benchmark.",
        }
    if started:
        return "bench_block", lambda n: {"seconds": options.task_seconds}
    return "sleep", lambda n: {"seconds": options.task_seconds}


async def _emails_run(
    options: argparse.Namespace,
    url: str,
    service: TwistdTree | None,
    sink: SmtpSink | None,
    probe: bool,
) -> dict[str, float]:
    function, args = _emails_task(options, service is not None)
    async with contextlib.AsyncExitStack() as stack:
        connections = await open_clients(url, options.senders, stack)
        if not options.no_warmup:
            await asyncio.wait_for(
                burst(connections, options.tasks_total, function, args), options.timeout
            )
        meter = CpuMeter(
            service.pid if service else None, {"smtp_sink": sink.pid} if sink else None
        )
        prober = Prober(url, options) if probe else None
        try:
            if prober is not None:
                await prober.start()
            meter.start()
            measured = await asyncio.wait_for(
                burst(connections, options.tasks_total, function, args), options.timeout
            )
            probed = await prober.stop() if prober is not None else None
        finally:
            if prober is not None:
                prober.kill()
        figures = {"wall_s": measured.wall, "results": float(len(measured.results))}
        figures["errors"] = float(sum(measured.errors.values()))
        if service is not None:
            per_worker = Counter(measured.results)
            figures["max_tasks_per_worker"] = float(max(per_worker.values(), default=0))
            figures["workers_used"] = float(len(per_worker))
        if probed is not None:
            latencies, probe_errors = probed
            figures.update(latency_figures(latencies, "noop_"))
            figures["noop_calls"] = float(len(latencies))
            figures["noop_errors"] = float(probe_errors)
        figures.update(meter.stop())
        return figures


def scenario_emails(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``emails``."""
    with (
        smtp_sink(options, directory) as sink,
        gateway_target(options, directory, sink) as (url, service),
    ):
        return asyncio.run(_emails_run(options, url, service, sink, probe=False))


def scenario_responsive(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``responsive``."""
    with (
        smtp_sink(options, directory) as sink,
        gateway_target(options, directory, sink) as (url, service),
    ):
        return asyncio.run(_emails_run(options, url, service, sink, probe=True))


async def noop_gateway_level(
    url: str,
    clients: int,
    options: argparse.Namespace,
    meter: CpuMeter,
    answered: str = '"result"',
) -> dict[str, float]:
    """
    ``clients`` WebSocket clients, one ``noop`` in flight each, for one level.

    :param answered: what a reply holds when the call succeeded.
    """
    loop_state = ClosedLoop(options.duration, options.max_calls)
    frame = request(1, "noop", {})

    async def client(ws: Any) -> None:
        while not loop_state.stopped:
            sent = time.perf_counter()
            await ws.send(frame)
            reply = await ws.recv()
            loop_state.record(sent, answered in reply)

    async with contextlib.AsyncExitStack() as stack:
        connections = await open_clients(url, clients, stack)
        tasks = [asyncio.ensure_future(client(ws)) for ws in connections]
        try:
            await asyncio.sleep(0 if options.no_warmup else options.warmup)
            meter.start()
            loop_state.measuring = True
            start = time.perf_counter()
            deadline = start + options.duration
            while not loop_state.stopped and time.perf_counter() < deadline:
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.perf_counter())))
            loop_state.measuring = False
            loop_state.stopped = True
            loop_state.window = (start, time.perf_counter())
            cpu = meter.stop(f"c{clients}_")
            await asyncio.wait_for(asyncio.gather(*tasks), options.timeout)
        finally:
            for t in tasks:
                t.cancel()
    figures = loop_state.figures(f"c{clients}_")
    figures.update(cpu)
    return figures


def scenario_noop_gateway(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``noop-gateway``."""
    with gateway_target(options, directory) as (url, service):
        figures: dict[str, float] = {}
        for clients in options.clients:
            meter = CpuMeter(service.pid if service else None)
            figures.update(asyncio.run(noop_gateway_level(url, clients, options, meter)))
        return figures


# noop-direct: TaskClient needs a reactor, so it runs in a child process.


def _noop_direct_command(options: argparse.Namespace, address: str, pgid: int | None) -> list[str]:
    """The command line of the ``noop-direct`` load generator."""
    command = harness_command(
        "harness.bench",
        "_noop-direct-client",
        "--pool",
        address,
        "--clients",
        ",".join(map(str, options.clients)),
        "--duration",
        str(options.duration),
        "--warmup",
        str(0 if options.no_warmup else options.warmup),
        "--max-calls",
        str(options.max_calls),
    )
    if pgid is not None:
        command += ["--pgid", str(pgid)]
    if options.prefetch:
        command += ["--prefetch", str(options.prefetch)]
    return command


def scenario_noop_direct(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``noop-direct``."""
    service: TwistdTree | None = None
    if options.pool:
        address = options.pool
    else:
        service, address = start_pool(options, directory)
    try:
        command = _noop_direct_command(options, address, service.pid if service else None)
        budget = len(options.clients) * (options.duration + options.warmup + options.timeout)
        done = subprocess.run(
            command,
            cwd=CHECKOUT,
            capture_output=True,
            text=True,
            timeout=budget + 30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the TaskClient load generator failed:\n{done.stderr[-3000:]}")
        figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        if service is not None:
            rss, pss = service.memory_kib()
            figures["pool_rss_mib"] = rss / 1024
            figures["pool_pss_mib"] = pss / 1024
        return figures
    finally:
        if service is not None:
            service.stop()


def scenario_startup(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``startup``."""
    port = free_port()
    service = start_pool_tree(options, directory, port)
    try:
        answered = asyncio.run(all_answer(port, options.count, service.started + 60))
        found = service.wait_for_match(r"All \d+ workers serving, ([0-9.]+) s after start", 30)
        rss, pss = service.memory_kib()
        return {
            "launch_to_all_answering_s": answered - service.started,
            "supervisor_start_to_all_serving_s": float(found.group(1)),
            "rss_mib": rss / 1024,
            "pss_mib": pss / 1024,
            "pss_per_worker_mib": pss / 1024 / options.count,
        }
    finally:
        service.stop()


def scenario_blocking_baseline(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``blocking-baseline``: the tasks inline, one after another."""
    started = time.perf_counter()
    for _ in range(options.inline):
        time.sleep(options.task_seconds)
    measured = time.perf_counter() - started
    return {
        "tasks": float(options.inline),
        "measured_s": measured,
        "projected_total_s": measured * options.tasks_total / options.inline,
    }


#: Every scenario, by the name the command line takes.
SCENARIOS: dict[str, Callable[[argparse.Namespace, str], dict[str, float]]] = {
    "blocking-baseline": scenario_blocking_baseline,
    "emails": scenario_emails,
    "noop-direct": scenario_noop_direct,
    "noop-gateway": scenario_noop_gateway,
    "responsive": scenario_responsive,
    "startup": scenario_startup,
}
