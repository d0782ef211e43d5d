"""
The fault suite: scenarios that break things on purpose and
count what callers saw.

Each scenario starts the real ``twistd -n taskoffload`` processes it needs, on
loopback and free ports, each tree in its own session (process group), drives
them with asyncio clients, stops every tree it started, and returns a dict of
counts.  The integration tests run them at small sizes; ``run_all`` and
:func:`main` run them for longer and print the counts::

    python -m taskoffload.faults --duration 10

Scenarios:

:func:`kill_storm`
    Clients keep several requests in flight each through the gateway of a
    role-all tree while a random serving worker is SIGKILLed at a fixed
    interval.  The tasks leave a trace of every run: no request that is not
    ``retry=True`` may run twice, every request must get exactly one final
    reply (a result, or ``worker_lost``, at most 1 + ``--prefetch`` per kill),
    the pool must be whole within 1 s of the last kill with no restart backed
    off, and ``/status`` must agree with what the clients saw.
:func:`slowloris`
    Connections that send a partial line (worker port) or a partial handshake or
    frame (gateway) and stall: a normal client's noop p99 (median of rounds) is
    measured before and during.
:func:`hostile`
    A hand-written corpus and fixed-seed generated inputs on both ports; each
    input must get the documented reply (for generated inputs, the one
    :func:`documented_reply`, a reference model of ``docs/protocol.rst``, gives),
    and no process may die.
:func:`supervisor_crash`
    SIGKILL of a worker pool's supervisor under load (through a separate gateway,
    or from raw worker-port clients): clients get errors, nothing hangs, no
    process of that pool outlives a few seconds, and a pool restarted on the same
    port serves again.
:func:`idle_websockets`
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
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import re
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

from taskoffload import wire
from taskoffload.bench import Service, children, free_ports, group_pids, read_text, ws_connect
from taskoffload.bench import percentile as bench_percentile
from taskoffload.tap import raise_open_files_limit

__all__ = [
    "ANY",
    "OP_TEXT",
    "RawWebSocket",
    "Tree",
    "check_gateway_input",
    "check_worker_input",
    "documented_reply",
    "frame_exchange",
    "generated_inputs",
    "hostile",
    "http_json",
    "idle_websockets",
    "kill_storm",
    "line_exchange",
    "main",
    "problems",
    "raise_open_files_limit",
    "read_trace",
    "run_all",
    "slowloris",
    "supervisor_crash",
    "text_frame",
    "ws_frame",
]

#: Seconds to wait for a started tree to serve.
START_TIMEOUT = 60.0


class FaultSetupError(RuntimeError):
    """A scenario could not set up what it needs (not a finding about the product)."""


# Processes


class Tree(Service):
    """
    One ``twistd -n taskoffload`` process tree (:class:`~taskoffload.bench.Service`,
    constructed as it is) as the fault scenarios use it.
    """

    def wait_for_log(self, text: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until ``text`` is in the log; :raises FaultSetupError: if it never comes."""
        try:
            return super().wait_for_log(re.escape(text), timeout)
        except RuntimeError as e:
            raise FaultSetupError(str(e)) from None

    def worker_pids(self) -> set[int]:
        """The live worker processes (the fork servers' children)."""
        return {pid for server in children(self.pid) for pid in children(server)}


class _Trees:
    """The trees a scenario started, every one stopped when it ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Tree] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Tree:
        """Start a tree with ``args`` and ``env`` (by default this process's environment)."""
        tree = Tree(args, self.directory, env=env, name=f"{name}-{len(self.started)}")
        self.started.append(tree)
        return tree

    def all(
        self, count: int, *extra: str, env: dict[str, str] | None = None
    ) -> tuple[Tree, int, int]:
        """Role all; wait until it serves. :return: the tree, its gateway and pool ports."""
        gateway, pool = free_ports(2)
        tree = self.start(
            "all",
            f"--count={count}",
            "--listen",
            f"tcp:{gateway}:interface=127.0.0.1",
            "--pool-listen",
            f"tcp:{pool}:interface=127.0.0.1",
            *extra,
            env=env,
        )
        tree.wait_for_log("Gateway listening on")
        tree.wait_for_log(f"All {count} workers serving")
        return tree, gateway, pool

    def pool(self, port: int, count: int, *extra: str) -> Tree:
        """Role worker on ``port``; wait until every worker serves."""
        tree = self.start(
            "pool",
            "--role=worker",
            f"--count={count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        )
        tree.wait_for_log(f"All {count} workers serving")
        return tree

    def gateway(self, pool_port: int, *extra: str) -> tuple[Tree, int]:
        """Role gateway to the pool on ``pool_port``. :return: the tree and its port."""
        (port,) = free_ports(1)
        tree = self.start(
            "gateway",
            "--role=gateway",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--pool",
            f"tcp:127.0.0.1:{pool_port}",
            *extra,
        )
        tree.wait_for_log("Gateway listening on")
        return tree, port

    def stop(self) -> None:
        for tree in reversed(self.started):
            tree.stop()


@contextlib.contextmanager
def _trees(directory: str | Path | None, scenario: str) -> Iterator[_Trees]:
    """A place for a scenario's trees and logs (a temporary one unless given)."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            base = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="taskoffload-faults-"))
            )
        else:
            base = Path(directory)
        place = base / scenario
        place.mkdir(parents=True, exist_ok=True)
        trees = _Trees(place)
        try:
            yield trees
        finally:
            trees.stop()


# Small helpers


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank (as the benchmarks count)."""
    return bench_percentile(sorted(values), q)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def http_json(port: int, path: str, timeout: float = 5.0) -> Any:
    """``GET path`` on 127.0.0.1:``port`` (HTTP/1.0); :return: the decoded JSON body."""

    async def get() -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = await reader.read(-1)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"GET {path}: {head[:100]!r}")
        return json.loads(body)

    return await asyncio.wait_for(get(), timeout)


async def _read_status(port: int, timeout: float = 5.0) -> tuple[dict[str, Any] | None, str]:
    """:return: the gateway's ``/status`` and ``""``, or ``None`` and why it cannot be read now."""
    try:
        document: dict[str, Any] = await http_json(port, "/status", timeout)
    except (OSError, asyncio.TimeoutError, ValueError) as e:
        return None, repr(e)
    return document, ""


async def _status(port: int, timeout: float = 5.0) -> dict[str, Any] | None:
    """The gateway's ``/status``, or ``None`` if it cannot be read now."""
    document, _ = await _read_status(port, timeout)
    return document


def _ws_connect(port: int, **options: Any) -> Any:
    """Open a WebSocket to the gateway with the ``websockets`` library (an async context)."""
    try:
        import websockets  # noqa: F401  # only to say what is missing
    except ImportError as e:  # pragma: no cover - an install without the bench extra
        raise FaultSetupError(
            "the fault suite needs websockets: pip install 'taskoffload[bench]'"
        ) from e
    options.setdefault("max_size", 16 * 1024 * 1024)
    return ws_connect(f"ws://127.0.0.1:{port}/ws", **options)


class _Caller:
    """
    A WebSocket caller of the gateway: requests matched to replies by id, with
    the replies that match nothing counted (a duplicate final reply, or an id
    never sent).
    """

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self.answered: set[Any] = set()
        self.duplicates = 0
        self.unknown = 0
        self.progress = 0
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> _Caller:
        return cls(await _ws_connect(port))

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for text in self.ws:
                message = json.loads(text)
                if "progress" in message:
                    self.progress += 1
                    continue
                request_id = message.get("id")
                future = self.waiting.pop(request_id, None)
                if future is None:
                    if request_id in self.answered:
                        self.duplicates += 1
                    else:
                        self.unknown += 1
                    continue
                self.answered.add(request_id)
                if not future.done():
                    future.set_result(message)
        except ConnectionClosed:
            pass
        finally:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the gateway closed the connection"))

    async def call(self, request: dict[str, Any], wait: float) -> dict[str, Any]:
        """
        Send ``request`` (which has an id) and wait at most ``wait`` s for its final reply.

        :raises asyncio.TimeoutError: if none came in time.
        :raises ConnectionError: if the connection closed first.
        """
        future = asyncio.get_running_loop().create_future()
        self.waiting[request["id"]] = future
        await self.ws.send(json.dumps(request))
        # Shielded: after a timeout the id stays waiting, so that a reply arriving
        # later counts as late, not as unknown.
        return await asyncio.wait_for(asyncio.shield(future), wait)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def _noop_latencies(
    caller: _Caller, calls: int, ids: Iterator[int]
) -> tuple[list[float], int]:
    """``calls`` sequential noops. :return: the latencies of the results, and the failures."""
    latencies = []
    failures = 0
    for _ in range(calls):
        started = time.perf_counter()
        try:
            reply = await caller.call({"id": next(ids), "function": "noop"}, 10)
        except (asyncio.TimeoutError, ConnectionError):
            failures += 1
            continue
        if "result" in reply:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1
    return latencies, failures


# A minimal WebSocket client, for what the websockets library will not send


OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    if payload:
        # XOR with the repeated mask, all at once as one big integer.
        repeated = (mask * (length // 4 + 1))[:length]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            length, "big"
        )
    else:
        masked = b""
    return head + mask + masked


def _handshake(path: str = "/ws") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class RawWebSocket:
    """
    A bare RFC 6455 client over asyncio streams: it sends exactly the bytes it is
    told to, so it can send what a real client library refuses to.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        #: The close code the server sent, once it sent one.
        self.close_code: int | None = None
        #: The server reset the connection (a close frame may have been lost).
        self.reset = False

    @classmethod
    async def open(cls, port: int, timeout: float = 10.0) -> RawWebSocket:
        """Connect and complete the opening handshake."""

        async def opening() -> RawWebSocket:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, limit=32 * 1024 * 1024
            )
            writer.write(_handshake())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                writer.close()
                raise ConnectionError(f"handshake refused: {head[:100]!r}")
            return cls(reader, writer)

        return await asyncio.wait_for(opening(), timeout)

    async def send_raw(self, data: bytes, per_write: int | None = None, pause: float = 0.0) -> None:
        """Write ``data``, ``per_write`` bytes at a time (each drained, ``pause`` s apart)."""
        if per_write is None:
            self.writer.write(data)
            await self.writer.drain()
            return
        for start in range(0, len(data), per_write):
            self.writer.write(data[start : start + per_write])
            await self.writer.drain()
            if pause:
                await asyncio.sleep(pause)

    async def send(self, payload: bytes | str, opcode: int | None = None) -> None:
        """Send one unfragmented message (text for ``str``, binary for ``bytes``, unless told)."""
        if isinstance(payload, str):
            payload, default = payload.encode(), OP_TEXT
        else:
            default = OP_BINARY
        await self.send_raw(ws_frame(default if opcode is None else opcode, payload))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """
        The next message, decoded as JSON; pings are answered on the way.

        :return: ``None`` once the server closed the connection (its close code,
            if any, in :attr:`close_code`).
        :raises asyncio.TimeoutError: if nothing came within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            try:
                opcode, fin, payload = await asyncio.wait_for(
                    self._frame(), max(deadline - time.monotonic(), 0.001)
                )
            except ConnectionResetError:
                self.reset = True
                return None
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == OP_PING:
                with contextlib.suppress(ConnectionError):
                    self.writer.write(ws_frame(OP_PONG, payload))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                with contextlib.suppress(ConnectionError, RuntimeError):
                    self.writer.write(ws_frame(OP_CLOSE, payload[:2]))
                return None
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                try:
                    decoded: dict[str, Any] = json.loads(data)
                except ValueError:
                    return {"unreadable": data[:200].decode("utf-8", "replace")}
                return decoded

    async def _frame(self) -> tuple[int, bool, bytes]:
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        mask = await self.reader.readexactly(4) if second & 0x80 else b""
        payload = await self.reader.readexactly(length)
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return first & 0x0F, bool(first & 0x80), payload

    def abort(self) -> None:
        """Drop the connection without a closing handshake."""
        transport = self.writer.transport
        transport.abort()  # type: ignore[attr-defined]  # a socket transport


# 1. The kill storm

#: The module of traced tasks the kill storm writes into its directory and serves.
TRACED_MODULE = "taskoffload_faults_traced"
#: The environment variable naming the trace file the traced tasks append to.
TRACE_VARIABLE = "TASKOFFLOAD_FAULTS_TRACE"
#: The traced tasks: each run appends ``TOKEN\n`` to the trace file as it starts (so a
#: run its worker's death cut short counts too), then returns the token.
_TRACED_SOURCE = '''"""
The fault suite's traced tasks (written by taskoffload.faults; do not edit): each
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
    with _trees(directory, "kill_storm") as trees:
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
    once = [t for t, f in requests.items() if f in _ONCE_TASKS and executions.get(t, 0) > 1]
    counts.update(
        {
            "in_flight": in_flight,
            "prefetch": prefetch,
            "executions": sum(executions.values()),
            "ran_twice": len(once),
            "ran_twice_tokens": sorted(once)[:10],
            "retry_ran_thrice": sum(
                1 for t, f in requests.items() if f == _RETRY_TASK and executions.get(t, 0) > 2
            ),
            "results_not_run": sum(1 for t in answered if not executions.get(t)),
            "ran_unsent": sum(1 for t in executions if t not in requests),
        }
    )
    return counts


async def _kill_storm(
    tree: Tree,
    port: int,
    duration: float,
    clients: int,
    in_flight: int,
    count: int,
    kill_interval: float,
    deadline: float,
    rng: random.Random,
) -> dict[str, Any]:
    before, before_error = await _read_status(port)
    callers = await asyncio.gather(*(_Caller.open(port) for _ in range(clients)))
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    requests: dict[str, str] = {}  # token: function
    answered_with_result: set[str] = set()  # tokens
    wrong_results = 0
    stop_at = time.monotonic() + duration

    async def sender(index: int, caller: _Caller, ids: Iterator[int]) -> None:
        nonlocal wrong_results
        for request_id in ids:  # bounded; the clock ends it long before
            if time.monotonic() >= stop_at:
                return
            token = f"{index}.{request_id}"
            draw = rng.random()
            function = (
                "traced_noop" if draw < 0.4 else "traced_sleep" if draw < 0.8 else _RETRY_TASK
            )
            args: list[Any] = [token] if function == "traced_noop" else [token, 0.02]
            request = {"id": request_id, "function": function, "args": args, "timeout": deadline}
            started = time.monotonic()
            requests[token] = function
            try:
                reply = await caller.call(request, deadline + 2.0)
            except asyncio.TimeoutError:
                outcomes["missing"] += 1
                continue
            except ConnectionError:
                outcomes["connection_closed"] += 1
                return
            latencies.append(time.monotonic() - started)
            if "result" in reply:
                outcomes["results"] += 1
                answered_with_result.add(token)
                if reply["result"] != token:
                    wrong_results += 1
            else:
                code = str((reply.get("error") or {}).get("code"))
                outcomes[f"error:{code}"] += 1

    killed: dict[int, float] = {}  # pid: when
    last_kill = time.monotonic()
    skips = 0
    recovery: float | None = None

    async def killer() -> None:
        nonlocal last_kill, skips, recovery
        next_kill = time.monotonic() + kill_interval
        while next_kill < stop_at:
            await asyncio.sleep(max(next_kill - time.monotonic(), 0))
            next_kill += kill_interval
            document = await _status(port, timeout=kill_interval)
            workers = ((document or {}).get("pool") or {}).get("workers", [])
            serving = sorted(
                w["pid"] for w in workers if w.get("state") == "serving" and w["pid"] not in killed
            )
            if not serving:
                skips += 1
                continue
            victim = rng.choice(serving)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
                last_kill = killed[victim] = time.monotonic()
        recovery = await _recovery(port, count, set(killed), last_kill, limit=15.0)

    senders = []
    for index, caller in enumerate(callers):
        ids = iter(range(1_000_000))  # shared by the caller's senders: ids unique on it
        senders += [sender(index, caller, ids) for _ in range(in_flight)]
    await asyncio.gather(killer(), *senders)
    await asyncio.sleep(0.3)  # a duplicate reply would arrive now
    after, after_error = await _read_status(port)
    status_errors = [
        f"/status could not be read {when}: {error}"
        for when, error in (("before the storm", before_error), ("after it", after_error))
        if error
    ]
    duplicates = sum(c.duplicates for c in callers)
    unknown = sum(c.unknown for c in callers)
    await asyncio.gather(*(c.close() for c in callers))
    errors = {k[6:]: v for k, v in outcomes.items() if k.startswith("error:")}
    delays = _restart_delays(tree.log())
    return {
        "duration_s": duration,
        "clients": len(callers),
        "sent": len(requests),
        "sent_by_function": dict(Counter(requests.values())),
        "results": outcomes["results"],
        "worker_lost": errors.pop(wire.WORKER_LOST, 0),
        "other_errors": errors,
        "wrong_results": wrong_results,
        "duplicates": duplicates,
        "unknown": unknown,
        "missing": outcomes["missing"],
        "connection_closed": outcomes["connection_closed"],
        "deadline_s": deadline,
        "late": sum(1 for x in latencies if x > deadline),
        "max_latency_s": round(max(latencies, default=0.0), 3),
        "p99_latency_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "latency_limit_s": round(LATENCY_FACTOR * DOCUMENTED_MAX_LATENCY_S, 3),
        "kill_interval_s": kill_interval,
        "kills": len(killed),
        "kill_skips": skips,
        "recovery_s": recovery,
        "backoff_restarts": sum(1 for pid in killed if delays.get(pid, 0.0) > 0),
        "max_restart_delay_s": max((delays.get(pid, 0.0) for pid in killed), default=0.0),
        "unexpected_exits": sum(1 for pid in delays if pid not in killed),
        # Deltas only when both were read: an unreadable "before" would make them totals.
        "status": {} if before is None or after is None else _status_delta(before, after),
        "status_error": "; ".join(status_errors) or None,
        "twistd_alive": tree.alive(),
        "requests": requests,
        "answered_with_result": answered_with_result,
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
        document = await _status(port)
        pool = (document or {}).get("pool") or {}
        pids = {w.get("pid") for w in pool.get("workers", [])}
        if pool.get("serving") == count and pool.get("alive") == count and not pids & killed:
            return round(time.monotonic() - since, 3)
        await asyncio.sleep(0.01)
    return None


# 2. Slowloris


_PARTIAL_LINE = b'{"id": 1, "function": "noop", "args": {"x": "'
_PARTIAL_HANDSHAKE = b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Up"


def slowloris(
    connections: int = 500,
    *,
    calls: int = 200,
    rounds: int = 5,
    count: int = 8,
    idle_timeout: float | None = None,
    slack_ms: float = 1.0,
    directory: str | Path | None = None,
) -> dict[str, Any]:
    """
    A normal client's noop latency, unloaded and then with ``connections``
    stalled connections on the worker port (each sent a partial line) and as
    many on the gateway (half of them a partial HTTP handshake, half a complete
    handshake and then half a frame).

    Two normal clients, each making ``calls`` sequential noop calls per round:
    a WebSocket client of the gateway (``gateway_*`` figures), and a worker-port
    client that opens a new connection for every call (``direct_*``), which
    must get through the accept queue each time.  Each figure is the median of
    ``rounds`` rounds, unloaded and loaded alike, so that one scheduling hiccup
    of this shared machine does not decide it, nor one lucky round.

    :param idle_timeout: passed as ``--idle-timeout`` (the loaded rounds must end
        before it); when given, the scenario then waits for the worker to close
        the stalled worker-port connections and counts them.
    :return: ``gateway_unloaded_p50_ms``, ``gateway_unloaded_p99_ms``,
        ``gateway_loaded_p50_ms``, ``gateway_loaded_p99_ms``, ``gateway_limit_ms``
        (2 x the unloaded p99 + ``slack_ms``, for sub-millisecond figures on a
        shared machine), the same for ``direct_``; ``slack_ms``;
        ``normal_failures``; ``stalled_worker_port`` and ``stalled_gateway``
        (still open after the loaded rounds); with ``idle_timeout``,
        ``closed_by_idle_timeout`` and ``answered_bad_request``.
    """
    raise_open_files_limit()
    extra = () if idle_timeout is None else ("--idle-timeout", str(idle_timeout))
    with _trees(directory, "slowloris") as trees:
        tree, gateway, pool = trees.all(count, *extra)
        result = asyncio.run(_slowloris(gateway, pool, connections, calls, rounds, idle_timeout))
        result["twistd_alive"] = tree.alive()
    result["slack_ms"] = slack_ms
    for kind in ("gateway", "direct"):
        unloaded = result[f"{kind}_unloaded_p99_ms"]
        result[f"{kind}_limit_ms"] = None if unloaded is None else round(2 * unloaded + slack_ms, 3)
    return result


async def _open_bounded(
    opener: Callable[[], Awaitable[Any]], count: int, concurrency: int
) -> tuple[list[Any], int]:
    """Run ``opener`` ``count`` times, ``concurrency`` at once. :return: the opened, the failures."""
    gate = asyncio.Semaphore(concurrency)
    failures = 0

    async def one() -> Any:
        nonlocal failures
        async with gate:
            try:
                return await asyncio.wait_for(opener(), 30)
            except (OSError, asyncio.TimeoutError):
                failures += 1
                return None

    opened = await asyncio.gather(*(one() for _ in range(count)))
    return [o for o in opened if o is not None], failures


async def _direct_latencies(port: int, calls: int) -> tuple[list[float], int]:
    """``calls`` sequential noops, each on a new worker-port connection."""
    latencies = []
    failures = 0
    for request_id in range(calls):
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        except (OSError, asyncio.TimeoutError):
            failures += 1
            continue
        try:
            writer.write(b'{"id": %d, "function": "noop"}\n' % request_id)
            line = await asyncio.wait_for(reader.readline(), 10)
            if json.loads(line) == {"id": request_id, "result": None}:
                latencies.append(time.perf_counter() - started)
            else:
                failures += 1
        except (OSError, ValueError, asyncio.TimeoutError):
            failures += 1
        finally:
            writer.close()
    return latencies, failures


async def _slowloris(
    gateway: int,
    pool: int,
    connections: int,
    calls: int,
    rounds: int,
    idle_timeout: float | None,
) -> dict[str, Any]:
    ids = iter(range(10**9))
    normal = await _Caller.open(gateway)
    await _noop_latencies(normal, 30, ids)  # warm up the gateway's connections to the pool
    failures = 0
    figures: dict[str, list[list[float]]] = {
        "gateway_unloaded": [],
        "direct_unloaded": [],
        "gateway_loaded": [],
        "direct_loaded": [],
    }

    async def measure(load: str) -> None:
        nonlocal failures
        for _ in range(rounds):
            latencies, failed = await _noop_latencies(normal, calls, ids)
            figures[f"gateway_{load}"].append(latencies)
            failures += failed
            latencies, failed = await _direct_latencies(pool, calls)
            figures[f"direct_{load}"].append(latencies)
            failures += failed

    await measure("unloaded")

    async def stall_line() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", pool)
        writer.write(_PARTIAL_LINE)
        await writer.drain()
        return reader, writer

    async def stall_handshake() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway)
        writer.write(_PARTIAL_HANDSHAKE)
        await writer.drain()
        return reader, writer

    async def stall_frame() -> RawWebSocket:
        ws = await RawWebSocket.open(gateway)
        frame = ws_frame(OP_TEXT, b'{"id": 1, "function": "noop"}')
        await ws.send_raw(frame[: len(frame) // 2])
        return ws

    opened_at = time.monotonic()
    lines, line_failures = await _open_bounded(stall_line, connections, 50)
    handshakes, handshake_failures = await _open_bounded(stall_handshake, connections // 2, 50)
    frames, frame_failures = await _open_bounded(stall_frame, connections - connections // 2, 50)
    await asyncio.sleep(0.5)  # let the accepting settle
    await measure("loaded")
    loaded_s = time.monotonic() - opened_at

    def still_open(reader: asyncio.StreamReader) -> bool:
        return not reader.at_eof() and not reader.exception()

    result: dict[str, Any] = {
        "connections": connections,
        "calls": calls,
        "rounds": rounds,
    }
    for name, runs in figures.items():
        # The median of the rounds: one hiccup of a shared machine does not decide
        # a figure, and neither does one lucky round.
        p50s = [statistics.median(r) for r in runs if r]
        p99s = [percentile(r, 0.99) for r in runs if r]
        result[f"{name}_p50_ms"] = _ms(statistics.median(p50s)) if p50s else None
        result[f"{name}_p99_ms"] = _ms(statistics.median(p99s)) if p99s else None
    result.update(
        {
            "normal_failures": failures,
            "open_failures": line_failures + handshake_failures + frame_failures,
            "stalled_worker_port": sum(1 for r, _ in lines if still_open(r)),
            "stalled_gateway": sum(1 for r, _ in handshakes if still_open(r))
            + sum(1 for ws in frames if still_open(ws.reader)),
            "loaded_s": round(loaded_s, 2),
        }
    )
    if idle_timeout is not None:
        # Every partial line is answered bad_request and closed after --idle-timeout.
        answered = 0
        closed = 0

        async def outcome(reader: asyncio.StreamReader) -> None:
            nonlocal answered, closed
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                data = await asyncio.wait_for(reader.read(-1), idle_timeout + 10)
                closed += 1
                if b'"code":"bad_request"' in data and b"incomplete message" in data:
                    answered += 1

        await asyncio.gather(*(outcome(r) for r, _ in lines))
        result["closed_by_idle_timeout"] = closed
        result["answered_bad_request"] = answered
    for _, writer in [*lines, *handshakes]:
        writer.transport.abort()  # type: ignore[attr-defined]  # a socket transport
    for ws in frames:
        ws.abort()
    await normal.close()
    return result


# 3. A hostile corpus


class _Any:
    """Matches any value in an expected reply."""

    def __eq__(self, other: object) -> bool:
        return True

    def __repr__(self) -> str:
        return "ANY"


#: A wildcard for expected replies.
ANY: Any = _Any()

#: In an expected reply: this error code is as good as the expected result (a
#: request over a documented bound is answered ``overloaded`` instead).
_OR_ERROR = "or_error"


def _error(code: str, request_id: Any = None) -> dict[str, Any]:
    """An expected error reply: its code and id compared, its message not."""
    return {"id": request_id, "error": code}


def _result(value: Any, request_id: Any = None) -> dict[str, Any]:
    """An expected result, compared exactly (as JSON values)."""
    return {"id": request_id, "result": value}


def _failed(message: str, error_type: str, request_id: Any = None) -> dict[str, Any]:
    """An expected ``task_failed`` reply, its message and type compared exactly."""
    return {
        "id": request_id,
        "error": wire.TASK_FAILED,
        "message": message,
        "type": error_type,
    }


def _result_or(value: Any, code: str, request_id: Any = None) -> dict[str, Any]:
    """An expected result, or else the error ``code``."""
    return {"id": request_id, "result": value, _OR_ERROR: code}


def _matches(reply: dict[str, Any], expected: dict[str, Any]) -> bool:
    """
    Whether ``reply`` (as received) is ``expected`` (as :func:`_error`,
    :func:`_result`, :func:`_failed` or :func:`_result_or` give, or
    ``{"session": ANY}``).  Ids and results compare as JSON values: ``1`` and
    ``1.0`` differ, and so do ``1`` and ``true``.
    """
    if "session" in expected:
        return set(reply) == {"session"} and _same_json(reply["session"], expected["session"])
    if "id" not in reply or not _same_json(reply["id"], expected["id"]):
        return False
    error = reply.get("error")
    if "error" in expected:
        if set(reply) != {"id", "error"} or not isinstance(error, dict):
            return False
        if error.get("code") != expected["error"] or not isinstance(error.get("message"), str):
            return False
        if "message" in expected:
            return error.get("message") == expected["message"] and _same_json(
                error.get("type"), expected["type"]
            )
        return True
    if "result" in reply:
        return set(reply) == {"id", "result"} and _same_json(reply["result"], expected["result"])
    return (
        _OR_ERROR in expected
        and set(reply) == {"id", "error"}
        and isinstance(error, dict)
        and error.get("code") == expected[_OR_ERROR]
    )


def _same_json(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same JSON value (:data:`ANY` matching any):
    numbers are equal and both integers or both not, ``true`` is not ``1``."""
    if a is ANY or b is ANY:
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _compare(replies: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[str]:
    """Problems with ``replies`` against ``expected``, matched in any order."""
    left = list(replies)
    problems = []
    for want in expected:
        for i, got in enumerate(left):
            if _matches(got, want):
                del left[i]
                break
        else:
            problems.append(f"no reply like {want!r}")
    if left:
        problems.append(f"unexpected replies: {_short(left)}")
    return problems


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


_SENTINEL = b'{"id": "sentinel", "function": "noop"}'


async def _read_lines(
    reader: asyncio.StreamReader, count: int, timeout: float
) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``count`` reply lines. :return: them, and whether the server closed the connection."""
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(replies) < count:
        try:
            line = await asyncio.wait_for(
                reader.readline(), max(deadline - time.monotonic(), 0.001)
            )
        except asyncio.TimeoutError:
            return replies, False
        except (ConnectionError, ValueError):
            return replies, True
        if not line.endswith(b"\n"):
            return replies, True
        try:
            replies.append(json.loads(line))
        except ValueError:
            replies.append({"unreadable": line[:200].decode("utf-8", "replace")})
    return replies, False


async def line_exchange(
    port: int,
    data: bytes,
    expected: list[dict[str, Any]],
    *,
    closes: bool = False,
    per_write: int | None = None,
    timeout: float = 15.0,
) -> list[str]:
    """
    Send ``data`` on a new connection to the worker port and check what comes back.

    :param expected: the replies ``data`` must get, in any order.
    :param closes: the worker must then close the connection; otherwise a noop
        sent after ``data`` must be answered, with nothing else before it.
    :param per_write: write that many bytes at a time (each drained, 1 ms apart).
    :return: the problems found; empty if all is as documented.
    """
    problems: list[str] = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=32 * 1024 * 1024)
    try:
        sending = asyncio.create_task(_write(writer, data, per_write))
        replies, closed = await _read_lines(reader, len(expected), timeout)
        with contextlib.suppress(OSError):
            await asyncio.wait_for(sending, timeout)
        problems += _compare(replies, expected)
        if closes:
            if not closed:
                more, closed = await _read_lines(reader, 1, 5.0)
                if more:
                    problems.append(f"more replies before the close: {_short(more)}")
            if not closed:
                problems.append("the connection was not closed")
        elif closed:
            problems.append("the connection was closed")
        else:
            writer.write(_SENTINEL + b"\n")
            extra: list[dict[str, Any]] = []
            for _ in range(len(expected) + 10):
                more, closed = await _read_lines(reader, 1, timeout)
                if not more:
                    problems.append("no answer to a noop sent after it")
                    break
                if more[0] == {"id": "sentinel", "result": None}:
                    break
                extra += more
            if extra:
                problems.append(f"unexpected replies: {_short(extra)}")
    except OSError as e:
        problems.append(f"connection error: {e!r}")
    finally:
        writer.transport.abort()  # type: ignore[attr-defined]  # a socket transport
    return problems


async def _write(writer: asyncio.StreamWriter, data: bytes, per_write: int | None) -> None:
    if per_write is None:
        writer.write(data)
        await writer.drain()
        return
    for start in range(0, len(data), per_write):
        writer.write(data[start : start + per_write])
        await writer.drain()
        await asyncio.sleep(0.001)


# A gateway exchange: what to send, on one new WebSocket connection.
_Send = Callable[[RawWebSocket], Coroutine[Any, Any, None]]


async def frame_exchange(
    port: int,
    send: _Send,
    expected: list[dict[str, Any]],
    *,
    close_code: int | None = None,
    timeout: float = 15.0,
) -> list[str]:
    """
    Open a WebSocket to the gateway, ``send`` on it, and check what comes back.

    :param expected: the replies that must come, in any order.
    :param close_code: the gateway must then close the connection with this
        code (or reset it, when it closes while we still send: the close frame
        is then lost); if ``None``, a noop sent afterwards must be answered,
        with nothing else before it.
    :return: the problems found.
    """
    problems: list[str] = []
    try:
        ws = await RawWebSocket.open(port)
    except (OSError, asyncio.TimeoutError) as e:
        return [f"could not open a WebSocket: {e!r}"]
    try:
        sending = asyncio.create_task(send(ws))
        replies: list[dict[str, Any]] = []
        closed = False
        deadline = time.monotonic() + timeout
        while len(replies) < len(expected):
            try:
                reply = await ws.recv(max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                break
            if reply is None:
                closed = True
                break
            if "progress" not in reply:
                replies.append(reply)
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(sending, timeout)
        problems += _compare(replies, expected)
        if close_code is not None:
            if not closed:
                with contextlib.suppress(asyncio.TimeoutError):
                    more = await ws.recv(5.0)
                    closed = more is None
                    if more is not None:
                        problems.append(f"more replies before the close: {_short(more)}")
            if not closed:
                problems.append("the connection was not closed")
            elif ws.close_code != close_code and not ws.reset:
                problems.append(f"closed with code {ws.close_code}, not {close_code}")
        elif closed:
            problems.append(f"the connection was closed (code {ws.close_code})")
        else:
            await ws.send(_SENTINEL.decode())
            extra = []
            for _ in range(len(expected) + 10):
                try:
                    more = await ws.recv(timeout)
                except asyncio.TimeoutError:
                    more = None
                if more is None:
                    problems.append("no answer to a noop sent after it")
                    break
                if more == {"id": "sentinel", "result": None}:
                    break
                if "progress" not in more:
                    extra.append(more)
            if extra:
                problems.append(f"unexpected replies: {_short(extra)}")
    except OSError as e:
        problems.append(f"connection error: {e!r}")
    finally:
        ws.abort()
    return problems


def text_frame(payload: bytes) -> _Send:
    """For :func:`frame_exchange`: send ``payload`` as one text frame, valid UTF-8 or not."""

    async def send(ws: RawWebSocket) -> None:
        await ws.send(payload, OP_TEXT)

    return send


def _binary(payload: bytes) -> _Send:
    async def send(ws: RawWebSocket) -> None:
        await ws.send(payload, OP_BINARY)

    return send


def _text_frames(payloads: Sequence[bytes]) -> _Send:
    """Send each payload as a text frame, all in one write."""

    async def send(ws: RawWebSocket) -> None:
        await ws.send_raw(b"".join(ws_frame(OP_TEXT, p) for p in payloads))

    return send


def _fragmented(payload: bytes, size: int = 1) -> _Send:
    """One text message in fragments of ``size`` bytes: a text frame, then continuations."""

    async def send(ws: RawWebSocket) -> None:
        chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
        frames = [
            ws_frame(OP_TEXT if i == 0 else OP_CONTINUATION, chunk, fin=i == len(chunks) - 1)
            for i, chunk in enumerate(chunks)
        ]
        await ws.send_raw(b"".join(frames))

    return send


def _byte_by_byte(payload: bytes) -> _Send:
    """One text frame written one byte per write."""

    async def send(ws: RawWebSocket) -> None:
        await ws.send_raw(ws_frame(OP_TEXT, payload), per_write=1, pause=0.001)

    return send


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _request(request_id: Any, function: str, args: Any = None, **fields: Any) -> bytes:
    message: dict[str, Any] = {"id": request_id, "function": function, **fields}
    if args is not None:
        message["args"] = args
    return json.dumps(message).encode()


class _Case:
    """
    One hand-written input: ``payload`` as one line (worker port) and as one text
    frame (gateway), and the replies each must get.
    """

    def __init__(
        self,
        name: str,
        payload: bytes,
        expected: list[dict[str, Any]],
        gateway: list[dict[str, Any]] | None = None,
        gateway_close: int | None = None,
    ) -> None:
        self.name = name
        self.payload = payload
        self.expected = expected
        self.gateway = expected if gateway is None else gateway
        self.gateway_close = gateway_close


BAD = [_error(wire.BAD_REQUEST)]
NOOP = b'{"id": 1, "function": "noop"}'
DEEP = b"[" * 10000 + b"]" * 10000
HUGE_INT = b"1" + b"0" * 5000


def _corpus() -> list[_Case]:
    """The hand-written inputs sent, each alone, on both ports."""
    nested_300 = _nested(300)
    long_text = "a" * 900_000
    cases = [
        # Deep nesting.
        _Case("10000 [ then 10000 ]", DEEP, BAD),
        _Case("10000 [ unclosed", b"[" * 10000, BAD),
        _Case(
            "10000 levels in args",
            b'{"id": 1, "function": "echo", "args": {"x": ' + DEEP + b"}}",
            BAD,
        ),
        _Case(
            "300 levels echoed",
            _request(1, "echo", {"x": nested_300}),
            [_result({"x": nested_300}, 1)],
        ),
        # Read, but too deep to write again: the worker runs the task and cannot
        # encode its result; the gateway cannot encode the request for the pool.
        _Case(
            "1000 levels",
            b'{"id": 1, "function": "echo", "args": {"x": '
            + b"[" * 1000
            + b"0"
            + b"]" * 1000
            + b"}}",
            [_error(wire.TASK_FAILED, 1)],
            [_error(wire.BAD_REQUEST, 1)],
        ),
        # Huge numbers.
        _Case("1e999999 as the id", b'{"id": 1e999999, "function": "noop"}', BAD),
        _Case(
            "1e999999 as an argument",
            b'{"id": 1, "function": "echo", "args": {"x": 1e999999}}',
            BAD,
        ),
        _Case(
            "a 5001-digit integer as the id", b'{"id": ' + HUGE_INT + b', "function": "noop"}', BAD
        ),
        _Case(
            "a 5001-digit integer as an argument",
            b'{"id": 1, "function": "echo", "args": {"x": ' + HUGE_INT + b"}}",
            BAD,
        ),
        _Case("NaN", b'{"id": 1, "function": "echo", "args": {"x": NaN}}', BAD),
        _Case("Infinity", b'{"id": 1, "function": "echo", "args": {"x": -Infinity}}', BAD),
        _Case(
            "1e-400 underflows to 0",
            b'{"id": 1, "function": "echo", "args": {"x": 1e-400}}',
            [_result({"x": 0.0}, 1)],
        ),
        _Case("2**64 - 1 exactly", _request(2**64 - 1, "noop"), [_result(None, 2**64 - 1)]),
        _Case("-2**63 exactly", _request(-(2**63), "noop"), [_result(None, -(2**63))]),
        # NUL bytes.
        _Case("a NUL after the object", NOOP + b"\x00", BAD),
        _Case("100 NULs", b"\x00" * 100, BAD),
        _Case("a raw NUL in a string", b'{"id": "a\x00b", "function": "noop"}', BAD),
        _Case(
            "an escaped NUL in the id and the arguments",
            b'{"id": "a\\u0000b", "function": "echo", "args": {"s": "\\u0000"}}',
            [_result({"s": "\x00"}, "a\x00b")],
        ),
        # Invalid UTF-8: bad_request on the worker port; a text frame that is not
        # UTF-8 fails the WebSocket connection (RFC 6455 section 8.1: close code 1007).
        _Case(
            "\\xff in a string",
            b'{"id": 1, "function": "echo", "args": {"s": "\xff\xfe"}}',
            BAD,
            [],
            1007,
        ),
        _Case(
            "an overlong encoding",
            b'{"id": 1, "function": "echo", "args": {"s": "\xc0\xaf"}}',
            BAD,
            [],
            1007,
        ),
        _Case(
            "an encoded surrogate",
            b'{"id": 1, "function": "echo", "args": {"s": "\xed\xa0\x80"}}',
            BAD,
            [],
            1007,
        ),
        _Case("a truncated sequence", b'{"id": 1, "function": "noop"}\xe2\x82', BAD, [], 1007),
        _Case(
            "an escaped lone surrogate",
            b'{"id": 1, "function": "echo", "args": {"s": "\\ud800"}}',
            BAD,
        ),
        _Case("a byte-order mark", b"\xef\xbb\xbf" + NOOP, BAD),
        # Not requests.
        _Case("an empty message", b"", BAD),
        _Case("blanks", b" \t ", BAD),
        _Case("an array", b"[]", BAD),
        _Case("a string", b'"noop"', BAD),
        _Case("a number", b"1", BAD),
        _Case("null", b"null", BAD),
        _Case("true", b"true", BAD),
        _Case("garbage after the object", NOOP + b" x", BAD),
        _Case("two objects on one line", NOOP + NOOP, BAD),
        _Case("no function", b'{"id": 1}', [_error(wire.BAD_REQUEST, 1)]),
        _Case("function not a string", b'{"id": 1, "function": 7}', [_error(wire.BAD_REQUEST, 1)]),
        _Case(
            "an unknown field",
            b'{"id": 1, "function": "noop", "method": "x"}',
            [_error(wire.BAD_REQUEST, 1)],
        ),
        _Case(
            "timeout 0",
            b'{"id": 1, "function": "noop", "timeout": 0}',
            [_error(wire.BAD_REQUEST, 1)],
        ),
        _Case(
            "timeout true",
            b'{"id": 1, "function": "noop", "timeout": true}',
            [_error(wire.BAD_REQUEST, 1)],
        ),
        _Case("timeout 1e300", _request(1, "noop", timeout=1e300), [_result(None, 1)]),
        _Case("timeout 2**64 - 1", _request(1, "noop", timeout=2**64 - 1), [_result(None, 1)]),
        _Case("an unknown function", _request(1, "nope"), [_error(wire.UNKNOWN_FUNCTION, 1)]),
        _Case(
            "a dotted function name",
            _request(1, "os.system", ["true"]),
            [_error(wire.UNKNOWN_FUNCTION, 1)],
        ),
        _Case(
            "arguments that do not bind",
            _request(1, "sleep", {"secs": 1}),
            [_error(wire.BAD_ARGUMENTS, 1)],
        ),
        _Case(
            "progress passed by the caller",
            _request(1, "noop", {"progress": 1}),
            [_error(wire.BAD_ARGUMENTS, 1)],
        ),
        _Case(
            "a batch",
            _request(1, "echo", batch=[{"a": 1}]),
            [_error(wire.BAD_REQUEST, 1)],
            [_result([{"result": {"a": 1}}], 1)],
        ),
        _Case("an empty batch", _request(1, "echo", batch=[]), [_error(wire.BAD_REQUEST, 1)]),
        _Case("a cancel of nothing", b'{"cancel": "nope"}', []),
        _Case("a cancel of true", b'{"cancel": true}', BAD),
        _Case("a cancel with more fields", b'{"cancel": 1, "id": 1}', BAD),
        _Case(
            "a session line",
            b'{"session": {}}',
            [{"session": ANY}],
            [_error(wire.BAD_REQUEST)],
        ),
        _Case("a bad session option", b'{"session": {"reject_when_busy": 1}}', BAD),
        _Case("a key given twice", b'{"id": 1, "id": 2, "function": "noop"}', [_result(None, 2)]),
        _Case(
            "900 kB of text echoed",
            _request(1, "echo", {"s": long_text}),
            [_result({"s": long_text}, 1)],
        ),
        _Case("a \\r before the newline", NOOP + b"\r", [_result(None, 1)]),
    ]
    # Ids of every JSON type: strings and numbers come back unchanged; null is
    # "no id"; booleans, objects and arrays are refused.
    for request_id, expected in [
        ("abc", [_result(None, "abc")]),
        ("", [_result(None, "")]),
        (7, [_result(None, 7)]),
        (-3, [_result(None, -3)]),
        (1.5, [_result(None, 1.5)]),
        (1e300, [_result(None, 1e300)]),
        (None, [_result(None, None)]),
        (True, BAD),
        (False, BAD),
        ({"a": 1}, BAD),
        ([1], BAD),
    ]:
        cases.append(_Case(f"id {json.dumps(request_id)}", _request(request_id, "noop"), expected))
    return cases


async def _worker_corpus(port: int) -> tuple[int, list[tuple[str, str]]]:
    """The corpus and the worker-port-only inputs. :return: inputs checked, (case, problem)s."""
    checked = 0
    found: list[tuple[str, str]] = []

    async def check(name: str, problems: Awaitable[list[str]]) -> None:
        nonlocal checked
        checked += 1
        found.extend((f"worker port, {name}", p) for p in await problems)

    for case in _corpus():
        await check(case.name, line_exchange(port, case.payload + b"\n", case.expected))
    ten_mb = b'{"id": 1, "function": "echo", "args": {"s": "' + b"x" * (10 * 1024 * 1024) + b'"}}'
    await check("a 10 MB line", line_exchange(port, ten_mb + b"\n", BAD, closes=True))
    await check("10 MB without a newline", line_exchange(port, ten_mb, BAD, closes=True))
    await check(
        "a request one byte per write",
        line_exchange(
            port,
            _request("split", "echo", {"a": [1, "x"]}) + b"\n",
            [_result({"a": [1, "x"]}, "split")],
            per_write=1,
        ),
    )
    tiny = b"".join(_request(i, "noop") + b"\n" for i in range(3000))
    await check(
        "3000 noops in one write",
        line_exchange(port, tiny, [_result(None, i) for i in range(3000)]),
    )
    await check("2000 empty lines", line_exchange(port, b"\n" * 2000, BAD * 2000))
    await check(
        "3000 requests without an id",
        line_exchange(port, b'{"function": "noop"}\n' * 3000, [_result(None)] * 3000),
    )
    return checked, found


async def _gateway_corpus(port: int) -> tuple[int, list[tuple[str, str]]]:
    """The corpus and the gateway-only inputs. :return: inputs checked, (case, problem)s."""
    checked = 0
    found: list[tuple[str, str]] = []

    async def check(name: str, problems: Awaitable[list[str]]) -> None:
        nonlocal checked
        checked += 1
        found.extend((f"gateway, {name}", p) for p in await problems)

    for case in _corpus():
        await check(
            case.name,
            frame_exchange(
                port, text_frame(case.payload), case.gateway, close_code=case.gateway_close
            ),
        )
    await check("a binary frame", frame_exchange(port, _binary(NOOP), BAD))
    await check("invalid UTF-8 in a binary frame", frame_exchange(port, _binary(b"\xff\xfe"), BAD))
    ten_mb = b'{"id": 1, "function": "echo", "args": {"s": "' + b"x" * (10 * 1024 * 1024) + b'"}}'
    await check("a 10 MB frame", frame_exchange(port, text_frame(ten_mb), BAD, close_code=1009))
    await check(
        "a 10 MB message in 1 MB fragments",
        frame_exchange(port, _fragmented(ten_mb, 1024 * 1024 - 1), BAD, close_code=1009),
    )
    await check(
        "a frame one byte per write", frame_exchange(port, _byte_by_byte(NOOP), [_result(None, 1)])
    )
    padded = b'{"id": "frag", "function": "noop"' + b" " * 3000 + b"}"
    await check(
        "one message in 3000+ one-byte fragments",
        frame_exchange(port, _fragmented(padded), [_result(None, "frag")]),
    )
    # More than --max-inflight-per-client (1000) at once: each gets one final
    # reply, a result or overloaded.
    frames = [_request(i, "noop") for i in range(3000)]
    await check(
        "3000 requests in one write",
        frame_exchange(
            port,
            _text_frames(frames),
            [_result_or(None, wire.OVERLOADED, i) for i in range(3000)],
        ),
    )
    await check(
        "3000 requests without an id",
        frame_exchange(
            port,
            _text_frames([b'{"function": "noop"}'] * 3000),
            [_result_or(None, wire.OVERLOADED)] * 3000,
        ),
    )
    await check("2000 empty frames", frame_exchange(port, _text_frames([b""] * 2000), BAD * 2000))
    return checked, found


# The reference model of the documented protocol, for generated inputs.  It reads
# docs/protocol.rst and docs/gateway.rst, not taskoffload.wire: a bug in the
# product's decoder must not become the oracle's too.

#: The example tasks (``taskoffload.examples``), as the pool serves them by default.
_EXAMPLE_TASKS = frozenset({"noop", "echo", "sleep", "cpu", "fail", "whoami", "send_mail"})
#: A request's fields (docs/protocol.rst, Requests).
_REQUEST_FIELDS = frozenset({"id", "function", "args", "kwargs", "timeout", "batch"})
#: orjson reads integers in this range exactly, others as floats.
_EXACT_INTEGERS = range(-(2**63), 2**64)
#: Nesting the documents do not pin down ("deeper than a few hundred levels" is
#: refused; 300 levels are echoed, 1,000 read but not written): inputs nested
#: deeper than the first and not beyond the second are not judged.
_NESTING_DOCUMENTED = 200
_NESTING_REFUSED = 1100
#: The gateway's --max-inflight-per-client default, which a batch may not exceed.
_MAX_BATCH = 1000


class _NotJSON(Exception):
    """The input is not what the protocol reads as JSON."""


def _reference_loads(text: str) -> Any:
    """
    Read ``text`` as the protocol documents JSON: ``NaN``, infinities and numbers
    too large for a double refused, integers outside -2**63..2**64-1 read as
    floats, lone surrogates refused, the last of a repeated key winning.

    :raises _NotJSON: if it is not.
    """

    def constant(name: str) -> Any:
        raise _NotJSON(name)

    def real(digits: str) -> float:
        value = float(digits)
        if math.isinf(value):
            raise _NotJSON(digits)
        return value

    def integer(digits: str) -> int | float:
        if len(digits) <= 40 and int(digits) in _EXACT_INTEGERS:
            return int(digits)
        return real(digits)

    try:
        value = json.loads(text, parse_constant=constant, parse_float=real, parse_int=integer)
    except ValueError as e:  # json.JSONDecodeError is one
        raise _NotJSON(str(e)) from None
    _refuse_surrogates(value)
    return value


def _refuse_surrogates(value: Any) -> None:
    """:raises _NotJSON: if a string in ``value`` holds a lone surrogate (not UTF-8)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _NotJSON("a lone surrogate") from None
    elif isinstance(value, list):
        for item in value:
            _refuse_surrogates(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_surrogates(key)
            _refuse_surrogates(item)


def _raw_nesting(text: str) -> int:
    """The deepest ``[``/``{`` nesting of ``text``, strings skipped (valid JSON or not)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def _is_id(value: Any) -> bool:
    """A valid request id: a string, a number or null (not a boolean)."""
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


def _reference_call(
    function: str, args: list[Any], kwargs: dict[str, Any], request_id: Any
) -> dict[str, Any] | None:
    """
    The documented final reply to ``function(*args, **kwargs)`` for the example
    tasks whose outcome the docs fix: ``noop()`` returns null, ``echo(**kwargs)``
    its keywords, ``fail(message="failed on purpose")`` raises ``TaskRaised`` with
    that message.  Arguments that do not bind get ``bad_arguments``.  ``None``
    for the other tasks (slow, or not fixed by their arguments).
    """
    if function == "noop":
        if args or kwargs:
            return _error(wire.BAD_ARGUMENTS, request_id)
        return _result(None, request_id)
    if function == "echo":
        if args:
            return _error(wire.BAD_ARGUMENTS, request_id)
        return _result(kwargs, request_id)
    if function == "fail":
        if len(args) > 1 or set(kwargs) - {"message"} or (args and kwargs):
            return _error(wire.BAD_ARGUMENTS, request_id)
        message = args[0] if args else kwargs.get("message", "failed on purpose")
        # The exception's text, as Python gives it for TaskRaised(message).
        return _failed(str(message), "TaskRaised", request_id)
    return None


def documented_reply(payload: bytes, port: str) -> list[dict[str, Any]] | None:
    """
    What ``docs/protocol.rst`` (and ``docs/gateway.rst``) say the answer to
    ``payload`` is, worked out without :mod:`taskoffload.wire`.

    :param payload: one line without its ``\\n`` (``port="worker"``), or one
        text frame's payload (``port="gateway"``), against a pool serving the
        example tasks.
    :return: the expected replies (for :func:`_compare`): exact results, exact
        ``task_failed`` replies, error codes with their ids; ``[]`` for what gets
        no reply (a cancel, an ``auth`` line on a pool without a secret).
        ``None`` when the documents do not say exactly what the reply is, or it
        would run a slow task; such inputs are not judged.
    """
    if port not in ("worker", "gateway"):
        raise ValueError(f"port is worker or gateway, not {port!r}")
    gateway = port == "gateway"
    bad = [_error(wire.BAD_REQUEST)]
    try:
        text = payload.decode("utf-8")  # strict: overlong forms, surrogates refused
    except UnicodeDecodeError:
        return bad
    nesting = _raw_nesting(text)
    if nesting > _NESTING_REFUSED:
        return bad
    if nesting > _NESTING_DOCUMENTED:
        return None
    try:
        message = _reference_loads(text)  # an empty or blank message is not JSON either
    except _NotJSON:
        return bad
    if not isinstance(message, dict):
        return bad
    # Cancel, session and auth lines must be alone; a malformed cancel is
    # bad_request with a null id.  (A malformed session or auth line with an id
    # is not said to be answered with or without it.)
    if "cancel" in message:
        cancel = message["cancel"]
        alone = len(message) == 1 and cancel is not None and _is_id(cancel)
        return [] if alone else bad
    for line in ("session", "auth"):
        if line not in message:
            continue
        if len(message) > 1 and message.get("id") is not None and _is_id(message["id"]):
            return None
        if gateway:
            return bad  # session and auth lines are for the worker port
        value = message[line]
        if len(message) > 1:
            return bad
        if line == "auth":
            return [] if isinstance(value, str) else None
        if not isinstance(value, dict):
            return bad
        if not isinstance(value.get("reject_when_busy", False), bool):
            return bad
        return [{"session": ANY}]
    # A request.
    request_id = message.get("id")
    if not _is_id(request_id):
        return bad
    refused = [_error(wire.BAD_REQUEST, request_id)]
    function = message.get("function")
    args = message.get("args")
    kwargs = message.get("kwargs")
    timeout = message.get("timeout")
    if set(message) - _REQUEST_FIELDS:
        return refused
    if not isinstance(function, str) or not function:
        return refused
    if args is not None and not isinstance(args, (dict, list)):
        return refused
    if kwargs is not None and not isinstance(kwargs, dict):
        return refused
    if isinstance(args, dict) and isinstance(kwargs, dict) and args.keys() & kwargs.keys():
        return refused
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        return refused
    if "batch" in message:
        batch = message["batch"]
        if batch is None:
            return None  # "must be an array": whether null is refused is not said
        if not isinstance(batch, list) or not gateway:
            return refused  # a worker refuses every batch
        if not batch or len(batch) > _MAX_BATCH:
            return refused
        if args is not None or kwargs or function not in _EXAMPLE_TASKS:
            return None  # a batch's args, kwargs, unknown name: not documented
        items = []
        for item in batch:
            if not isinstance(item, (dict, list)):
                return None
            reply = _reference_call(
                function,
                item if isinstance(item, list) else [],
                item if isinstance(item, dict) else {},
                request_id,
            )
            if reply is None:
                return None
            if "result" in reply:
                items.append({"result": reply["result"]})
            else:
                error = {"code": reply["error"], "message": reply.get("message", ANY)}
                if "type" in reply:
                    error["type"] = reply["type"]
                items.append({"error": error})
        return [_result(items, request_id)]
    if function not in _EXAMPLE_TASKS:
        return [_error(wire.UNKNOWN_FUNCTION, request_id)]
    positional = args if isinstance(args, list) else []
    keywords = {**(args if isinstance(args, dict) else {}), **(kwargs or {})}
    reply = _reference_call(function, positional, keywords, request_id)
    return None if reply is None else [reply]


async def check_worker_input(port: int, payload: bytes) -> tuple[list[str], bool]:
    """
    Send ``payload`` as one line (any ``\\n`` in it replaced by a space) to the
    worker port and check the replies against :func:`documented_reply`.

    :return: the problems found, and whether the input was judged (an input the
        documents do not fix is neither sent nor judged, and has no problem).
    """
    payload = payload.replace(b"\n", b" ")
    expected = documented_reply(payload, "worker")
    if expected is None:
        return [], False
    return await line_exchange(port, payload + b"\n", expected), True


async def check_gateway_input(port: int, payload: bytes) -> tuple[list[str], bool]:
    """
    Send ``payload`` to the gateway: as a text frame if it is UTF-8, else as a
    binary frame (``bad_request``); check the replies against :func:`documented_reply`.

    :return: the problems found, and whether the input was judged (an input the
        documents do not fix is neither sent nor judged, and has no problem).
    """
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return await frame_exchange(port, _binary(payload), BAD), True
    expected = documented_reply(payload, "gateway")
    if expected is None:
        return [], False
    return await frame_exchange(port, text_frame(payload), expected), True


_TOKENS = [
    b"\x00", b"\xff", b"\xc0\x80", b"\\u0000", b"\\ud800", b"[" * 2000, b"]", b"{", b"}",
    b'"', b"\\", b"1e999", b"-0", b"NaN", b"null", b"true", b",", b":", b"\r", b" " * 10,
    b'"id"', b'"function"', b'"args"', b'"batch"', b'"cancel"', b'"session"', b'"timeout"',
    b"18446744073709551616", b"1" * 400,
]  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**63, -(2**63), 2**64 - 1, rng.randrange(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 5e-324, rng.uniform(-1e9, 1e9)])
    if kind in (4, 5):
        return "".join(
            chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x2FFF)]))
            for _ in range(rng.randrange(8))
        )
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        str(_random_value(rng, depth + 1)): _random_value(rng, depth + 1)
        for _ in range(rng.randrange(4))
    }


def generated_inputs(count: int, seed: int = 0) -> list[bytes]:
    """``count`` hostile inputs from a fixed-seed generator: random bytes, mutated
    requests, and requests whose fields hold random JSON values."""
    rng = random.Random(seed)
    functions = ["noop", "echo", "fail", "nope", "", "sleep"]
    inputs = []
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120)))
        elif kind == 1:
            mutated = bytearray(
                _request(rng.randrange(100), rng.choice(functions), {"a": [1, "x"]})
            )
            for _ in range(rng.randrange(1, 4)):
                at = rng.randrange(len(mutated) + 1)
                action = rng.randrange(3)
                if action == 0:
                    mutated[at:at] = rng.choice(_TOKENS)
                elif action == 1:
                    del mutated[at : at + rng.randrange(1, 5)]
                else:
                    mutated[at:at] = bytes([rng.randrange(256)])
            data = bytes(mutated)
        elif kind == 2:
            field = rng.choice(["id", "args", "kwargs", "timeout", "batch", "function", "cancel"])
            message: dict[str, Any] = {"id": 1, "function": "echo"}
            if field == "cancel":
                message = {"cancel": _random_value(rng)}
            else:
                message[field] = _random_value(rng)
            data = wire.dumps(message)
        elif kind == 3:
            data = wire.dumps(_random_value(rng))
        else:
            data = json.dumps(
                {"id": rng.randrange(100), "function": "echo", "args": {"v": _random_value(rng)}}
            ).encode()
        inputs.append(data.replace(b"\n", b" "))
    return inputs


#: The share of the generated inputs the reference model must judge on each port
#: (it judges 95-100 % of them at every seed from 0 to 299, 100 or 200 inputs):
#: fewer means the model stopped answering, and the scenario checks nothing.
JUDGED_FRACTION = 0.9


def hostile(
    examples: int = 200,
    *,
    seed: int = 0,
    count: int = 2,
    directory: str | Path | None = None,
) -> dict[str, Any]:
    """
    The hand-written corpus and ``examples`` generated inputs
    (:func:`generated_inputs`) on each port, each input on a new connection;
    then a noop, and the processes compared with those before.

    :return: ``worker_port_inputs``, ``gateway_inputs``, ``generated``;
        ``judged_worker_port`` and ``judged_gateway`` (the generated inputs the
        reference model gave an exact answer for, and so were checked, on each
        port); ``problems`` (how many things were not as documented),
        ``problem_cases`` (the inputs they concern, as ``"PORT, CASE"``), the
        first few in ``problem_list``; ``processes_unchanged`` (the twistd
        process alive and the worker pids the same), ``noop_after``.
    """
    with _trees(directory, "hostile") as trees:
        tree, gateway, pool = trees.all(count)
        workers = tree.worker_pids()
        result = asyncio.run(_hostile(gateway, pool, examples, seed))
        result["processes_unchanged"] = tree.alive() and tree.worker_pids() == workers
        result["workers_before"] = len(workers)
        return result


async def _hostile(gateway: int, pool: int, examples: int, seed: int) -> dict[str, Any]:
    started = time.monotonic()
    generated = generated_inputs(examples, seed)
    # Every worker-port input first: the gateway's bursts below leave connections
    # in the pool's accept queue that hold up new ones for seconds (see the
    # report on first bursts), which would only blur what this scenario checks.
    worker_checked, found = await _worker_corpus(pool)
    judged_worker_port = 0
    for payload in generated:
        problems, judged = await check_worker_input(pool, payload)
        judged_worker_port += judged
        found += [(f"worker port, {payload!r}", p) for p in problems]
    gateway_checked, gateway_found = await _gateway_corpus(gateway)
    found += gateway_found
    judged_gateway = 0
    for payload in generated:
        problems, judged = await check_gateway_input(gateway, payload)
        judged_gateway += judged
        found += [(f"gateway, {payload!r}", p) for p in problems]
    caller = await _Caller.open(gateway)
    try:
        reply = await caller.call({"id": "after", "function": "noop"}, 10)
    except (asyncio.TimeoutError, ConnectionError) as e:
        reply = {"error": repr(e)}
    await caller.close()
    return {
        "worker_port_inputs": worker_checked + len(generated),
        "gateway_inputs": gateway_checked + len(generated),
        "generated": len(generated),
        # Of those, the ones the reference model gives an exact answer for, on the
        # worker port and on the gateway; the rest are not judged.
        "judged_worker_port": judged_worker_port,
        "judged_gateway": judged_gateway,
        "problems": len(found),
        "problem_cases": sorted({case for case, _ in found}),
        "problem_list": [_short(f"{case}: {problem}", 400) for case, problem in found[:20]],
        "noop_after": reply == {"id": "after", "result": None},
        "seconds": round(time.monotonic() - started, 2),
    }


# 4. The supervisor crashes


def supervisor_crash(
    duration: float = 2.0,
    *,
    via: str = "gateway",
    clients: int = 5,
    count: int = 4,
    wait: float = 10.0,
    orphan_limit: float = 5.0,
    directory: str | Path | None = None,
) -> dict[str, Any]:
    """
    A ``--role=worker`` pool under load; after ``duration`` s its supervisor
    (the twistd process alone) gets SIGKILL; ``duration`` s later a new pool
    starts on the same port, and the load goes on until it has served for
    ``duration`` s.

    :param via: ``"gateway"``: ``clients`` WebSocket clients of a separate
        ``--role=gateway`` (so the pool's clients are its ``TaskClient``);
        ``"direct"``: ``clients`` raw worker-port clients, each on one connection
        at a time, reconnecting after an error.  Each sends ``sleep(0.05)`` and
        ``noop`` one at a time, waiting at most ``wait`` s for each reply, and
        pauses 50 ms after a failure.
    :return: ``sent``; ``results_before``; between the kill and the restart,
        ``results_after_kill`` and ``errors_after_kill`` (by error code, or
        ``connection`` for a refused, reset or closed connection); ``hangs``
        (no reply within ``wait`` s); ``dropped`` (WebSockets the gateway
        closed); ``pool_gone_s`` (the killed pool's process
        group empty) and ``orphans`` (its processes alive ``orphan_limit`` s
        after the kill); ``restart_error`` (why the new pool did not start);
        ``restart_first_result_s`` (from the new pool serving to the first
        result); ``results_after_restart`` and ``errors_after_restart`` over the
        last ``duration`` s; ``gateway_alive``.
    """
    if via not in ("gateway", "direct"):
        raise ValueError(f"via is gateway or direct, not {via!r}")
    with _trees(directory, f"supervisor_crash_{via}") as trees:
        (pool_port,) = free_ports(1)
        pool = trees.pool(pool_port, count)
        gateway: Tree | None = None
        if via == "gateway":
            gateway, gateway_port = trees.gateway(pool_port)
            target = gateway_port
        else:
            target = pool_port
        return asyncio.run(
            _supervisor_crash(
                trees,
                pool,
                pool_port,
                gateway,
                target,
                duration,
                clients,
                count,
                wait,
                orphan_limit,
            )
        )


class _DirectCaller:
    """A worker-port client: one connection at a time, opened when needed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, request: dict[str, Any], wait: float) -> dict[str, Any]:
        """
        Send ``request`` and wait at most ``wait`` s for its final reply.

        :raises ConnectionError: refused, reset, closed, or a goodbye.
        :raises asyncio.TimeoutError: no reply in time.
        """
        deadline = time.monotonic() + wait
        try:
            if self._streams is None:
                self._streams = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), wait
                )
            reader, writer = self._streams
            writer.write(json.dumps(request).encode() + b"\n")
            while True:
                line = await asyncio.wait_for(
                    reader.readline(), max(deadline - time.monotonic(), 0.001)
                )
                if not line.endswith(b"\n"):
                    raise ConnectionError("closed")
                reply: dict[str, Any] = json.loads(line)
                if "goodbye" in reply:
                    raise ConnectionError("goodbye")
                if "progress" not in reply:
                    return reply
        except (ConnectionError, asyncio.TimeoutError):
            self.close_now()
            raise
        except OSError as e:
            self.close_now()
            raise ConnectionError(str(e)) from e

    def close_now(self) -> None:
        if self._streams is not None:
            self._streams[1].transport.abort()  # type: ignore[attr-defined]  # a socket transport
            self._streams = None

    async def close(self) -> None:
        self.close_now()


async def _supervisor_crash(
    trees: _Trees,
    pool: Tree,
    pool_port: int,
    gateway: Tree | None,
    port: int,
    duration: float,
    clients: int,
    count: int,
    wait: float,
    orphan_limit: float,
) -> dict[str, Any]:
    callers: list[_Caller | _DirectCaller]
    if gateway is not None:
        callers = list(await asyncio.gather(*(_Caller.open(port) for _ in range(clients))))
    else:
        callers = [_DirectCaller(port) for _ in range(clients)]
    # (time sent, time answered, outcome) of every request.
    log: list[tuple[float, float, str]] = []
    phase = {"stop": False}
    rng = random.Random(0)
    dropped: list[_Caller] = []

    async def client(caller: _Caller | _DirectCaller) -> None:
        for request_id in range(1_000_000):  # bounded; the phases end it
            if phase["stop"]:
                return
            if rng.random() < 0.5:
                request = {"id": request_id, "function": "sleep", "args": [0.05]}
            else:
                request = {"id": request_id, "function": "noop"}
            sent = time.monotonic()
            try:
                reply = await caller.call(request, wait)
                outcome = "result" if "result" in reply else reply.get("error", {}).get("code", "?")
            except asyncio.TimeoutError:
                outcome = "hang"
            except ConnectionError:
                outcome = "connection"
                if isinstance(caller, _Caller):
                    # The gateway dropped the WebSocket: nothing more to send on.
                    log.append((sent, time.monotonic(), outcome))
                    dropped.append(caller)
                    return
            log.append((sent, time.monotonic(), outcome))
            if outcome != "result":
                await asyncio.sleep(0.05)  # no tight loop of failures while the pool is down

    load = asyncio.gather(*(client(c) for c in callers))
    await asyncio.sleep(duration)
    pool_pgid = pool.pid
    killed_at = time.monotonic()
    os.kill(pool.pid, signal.SIGKILL)
    await asyncio.to_thread(pool.process.wait, 10)
    pool_gone: float | None = None
    orphans = 0
    # More rounds than orphan_limit takes: the loop ends with the group empty
    # (pool_gone) or with its survivors counted (orphans), never with neither.
    for _ in range(int((orphan_limit + 1) / 0.05)):
        remaining = group_pids(pool_pgid)
        elapsed = time.monotonic() - killed_at
        if not remaining:
            pool_gone = round(elapsed, 3)
            break
        if elapsed > orphan_limit:
            orphans = len(remaining)
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(max(duration - (time.monotonic() - killed_at), 0))
    # A new pool on the same port: it cannot bind while an orphan holds the socket.
    restart_began = time.monotonic()
    restart_error: str | None = None
    try:
        await asyncio.to_thread(trees.pool, pool_port, count)
    except FaultSetupError as e:
        restart_error = str(e).splitlines()[-1][:300]
    serving_at = time.monotonic()
    first_result: float | None = None
    for _ in range(int(15 / 0.02) if restart_error is None else 0):
        answered = [a for _, a, o in log if a >= serving_at and o == "result"]
        if answered:
            first_result = round(min(answered) - serving_at, 3)
            break
        await asyncio.sleep(0.02)
    window_start = time.monotonic()
    await asyncio.sleep(duration)
    phase["stop"] = True
    await asyncio.wait_for(load, wait + 5)
    await asyncio.gather(*(c.close() for c in callers))
    after_kill = [o for _, a, o in log if killed_at <= a < serving_at]
    window = [o for s, _, o in log if s >= window_start]
    return {
        "via": "gateway" if gateway is not None else "direct",
        "clients": clients,
        "sent": len(log),
        "results_before": sum(1 for _, a, o in log if a < killed_at and o == "result"),
        "results_after_kill": sum(1 for o in after_kill if o == "result"),
        "errors_after_kill": dict(Counter(o for o in after_kill if o not in ("result", "hang"))),
        "hangs": sum(1 for _, _, o in log if o == "hang"),
        "dropped": len(dropped),
        "pool_gone_s": pool_gone,
        "orphans": orphans,
        "restart_s": round(serving_at - restart_began, 3),
        "restart_error": restart_error,
        "restart_first_result_s": first_result,
        "results_after_restart": sum(1 for o in window if o == "result"),
        "errors_after_restart": dict(Counter(o for o in window if o != "result")),
        "gateway_alive": gateway is None or gateway.alive(),
    }


# 5. Idle WebSocket clients


class _IdleWebSocket(asyncio.Protocol):
    """
    A WebSocket client that opens, then only answers pings: thousands cost the
    client a few kilobytes each, and no task.
    """

    def __init__(self) -> None:
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(_handshake())

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self.opened.done():
            head, found, rest = self._buffer.partition(b"\r\n\r\n")
            if not found:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(f"refused: {head[:80]!r}"))
                return
            self.opened.set_result(None)
            self._buffer = rest
        while len(self._buffer) >= 2:
            length = self._buffer[1] & 0x7F
            start = 2 + {126: 2, 127: 8}.get(length, 0)
            if len(self._buffer) < start:
                return
            if length == 126:
                (length,) = struct.unpack("!H", self._buffer[2:4])
            elif length == 127:
                (length,) = struct.unpack("!Q", self._buffer[2:10])
            if len(self._buffer) < start + length:
                return
            opcode = self._buffer[0] & 0x0F
            payload = self._buffer[start : start + length]
            self._buffer = self._buffer[start + length :]
            if opcode == OP_PING and self.transport is not None:
                self.transport.write(ws_frame(OP_PONG, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))


def idle_websockets(
    n: int = 5000,
    *,
    count: int = 2,
    hold: float = 1.0,
    concurrency: int = 100,
    directory: str | Path | None = None,
) -> dict[str, Any]:
    """
    Open ``n`` WebSocket connections to the gateway (``concurrency`` handshakes
    at a time) and keep them idle for ``hold`` s; meanwhile a normal client calls
    noop.

    :return: ``opened``, ``open_failures``, ``open_s``; ``status_clients`` (the
        most ``/status`` reported); ``noop_ok`` of 20 and ``noop_p50_ms``,
        ``noop_max_ms``; ``dropped`` (idle connections the gateway closed);
        ``gateway_rss_mib`` while they are open; ``clients_after_close`` (``None``
        if ``/status`` did not say); ``status_error`` (what could not be read,
        when; ``None`` if nothing).
    """
    limit, _ = raise_open_files_limit()
    if limit < n + 200:
        raise FaultSetupError(f"{n} connections need more than the open-files limit of {limit}")
    with _trees(directory, "idle_websockets") as trees:
        tree, gateway, _ = trees.all(count)
        return asyncio.run(_idle_websockets(tree, gateway, n, hold, concurrency))


async def _idle_websockets(
    tree: Tree, port: int, n: int, hold: float, concurrency: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()

    async def open_one() -> _IdleWebSocket:
        _, protocol = await loop.create_connection(_IdleWebSocket, "127.0.0.1", port)
        try:
            await protocol.opened
        except ConnectionError:
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
        return protocol

    started = time.monotonic()
    idle, failures = await _open_bounded(open_one, n, concurrency)
    open_s = time.monotonic() - started
    status_errors: list[str] = []
    error = ""  # of the last /status read
    status_clients = 0
    for _ in range(int(10 / 0.05)):
        document, error = await _read_status(port)
        status_clients = max(
            status_clients, ((document or {}).get("gateway") or {}).get("clients", 0)
        )
        if status_clients >= len(idle):
            break
        await asyncio.sleep(0.05)
    else:
        if error:
            status_errors.append(f"/status could not be read with the idle clients open: {error}")
    rss = _rss_mib(tree.pid)
    caller = await _Caller.open(port)
    latencies, noop_failures = await _noop_latencies(caller, 20, iter(range(1000)))
    await asyncio.sleep(hold)
    dropped = sum(1 for p in idle if p.closed)
    await caller.close()
    for p in idle:
        if p.transport is not None:
            p.transport.abort()
    after: int | None = None
    for _ in range(int(10 / 0.05)):
        document, error = await _read_status(port)
        after = ((document or {}).get("gateway") or {}).get("clients")
        if after == 0:
            break
        await asyncio.sleep(0.05)
    else:
        if error:
            status_errors.append(
                f"/status could not be read after the idle clients closed: {error}"
            )
    return {
        "n": n,
        "opened": len(idle),
        "open_failures": failures,
        "open_s": round(open_s, 3),
        "status_clients": status_clients,
        "noop_ok": len(latencies),
        "noop_failures": noop_failures,
        "noop_p50_ms": _ms(statistics.median(latencies)) if latencies else None,
        "noop_max_ms": _ms(max(latencies)) if latencies else None,
        "dropped": dropped,
        "gateway_rss_mib": rss,
        "clients_after_close": after,
        "status_error": "; ".join(status_errors) or None,
        "twistd_alive": tree.alive(),
    }


def _rss_mib(pid: int) -> float | None:
    text = read_text(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


# All of them


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
    elif name == "slowloris":
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
    elif name == "hostile":
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
    elif name.startswith("supervisor_crash"):
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
    elif name == "idle_websockets":
        n = counts["n"]
        # Every open either succeeds or fails: opened == n says open_failures == 0.
        want(
            counts["opened"] == n,
            f"idle clients not opened: {counts['opened']} of {n} "
            f"({counts['open_failures']} failed)",
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
    else:
        raise ValueError(f"no scenario named {name!r}")
    return found


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
        prog="python -m taskoffload.faults", description=__doc__.split("\n\n")[1]
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


if __name__ == "__main__":
    sys.exit(main())
