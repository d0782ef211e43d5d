"""
The benchmark's load clients: WebSocket bursts and probes (asyncio, one coroutine
per simulated client), raw worker-port calls, and the ``TaskClient`` load of
``noop-direct``, which needs a reactor and so runs in a child process.  Every
load loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from harness.measure import ClosedLoop, CpuMeter
from harness.processes import CHECKOUT, harness_command
from harness.websocket import ws_connect

__all__ = [
    "Burst",
    "Prober",
    "all_answer",
    "burst",
    "call_line",
    "noop_direct_load",
    "open_clients",
    "probe_main",
    "request",
]


async def open_clients(url: str, count: int, stack: contextlib.AsyncExitStack) -> list[Any]:
    """``count`` open WebSocket clients, closed when ``stack`` closes."""
    connections = await asyncio.gather(*(ws_connect(url) for _ in range(count)))
    for ws in connections:
        stack.push_async_callback(ws.close)
    return list(connections)


def request(request_id: int, function: str, args: dict[str, Any]) -> str:
    """One request frame."""
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
        """Seconds from the first send to the last reply."""
        return self.last_reply - self.first_send


async def burst(
    connections: list[Any], total: int, function: str, args: Callable[[int], dict[str, Any]]
) -> Burst:
    """Send ``total`` requests spread over ``connections`` at once; await every reply."""
    outcome = Burst()
    shares = [list(range(i, total, len(connections))) for i in range(len(connections)) if i < total]
    frames = [[request(n, function, args(n)) for n in share] for share in shares]

    async def one(ws: Any, frames: list[str]) -> None:
        for frame in frames:
            await ws.send(frame)
        for _ in frames:
            reply = json.loads(await ws.recv())
            if "result" in reply:
                outcome.results.append(reply["result"])
            else:
                outcome.errors[reply.get("error", {}).get("code", "?")] += 1
        outcome.last_reply = max(outcome.last_reply, time.perf_counter())

    outcome.first_send = time.perf_counter()
    await asyncio.gather(*(one(ws, f) for ws, f in zip(connections, frames, strict=False)))
    return outcome


class Prober:
    """
    The ``responsive`` probe: one more WebSocket client, in a process of its own,
    making sequential ``noop`` calls between :meth:`start` and :meth:`stop`.

    Its own process, so that what it measures is the gateway's delay and not the
    load generator's: in the generator's event loop, a call would also wait while
    that loop sends the burst's 1000 frames and reads their replies.
    """

    def __init__(self, url: str, options: argparse.Namespace) -> None:
        self._command = harness_command("harness.bench", "_probe", url, str(options.max_calls))
        self._timeout = options.timeout
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the probe process; return once it has connected and is calling."""
        self._process = await asyncio.create_subprocess_exec(
            *self._command,
            cwd=CHECKOUT,
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


def probe_main(url: str, max_calls: int) -> None:
    """Hidden subcommand: sequential noop calls until standard input closes."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        latencies: list[float] = []
        errors = 0
        async with ws_connect(url) as ws:
            # One call first, so the connection is warm before the measured ones.
            await ws.send(request(0, "noop", {}))
            await ws.recv()
            print("calling", flush=True)
            closed = asyncio.ensure_future(stdin.read())
            for n in range(1, max_calls + 1):
                if closed.done():
                    break
                sent = time.perf_counter()
                await ws.send(request(n, "noop", {}))
                reply = json.loads(await ws.recv())
                latencies.append(time.perf_counter() - sent)
                if "result" not in reply:
                    errors += 1
            await closed
        print(json.dumps({"latencies": latencies, "errors": errors}), flush=True)

    asyncio.run(run())


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


async def all_answer(port: int, count: int, deadline: float) -> float:
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


def noop_direct_load(options: argparse.Namespace) -> None:
    """
    The ``noop-direct`` load, with a ``TaskClient`` on a reactor of this process:
    each ``--clients`` level in turn; print the figures as one JSON line.

    :param options: the hidden subcommand's options (``--pool``, ``--clients``, ...).
    """
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
