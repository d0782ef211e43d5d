"""
The services a benchmark scenario starts: role all or a ``--role=worker`` pool
serving the benchmark tasks, and the SMTP sink of ``--smtp``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from harness.processes import CHECKOUT, TwistdTree, free_port, free_ports, harness_command

__all__ = [
    "BENCH_TASKS_MODULE",
    "START_TIMEOUT",
    "SmtpSink",
    "gateway_target",
    "smtp_sink",
    "smtp_sink_main",
    "start_all",
    "start_pool",
]

#: The tasks the benchmark adds to a pool it starts: like the examples, but their
#: replies name the worker process that ran them.  Written to the run's temporary
#: directory and loaded with ``--tasks`` (the package itself is not changed).
BENCH_TASKS_MODULE = "taskoffload_bench_tasks"
BENCH_TASKS_SOURCE = '''\
"""Benchmark tasks: block like slow I/O, then name the worker that ran them."""

import os
import time

import taskoffload.examples as _examples


def block(seconds):
    time.sleep(float(seconds))
    return os.getpid()


def mail(to, subject, body):
    _examples.send_mail(to=to, subject=subject, body=body)
    return os.getpid()


TASKS = {"bench_block": block, "bench_mail": mail}
'''

#: With ``--lane``: the examples and the bench tasks, but ``noop`` on that lane.
LANE_TASKS_MODULE = "taskoffload_bench_lanes"
LANE_TASKS_SOURCE = '''\
"""The examples and the benchmark tasks, with noop on lane {lane!r}."""

import taskoffload.examples as _examples
from taskoffload.registry import TaskRegistry, task
from taskoffload_bench_tasks import TASKS as _BENCH

TASKS = {{
    name: spec.function
    for name, spec in TaskRegistry.from_functions(
        value for value in vars(_examples).values() if hasattr(value, "__taskoffload_task__")
    ).tasks.items()
    if name != "noop"
}}
TASKS.update(_BENCH)
TASKS["noop"] = task(lane={lane!r})(lambda: None)
'''

#: Seconds to wait for a started service to serve.
START_TIMEOUT = 90.0


def _bench_env(directory: str) -> dict[str, str]:
    """The environment of a started service: the bench tasks module importable."""
    Path(directory, f"{BENCH_TASKS_MODULE}.py").write_text(BENCH_TASKS_SOURCE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (directory, env.get("PYTHONPATH")) if p)
    return env


class SmtpSink(NamedTuple):
    """A started SMTP sink."""

    port: int
    pid: int


def start_all(
    options: argparse.Namespace, directory: str, sink: SmtpSink | None = None
) -> tuple[TwistdTree, str]:
    """
    Start role all (gateway and ``--count`` workers) serving the examples and the
    bench tasks; wait until every worker serves.

    :return: the service and its WebSocket URL.
    """
    port, pool_port = free_ports(2)
    args = [
        f"--count={options.count}",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--pool-listen",
        f"tcp:{pool_port}:interface=127.0.0.1",
    ]
    env = _bench_env(directory)
    lane = getattr(options, "lane", None)
    if lane:
        name = lane.partition("=")[0]
        Path(directory, f"{LANE_TASKS_MODULE}.py").write_text(LANE_TASKS_SOURCE.format(lane=name))
        args += ["--lane", lane, "--tasks", LANE_TASKS_MODULE]
    else:
        args += ["--tasks", "taskoffload.examples", "--tasks", BENCH_TASKS_MODULE]
    if sink is not None:
        args += ["--smtp-host", "127.0.0.1", "--smtp-port", str(sink.port)]
    if options.prefetch:
        args += ["--prefetch", str(options.prefetch)]
    processes = getattr(options, "gateway_processes", 1)
    if processes > 1:
        args += ["--gateway-processes", str(processes)]
    service = TwistdTree(args, directory, env).start()
    try:
        service.wait_for_log("Gateway listening on", START_TIMEOUT)
        for index in range(processes if processes > 1 else 0):
            service.wait_for_match(rf"gateway {index}: .*Gateway listening on", START_TIMEOUT)
        service.wait_for_match(rf"All {options.count} workers serving", START_TIMEOUT)
    except BaseException:
        service.stop()
        raise
    return service, f"ws://127.0.0.1:{port}/ws"


def start_pool_tree(options: argparse.Namespace, directory: str, port: int) -> TwistdTree:
    """:return: ``--role=worker`` with ``--count`` workers on ``port``, started."""
    return TwistdTree(
        [
            "--role=worker",
            f"--count={options.count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        directory,
    ).start()


def start_pool(options: argparse.Namespace, directory: str) -> tuple[TwistdTree, str]:
    """
    Start ``--role=worker`` with ``--count`` workers; wait until every worker serves.

    :return: the service and its pool address.
    """
    port = free_port()
    service = start_pool_tree(options, directory, port)
    try:
        service.wait_for_match(rf"All {options.count} workers serving", START_TIMEOUT)
    except BaseException:
        service.stop()
        raise
    return service, f"tcp:127.0.0.1:{port}"


@contextlib.contextmanager
def gateway_target(
    options: argparse.Namespace, directory: str, sink: SmtpSink | None = None
) -> Iterator[tuple[str, TwistdTree | None]]:
    """The ``--gateway`` URL, or a started role all that ends with the block."""
    if options.gateway:
        yield options.gateway, None
        return
    service, url = start_all(options, directory, sink)
    try:
        yield url, service
    finally:
        service.stop()


@contextlib.contextmanager
def smtp_sink(options: argparse.Namespace, directory: str) -> Iterator[SmtpSink | None]:
    """With ``--smtp``, an SMTP sink in a child process (else None)."""
    if not options.smtp:
        yield None
        return
    port = free_port()
    log_path = Path(directory, f"smtp-{time.monotonic_ns()}.log")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            harness_command("harness.bench", "_smtp-sink", str(port), str(options.task_seconds)),
            cwd=CHECKOUT,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the SMTP sink did not start:\n{log_path.read_text()}")
            time.sleep(0.02)
        yield SmtpSink(port, process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def smtp_sink_main(port: int, delay: float) -> None:
    """Hidden subcommand: accept every mail on ``port`` after ``delay`` seconds each."""
    from aiosmtpd.smtp import SMTP

    class SlowSink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            await asyncio.sleep(delay)
            return "250 OK"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(SlowSink(), hostname="bench-sink"), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
