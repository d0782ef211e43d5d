"""
Speed as a ratio: taskoffload beside the reference chain of
:mod:`harness.reference`, both measured in the same invocation, the two sides
taking turns to go first from one run to the next.

``compare-gateway``: ``noop`` round trips through role all (the default
``--count``) and through the reference gateway, each with ``--clients`` WebSocket
clients of one call in flight.  Server CPU per task is the whole machine's CPU
minus the load generator's, over the tasks answered.

``compare-worker``: ``noop`` lines over ``--clients`` raw connections to one
worker (``--count=1``) and to the bare echo; CPU per task is that one process's.

``compare-startup``: ``startup`` with ``--count`` workers, beside a parent with
Twisted imported that forks ``--count`` children, each installing a reactor,
listening on a shared socket and reporting: seconds from launch until all
answer (taskoffload) or all have reported (the reference), and PSS per worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import TypeVar

from harness.bench.scenarios import noop_gateway_level, scenario_startup
from harness.bench.services import gateway_target, start_pool_tree
from harness.measure import ClosedLoop, CpuMeter, process_cpu_seconds
from harness.processes import CHECKOUT, free_ports, group_pids, harness_command, memory_kib
from taskoffload.tap import default_count

__all__ = ["scenario_compare_gateway", "scenario_compare_startup", "scenario_compare_worker"]

#: Which side goes first: the reference in even runs, taskoffload in odd ones.
_runs = itertools.count()

#: Seconds a reference process may take to listen.
READY_TIMEOUT = 30.0


@contextlib.contextmanager
def reference_process(*args: str) -> Iterator[int]:
    """Run ``python -m harness.reference ARGS`` until it says ``ready``; :return: its pid."""
    process = subprocess.Popen(
        harness_command("harness.reference", *args),
        cwd=CHECKOUT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT)
        if not readable or process.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the reference {args[0]} did not start")
        yield process.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


T = TypeVar("T")


def _sides(*sides: tuple[str, T]) -> list[tuple[str, T]]:
    """The sides in this run's order."""
    ordered = list(sides)
    return ordered if next(_runs) % 2 == 0 else ordered[::-1]


def _ratios(figures: dict[str, float], clients: list[int], cost: str) -> None:
    """Add each level's ratios (taskoffload over the reference) to ``figures``."""
    for level in clients:
        rate, ref_rate = figures[f"c{level}_tasks_per_s"], figures[f"ref_c{level}_tasks_per_s"]
        figures[f"ratio_c{level}_tasks_per_s"] = rate / ref_rate if ref_rate else 0.0
        us, ref_us = figures[f"c{level}_{cost}"], figures[f"ref_c{level}_{cost}"]
        figures[f"ratio_c{level}_{cost}"] = us / ref_us if ref_us else 0.0


def scenario_compare_gateway(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``compare-gateway``."""
    product = argparse.Namespace(**{**vars(options), "count": default_count()})
    echo_port, reference_port = free_ports(2)
    figures: dict[str, float] = {}
    with (
        reference_process("echo", str(echo_port)),
        reference_process("gateway", str(reference_port), str(echo_port)),
        gateway_target(product, directory) as (url, _),
    ):
        reference = (f"ws://127.0.0.1:{reference_port}/ws", '"function"')
        for prefix, (target, answered) in _sides(("ref_", reference), ("", (url, '"result"'))):
            for level in options.clients:
                measured = asyncio.run(
                    noop_gateway_level(target, level, options, CpuMeter(None), answered)
                )
                rate = measured[f"c{level}_tasks_per_s"]
                server = (
                    measured[f"c{level}_machine_cpu_pct"] - measured[f"c{level}_loadgen_cpu_pct"]
                )
                measured[f"c{level}_server_us_per_task"] = 1e4 * server / rate if rate else 0.0
                figures.update({prefix + key: value for key, value in measured.items()})
    _ratios(figures, options.clients, "server_us_per_task")
    return figures


async def _raw_level(
    port: int, clients: int, options: argparse.Namespace, pid: int
) -> dict[str, float]:
    """``clients`` raw connections sending ``noop`` lines to ``port``, one in flight each."""
    line = b'{"id": 1, "function": "noop", "args": {}}\n'
    loop_state = ClosedLoop(options.duration, options.max_calls)

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not loop_state.stopped:
                sent = time.perf_counter()
                writer.write(line)
                reply = await reader.readline()
                loop_state.record(sent, bool(reply))
                if not reply:
                    return
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    try:
        await asyncio.sleep(0 if options.no_warmup else options.warmup)
        cpu0 = process_cpu_seconds(pid)
        loop_state.measuring = True
        start = time.perf_counter()
        deadline = start + options.duration
        while not loop_state.stopped and time.perf_counter() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.perf_counter())))
        loop_state.measuring = False
        loop_state.stopped = True
        loop_state.window = (start, time.perf_counter())
        used = process_cpu_seconds(pid) - cpu0
        await asyncio.wait_for(asyncio.gather(*tasks), options.timeout)
    finally:
        for t in tasks:
            t.cancel()
    figures = loop_state.figures(f"c{clients}_")
    calls = figures[f"c{clients}_calls"]
    figures[f"c{clients}_process_us_per_task"] = 1e6 * used / calls if calls else 0.0
    return figures


def scenario_compare_worker(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``compare-worker``."""
    echo_port, pool_port = free_ports(2)
    one = argparse.Namespace(**{**vars(options), "count": 1})
    service = start_pool_tree(one, directory, pool_port)
    figures: dict[str, float] = {}
    try:
        service.wait_for_match(r"All 1 workers serving", 60)
        (worker,) = service.worker_pids()
        with reference_process("echo", str(echo_port)) as echo:
            for prefix, (port, pid) in _sides(
                ("ref_", (echo_port, echo)), ("", (pool_port, worker))
            ):
                for level in options.clients:
                    measured = asyncio.run(_raw_level(port, level, options, pid))
                    figures.update({prefix + key: value for key, value in measured.items()})
    finally:
        service.stop()
    _ratios(figures, options.clients, "process_us_per_task")
    return figures


def _reference_startup(count: int) -> dict[str, float]:
    """One launch of the startup reference: seconds until all reported, and its memory."""
    started = time.monotonic()
    with reference_process("forks", str(count)) as pid:
        ready = time.monotonic() - started
        _, pss = memory_kib(group_pids(pid))
    return {
        "ref_launch_to_all_ready_s": ready,
        "ref_pss_mib": pss / 1024,
        "ref_pss_per_worker_mib": pss / 1024 / count,
    }


def scenario_compare_startup(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``compare-startup``."""
    figures: dict[str, float] = {}
    for _, measure in _sides(
        ("ref_", lambda: _reference_startup(options.count)),
        ("", lambda: scenario_startup(options, directory)),
    ):
        figures.update(measure())
    figures["ratio_launch_s"] = (
        figures["launch_to_all_answering_s"] / figures["ref_launch_to_all_ready_s"]
    )
    figures["ratio_pss_per_worker"] = (
        figures["pss_per_worker_mib"] / figures["ref_pss_per_worker_mib"]
    )
    return figures
