"""
``python -m taskoffload.bench SCENARIO``: measure taskoffload on this machine.

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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["main"]

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

#: Seconds to wait for a started service to serve.
START_TIMEOUT = 90.0

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def twistd_command(*args: str) -> list[str]:
    """The command line running ``twistd -n taskoffload ARGS`` with this interpreter."""
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        return [str(twistd), "-n", "--pidfile=", "taskoffload", *args]
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "taskoffload",
        *args,
    ]


def read_text(path: str) -> str | None:
    """A file's text, or ``None`` if it cannot be read (a process that is gone)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), or ``None`` if it is gone."""
    stat = read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat[stat.rindex(")") + 2]


def children(pid: int) -> list[int]:
    """The live (not zombie) children of ``pid``."""
    text = read_text(f"/proc/{pid}/task/{pid}/children")
    if text is None:
        return []
    return [c for c in map(int, text.split()) if _state(c) not in (None, "Z")]


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) == pgid and _state(int(entry)) not in (None, "Z"):
                found.append(int(entry))
        except ProcessLookupError:
            continue
    return found


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process so far (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the parenthesized command name; utime and stime are 14 and 15.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def group_cpu_seconds(pgid: int) -> dict[int, float]:
    """CPU seconds so far of every process in group ``pgid``, by pid."""
    return {pid: process_cpu_seconds(pid) for pid in group_pids(pgid)}


def machine_cpu_seconds() -> float:
    """CPU seconds all cores of the machine have spent busy (not idle or waiting) so far."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    # guest and guest_nice (9, 10) are already counted in user and nice.
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds this process (every thread of it) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Service:
    """
    One ``twistd -n taskoffload`` process tree, in a session (process group) of
    its own, logging to a file in ``directory``.

    :param args: the arguments after ``taskoffload``.
    :param directory: its working directory, where its log goes.
    :param env: its environment; by default this process's.
    :param name: the log file's name, without ``.log``; by default a unique one.
    """

    def __init__(
        self,
        args: Sequence[str],
        directory: str | Path,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        self.args = list(args)
        name = name or f"twistd-{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = Path(directory) / f"{name}.log"
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                twistd_command(*self.args),
                cwd=directory,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """The ``twistd`` process id, which is also the tree's process group id."""
        return self.process.pid

    def log(self) -> str:
        """Everything the tree logged so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """The ``twistd`` process still runs."""
        return self.process.poll() is None

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        """
        :return: the first match of the regular expression ``pattern`` in the log.
        :raises RuntimeError: if ``twistd`` exits or ``timeout`` s pass first.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log())
            if found:
                return found
            if not self.alive():
                raise RuntimeError(f"twistd exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern!r} in {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.01)

    def pids(self) -> list[int]:
        """The live processes of the tree's process group."""
        return group_pids(self.pid)

    def memory_kib(self) -> tuple[int, int]:
        """Total (RSS, PSS) of the tree in KiB."""
        rss = pss = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        return rss, pss

    def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM to ``twistd`` alone (it stops its workers), then SIGKILL to whatever
        of the process group is left after ``timeout`` s; wait, bounded, until the
        group is gone.

        (Not SIGTERM to the whole group: workers that exit before their supervisor
        has taken its own SIGTERM are restarted, and a restarted one can miss the
        supervisor's SIGTERM and hold the stop for ``--stop-timeout``.)
        """
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            elif not self.alive():
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.05)


class CpuMeter:
    """
    CPU shares over a window: this process, and, when given, a service's ``twistd``
    process and the rest of its group.
    """

    def __init__(self, service_pid: int | None, others: dict[str, int] | None = None) -> None:
        """
        :param service_pid: a started service's ``twistd`` pid (its process group).
        :param others: more processes to report, by the name their figure takes.
        """
        self._service_pid = service_pid
        self._others = others or {}
        self._start: tuple[float, float, float, dict[int, float]] | None = None

    def _snapshot(self) -> tuple[float, float, float, dict[int, float]]:
        group = group_cpu_seconds(self._service_pid) if self._service_pid else {}
        for pid in self._others.values():
            group[pid] = process_cpu_seconds(pid)
        return time.monotonic(), machine_cpu_seconds(), own_cpu_seconds(), group

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self, prefix: str = "", gateway: bool = True) -> dict[str, float]:
        """
        :param gateway: the ``twistd`` process runs the gateway (else it is a
            pool's supervisor, counted with its workers as ``pool``).
        :return: the shares in percent of one core since :meth:`start`.
        """
        assert self._start is not None
        t0, machine0, own0, group0 = self._start
        t1, machine1, own1, group1 = self._snapshot()
        wall = max(t1 - t0, 1e-9)
        figures = {
            f"{prefix}machine_cpu_pct": 100 * (machine1 - machine0) / wall,
            f"{prefix}loadgen_cpu_pct": 100 * (own1 - own0) / wall,
        }
        # Processes that started in the window count from zero.
        used = {pid: cpu - group0.get(pid, 0.0) for pid, cpu in group1.items()}
        for name, pid in self._others.items():
            figures[f"{prefix}{name}_cpu_pct"] = 100 * used.pop(pid, 0.0) / wall
        if self._service_pid:
            top = used.pop(self._service_pid, 0.0)
            rest = sum(used.values())
            if gateway:
                figures[f"{prefix}gateway_cpu_pct"] = 100 * top / wall
                figures[f"{prefix}workers_cpu_pct"] = 100 * rest / wall
            else:
                figures[f"{prefix}pool_cpu_pct"] = 100 * (top + rest) / wall
        return figures


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of sorted values (NaN for none)."""
    if not ordered:
        return math.nan
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def latency_figures(latencies: list[float], prefix: str = "") -> dict[str, float]:
    """p50, p99 and max of latencies in seconds, as milliseconds."""
    ordered = sorted(latencies)
    return {
        f"{prefix}p50_ms": 1000 * percentile(ordered, 0.50),
        f"{prefix}p99_ms": 1000 * percentile(ordered, 0.99),
        f"{prefix}max_ms": 1000 * ordered[-1] if ordered else math.nan,
    }


# Services


def _bench_env(directory: str) -> dict[str, str]:
    """The environment of a started service: the bench tasks module importable."""
    Path(directory, f"{BENCH_TASKS_MODULE}.py").write_text(BENCH_TASKS_SOURCE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (directory, env.get("PYTHONPATH")) if p)
    return env


def start_all(
    options: argparse.Namespace, directory: str, sink: SmtpSink | None = None
) -> tuple[Service, str]:
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
        "--tasks",
        "taskoffload.examples",
        "--tasks",
        BENCH_TASKS_MODULE,
    ]
    if sink is not None:
        args += ["--smtp-host", "127.0.0.1", "--smtp-port", str(sink.port)]
    if options.prefetch:
        args += ["--prefetch", str(options.prefetch)]
    service = Service(args, directory, _bench_env(directory))
    try:
        service.wait_for_log("Gateway listening on", START_TIMEOUT)
        service.wait_for_log(rf"All {options.count} workers serving", START_TIMEOUT)
    except BaseException:
        service.stop()
        raise
    return service, f"ws://127.0.0.1:{port}/ws"


def start_pool(options: argparse.Namespace, directory: str) -> tuple[Service, str]:
    """
    Start ``--role=worker`` with ``--count`` workers; wait until every worker serves.

    :return: the service and its pool address.
    """
    port = free_port()
    service = Service(
        [
            "--role=worker",
            f"--count={options.count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        directory,
    )
    try:
        service.wait_for_log(rf"All {options.count} workers serving", START_TIMEOUT)
    except BaseException:
        service.stop()
        raise
    return service, f"tcp:127.0.0.1:{port}"


@contextlib.contextmanager
def gateway_target(
    options: argparse.Namespace, directory: str, sink: SmtpSink | None = None
) -> Iterator[tuple[str, Service | None]]:
    """The ``--gateway`` URL, or a started role all that ends with the block."""
    if options.gateway:
        yield options.gateway, None
        return
    service, url = start_all(options, directory, sink)
    try:
        yield url, service
    finally:
        service.stop()


class SmtpSink(NamedTuple):
    """A started SMTP sink."""

    port: int
    pid: int


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
            [
                sys.executable,
                "-m",
                "taskoffload.bench",
                "_smtp-sink",
                str(port),
                str(options.task_seconds),
            ],
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


def _smtp_sink_main(port: int, delay: float) -> None:
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


# WebSocket load


def ws_connect(url: str, **options: Any) -> Any:
    """
    Open a WebSocket with the ``websockets`` library (an async context): no
    compression, no pings, no proxy, a deep receive queue, unless ``options``
    (``websockets`` ``connect`` options) say otherwise.
    """
    import websockets
    from websockets.asyncio.client import connect

    if int(websockets.__version__.split(".")[0]) >= 15:
        options.setdefault("proxy", None)  # loopback, whatever the environment says
    options.setdefault("compression", None)
    options.setdefault("ping_interval", None)
    options.setdefault("max_queue", 4096)
    options.setdefault("open_timeout", 30)
    options.setdefault("close_timeout", 2)
    return connect(url, **options)


async def _open_clients(url: str, count: int, stack: contextlib.AsyncExitStack) -> list[Any]:
    """``count`` open WebSocket clients, closed when ``stack`` closes."""
    connections = await asyncio.gather(*(ws_connect(url) for _ in range(count)))
    for ws in connections:
        stack.push_async_callback(ws.close)
    return list(connections)


def _request(request_id: int, function: str, args: dict[str, Any]) -> str:
    return json.dumps({"id": request_id, "function": function, "args": args})


class Burst:
    """The outcome of sending many tasks at once."""

    def __init__(self) -> None:
        self.first_send = 0.0
        self.last_reply = 0.0
        self.results: list[Any] = []
        self.errors: Counter[str] = Counter()

    @property
    def wall(self) -> float:
        return self.last_reply - self.first_send


async def _burst(
    connections: list[Any], total: int, function: str, args: Callable[[int], dict[str, Any]]
) -> Burst:
    """Send ``total`` requests spread over ``connections`` at once; await every reply."""
    burst = Burst()
    shares = [list(range(i, total, len(connections))) for i in range(len(connections)) if i < total]
    frames = [[_request(n, function, args(n)) for n in share] for share in shares]

    async def one(ws: Any, frames: list[str]) -> None:
        for frame in frames:
            await ws.send(frame)
        for _ in frames:
            reply = json.loads(await ws.recv())
            if "result" in reply:
                burst.results.append(reply["result"])
            else:
                burst.errors[reply.get("error", {}).get("code", "?")] += 1
        burst.last_reply = max(burst.last_reply, time.perf_counter())

    burst.first_send = time.perf_counter()
    await asyncio.gather(*(one(ws, f) for ws, f in zip(connections, frames, strict=False)))
    return burst


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
    service: Service | None,
    sink: SmtpSink | None,
    probe: bool,
) -> dict[str, float]:
    function, args = _emails_task(options, service is not None)
    async with contextlib.AsyncExitStack() as stack:
        connections = await _open_clients(url, options.senders, stack)
        if not options.no_warmup:
            await asyncio.wait_for(
                _burst(connections, options.tasks_total, function, args), options.timeout
            )
        meter = CpuMeter(
            service.pid if service else None, {"smtp_sink": sink.pid} if sink else None
        )
        prober = Prober(url, options) if probe else None
        try:
            if prober is not None:
                await prober.start()
            meter.start()
            burst = await asyncio.wait_for(
                _burst(connections, options.tasks_total, function, args), options.timeout
            )
            probed = await prober.stop() if prober is not None else None
        finally:
            if prober is not None:
                prober.kill()
        figures = {"wall_s": burst.wall, "results": float(len(burst.results))}
        figures["errors"] = float(sum(burst.errors.values()))
        if service is not None:
            per_worker = Counter(burst.results)
            figures["max_tasks_per_worker"] = float(max(per_worker.values(), default=0))
            figures["workers_used"] = float(len(per_worker))
        if probed is not None:
            latencies, probe_errors = probed
            figures.update(latency_figures(latencies, "noop_"))
            figures["noop_calls"] = float(len(latencies))
            figures["noop_errors"] = float(probe_errors)
        figures.update(meter.stop())
        return figures


class Prober:
    """
    The ``responsive`` probe: one more WebSocket client, in a process of its own,
    making sequential ``noop`` calls between :meth:`start` and :meth:`stop`.

    Its own process, so that what it measures is the gateway's delay and not the
    load generator's: in the generator's event loop, a call would also wait while
    that loop sends the burst's 1000 frames and reads their replies.
    """

    def __init__(self, url: str, options: argparse.Namespace) -> None:
        self._command = [
            sys.executable,
            "-m",
            "taskoffload.bench",
            "_probe",
            url,
            str(options.max_calls),
        ]
        self._timeout = options.timeout
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the probe process; return once it has connected and is calling."""
        self._process = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), self._timeout)
        if line.strip() != b"calling":
            raise RuntimeError(f"the probe did not start: {line!r}")

    async def stop(self) -> tuple[list[float], int]:
        """Stop calling; return the latencies (seconds) and the count of error replies."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.close()
        out, _ = await asyncio.wait_for(self._process.communicate(), self._timeout)
        figures = json.loads(out.strip().splitlines()[-1])
        return figures["latencies"], figures["errors"]

    def kill(self) -> None:
        """End the probe process if it is still running."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)


def _probe_main(url: str, max_calls: int) -> None:
    """Hidden subcommand: sequential noop calls until standard input closes."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        latencies: list[float] = []
        errors = 0
        async with ws_connect(url) as ws:
            # One call first, so the connection is warm before the measured ones.
            await ws.send(_request(0, "noop", {}))
            await ws.recv()
            print("calling", flush=True)
            closed = asyncio.ensure_future(stdin.read())
            for n in range(1, max_calls + 1):
                if closed.done():
                    break
                sent = time.perf_counter()
                await ws.send(_request(n, "noop", {}))
                reply = json.loads(await ws.recv())
                latencies.append(time.perf_counter() - sent)
                if "result" not in reply:
                    errors += 1
            await closed
        print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)

    asyncio.run(run())


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


class ClosedLoop:
    """
    Clients each with one call in flight, measured over a window that starts after
    a warm-up and ends after ``duration`` seconds or ``max_calls`` calls.
    """

    def __init__(self, duration: float, max_calls: int) -> None:
        self.duration = duration
        self.max_calls = max_calls
        self.measuring = False
        self.stopped = False
        self.latencies: list[float] = []
        self.errors = 0
        self.window = (0.0, 0.0)

    def record(self, sent: float, ok: bool) -> None:
        """Count one call that was answered now."""
        if self.measuring:
            self.latencies.append(time.perf_counter() - sent)
            if not ok:
                self.errors += 1
            if len(self.latencies) >= self.max_calls:
                self.stopped = True

    def figures(self, prefix: str) -> dict[str, float]:
        elapsed = self.window[1] - self.window[0]
        figures = {
            f"{prefix}tasks_per_s": len(self.latencies) / elapsed if elapsed > 0 else 0.0,
            f"{prefix}calls": float(len(self.latencies)),
            f"{prefix}errors": float(self.errors),
        }
        latency = latency_figures(self.latencies, prefix)
        del latency[f"{prefix}max_ms"]
        figures.update(latency)
        return figures


async def _noop_gateway_level(
    url: str, clients: int, options: argparse.Namespace, meter: CpuMeter
) -> dict[str, float]:
    loop_state = ClosedLoop(options.duration, options.max_calls)
    frame = _request(1, "noop", {})

    async def client(ws: Any) -> None:
        while not loop_state.stopped:
            sent = time.perf_counter()
            await ws.send(frame)
            reply = await ws.recv()
            loop_state.record(sent, '"result"' in reply)

    async with contextlib.AsyncExitStack() as stack:
        connections = await _open_clients(url, clients, stack)
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
            figures.update(asyncio.run(_noop_gateway_level(url, clients, options, meter)))
        return figures


# noop-direct: TaskClient needs a reactor, so it runs in a child process.


def scenario_noop_direct(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``noop-direct``."""
    service: Service | None = None
    if options.pool:
        address = options.pool
    else:
        service, address = start_pool(options, directory)
    try:
        command = [
            sys.executable,
            "-m",
            "taskoffload.bench",
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
        ]
        if service is not None:
            command += ["--pgid", str(service.pid)]
        if options.prefetch:
            command += ["--prefetch", str(options.prefetch)]
        budget = len(options.clients) * (options.duration + options.warmup + options.timeout)
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=budget + 30, check=False
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


def _noop_direct_client_main(argv: list[str]) -> None:
    """Hidden subcommand: the ``noop-direct`` load, printed as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m taskoffload.bench _noop-direct-client")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--clients", type=_int_list, required=True)
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--max-calls", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--pgid", type=int)
    parser.add_argument("--prefetch", type=int, default=0)
    options = parser.parse_args(argv)

    from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
    from twisted.internet.task import deferLater, react

    from taskoffload.client import TaskClient, TaskError

    async def level(reactor: Any, clients: int) -> dict[str, float]:
        client = TaskClient(
            reactor, [options.pool], max_connections=max(clients, 1), prefetch=options.prefetch
        )
        loop_state = ClosedLoop(options.duration, options.max_calls)
        meter = CpuMeter(options.pgid)

        async def caller() -> None:
            while not loop_state.stopped:
                sent = time.perf_counter()
                try:
                    await client.call("noop")
                    ok = True
                except TaskError:
                    ok = False
                loop_state.record(sent, ok)

        callers = [ensureDeferred(caller()) for _ in range(clients)]
        await deferLater(reactor, options.warmup, lambda: None)
        meter.start()
        loop_state.measuring = True
        start = time.perf_counter()
        deadline = start + options.duration
        while not loop_state.stopped and time.perf_counter() < deadline:
            await deferLater(
                reactor, min(0.05, max(0.0, deadline - time.perf_counter())), lambda: None
            )
        loop_state.measuring = False
        loop_state.stopped = True
        loop_state.window = (start, time.perf_counter())
        cpu = meter.stop(f"c{clients}_", gateway=False)
        finished: Deferred[Any] = gatherResults(callers)
        finished.addTimeout(options.timeout, reactor)
        await finished
        await client.close()
        figures = loop_state.figures(f"c{clients}_")
        figures.update(cpu)
        return figures

    async def run(reactor: Any) -> None:
        figures: dict[str, float] = {}
        for clients in options.clients:
            figures.update(await level(reactor, clients))
        print(json.dumps(figures), flush=True)

    react(lambda reactor: ensureDeferred(run(reactor)))


def scenario_startup(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``startup``."""
    port = free_port()
    service = Service(
        [
            "--role=worker",
            f"--count={options.count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        directory,
    )
    try:
        answered = asyncio.run(_all_answer(port, options.count, service.started + 60))
        found = service.wait_for_log(r"All \d+ workers serving, ([0-9.]+) s after start", 30)
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


async def call_line(port: int, line: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Open a connection, send one request line, return its decoded reply."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(line)
        reply = await asyncio.wait_for(reader.readline(), timeout)
        result: dict[str, Any] = json.loads(reply)
        return result
    finally:
        writer.close()


async def _all_answer(port: int, count: int, deadline: float) -> float:
    """Seconds (monotonic clock) at which ``count`` distinct workers had answered."""
    # Each call keeps its worker busy for ``hold`` seconds, so ``count`` concurrent
    # calls land on ``count`` different workers once all of them serve.
    hold = 0.3
    line = json.dumps({"function": "whoami", "args": {"delay": hold}}).encode() + b"\n"
    seen: set[int] = set()
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            replies = await asyncio.gather(*(call_line(port, line) for _ in range(count)))
        except OSError:
            await asyncio.sleep(0.01)
            continue
        seen |= {r["result"]["pid"] for r in replies if "result" in r}
        if len(seen) >= count:
            # The calls were answered ``hold`` seconds after the workers took them.
            return sent + (time.monotonic() - sent) - hold
        await asyncio.sleep(0.01)
    raise RuntimeError(f"only {len(seen)} of {count} workers answered in time")


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


SCENARIOS: dict[str, Callable[[argparse.Namespace, str], dict[str, float]]] = {
    "blocking-baseline": scenario_blocking_baseline,
    "emails": scenario_emails,
    "noop-direct": scenario_noop_direct,
    "noop-gateway": scenario_noop_gateway,
    "responsive": scenario_responsive,
    "startup": scenario_startup,
}


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every figure over the runs."""
    summary = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        summary[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return summary


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


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m taskoffload.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m taskoffload.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--repeat", type=_positive(int), default=3, help="runs (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a scenario and print (and optionally save) its figures."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_noop-direct-client"]:
        _noop_direct_client_main(argv[1:])
        return 0
    if argv[:1] == ["_probe"]:
        _probe_main(argv[1], int(argv[2]))
        return 0
    if argv[:1] == ["_smtp-sink"]:
        _smtp_sink_main(int(argv[1]), float(argv[2]))
        return 0
    if argv[:1] == ["faults"]:
        # The fault suite at full size: kill storm, slowloris, hostile
        # input, supervisor crash, idle WebSockets.  See taskoffload.faults.
        from taskoffload import faults

        return faults.main(argv[1:])
    options = build_parser().parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
