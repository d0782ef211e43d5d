"""
The fault suite (``harness.faults``) at CI sizes, on the real ``twistd`` over
loopback.  ``python -m harness.faults`` runs the same scenarios longer.

Every scenario is judged by :func:`harness.faults.report.problems`, the function the
command line uses too: each test asserts that it finds nothing (and that the
scenario ran at the size the test names).  Each scenario starts and stops its
own process trees, in the test's temporary directory, where their logs stay.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.faults import (
    clients,
    crash,
    exchange,
    hostile,
    idle,
    raw_websocket,
    report,
    slowloris,
    storm,
)
from taskoffload.tap import raise_open_files_limit
from tests.integration.support import IntegrationTestCase, LineClient, wait_for

pytestmark = pytest.mark.slow


def _status(port: int) -> dict[str, Any]:
    document: dict[str, Any] = asyncio.run(clients.http_json(port, "/status"))
    return document


def _fresh_noop_seconds(port: int, timeout: float) -> float:
    """Seconds a noop takes on a new worker-port connection (``timeout`` if none came)."""
    started = time.monotonic()
    client = LineClient(port, timeout=timeout)
    try:
        client.send(b'{"id": 1, "function": "noop"}\n')
        assert client.reply() == {"id": 1, "result": None}
    except TimeoutError:
        return timeout
    finally:
        client.close()
    return time.monotonic() - started


def _report(name: str, counts: dict[str, Any]) -> None:
    print(f"\n{name}: {json.dumps(counts)}")


class KillStormTests(IntegrationTestCase):
    """Workers SIGKILLed under load: what ran, what callers saw, how soon the pool is whole."""

    @pytest.mark.timeout(60)
    def test_kill_storm_through_gateway_4_in_flight(self) -> None:
        """10 WebSocket clients with 4 requests in flight each while a random serving worker
        is SIGKILLed every 200 ms for 8 s: no request runs twice, each gets one final reply
        (a result or worker_lost), the pool is whole within 1 s with no backed-off restart,
        and /status agrees."""
        counts = storm.kill_storm(
            8.0, clients=10, in_flight=4, count=8, seed=5, directory=self.tmp_path
        )
        _report("kill storm", counts)
        assert (counts["clients"], counts["in_flight"], counts["kill_interval_s"]) == (10, 4, 0.2)
        assert report.problems("kill_storm", counts) == []

    @pytest.mark.timeout(60)
    def test_kill_storm_with_prefetch(self) -> None:
        """The same storm for 4 s with --prefetch 1: no request runs twice, each gets one
        final reply, and a kill costs at most the running and the prefetched request."""
        counts = storm.kill_storm(
            4.0,
            clients=10,
            in_flight=4,
            count=8,
            seed=6,
            directory=self.tmp_path,
            prefetch=1,
        )
        _report("kill storm --prefetch 1", counts)
        assert (counts["clients"], counts["in_flight"], counts["prefetch"]) == (10, 4, 1)
        assert report.problems("kill_storm", counts) == []

    @pytest.mark.timeout(60)
    def test_pool_back_within_1s_after_repeated_kills_of_one_slot(self) -> None:
        """A slot whose worker is SIGKILLed four times in a row, each replacement as soon as
        it appears, serves again within 1 s of the last kill."""
        tree, gateway, _ = self.role_all(2)
        killed: set[int] = set()
        victim = min(tree.worker_pids())
        for _ in range(4):
            before = tree.worker_pids() - {victim}
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
            last_kill = time.monotonic()
            if len(killed) < 4:
                victim = next(iter(wait_for(lambda b=before: tree.worker_pids() - b - killed, 10)))

        def back() -> bool:
            pool = _status(gateway)["pool"]
            pids = {w["pid"] for w in pool["workers"]}
            return pool["serving"] == 2 and not pids & killed

        wait_for(back, 15, what="the pool to serve again")
        assert time.monotonic() - last_kill <= 1.0


class SlowlorisTests(IntegrationTestCase):
    """Connections that stall, or say nothing, cost a normal client nothing."""

    @pytest.mark.timeout(90)
    def test_slowloris_connections_do_not_slow_a_normal_client(self) -> None:
        """500 stalled connections on the worker port and 500 on the gateway: a normal
        client's noop p99 (median of 5 rounds) stays within 2x its unloaded value + 1 ms,
        through the gateway and on a new worker-port connection per call; every stalled line
        is answered bad_request and closed after --idle-timeout."""
        idle_timeout = 6.0
        counts = slowloris.slowloris(
            500, calls=100, rounds=5, idle_timeout=idle_timeout, directory=self.tmp_path
        )
        _report("slowloris", counts)
        assert counts["loaded_s"] < idle_timeout  # the load was all there while measured
        assert counts["slack_ms"] == 1.0 and counts["rounds"] == 5
        assert report.problems("slowloris", counts) == []

    @pytest.mark.timeout(60)
    def test_silent_connections_neither_block_accepting_nor_outlive_idle_timeout(self) -> None:
        """20 connections that connect and send nothing, on a pool of 2: a new connection's
        noop is still answered within 1 s, and the silent ones are closed after
        --idle-timeout (2 s)."""
        _, port = self.pool(2, "--idle-timeout", "2")
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        try:
            assert _fresh_noop_seconds(port, timeout=3.0) < 1.0
            deadline = time.monotonic() + 2.0 + 5.0
            for s in silent:
                s.settimeout(max(deadline - time.monotonic(), 0.1))
                try:
                    while s.recv(65536):  # a bad_request reply, then the end
                        pass
                except TimeoutError:
                    self.fail("a silent connection outlived --idle-timeout")
        finally:
            for s in silent:
                s.close()

    @pytest.mark.timeout(60)
    def test_first_burst_through_gateway_leaves_pool_accepting(self) -> None:
        """After a first burst of 1000 noops through the gateway of a pool of 2, each gets
        its result once, and a new worker-port connection gets its noop within 1 s."""
        _, gateway, pool_port = self.role_all(2)

        async def burst() -> list[dict[str, Any] | None]:
            ws = await raw_websocket.RawWebSocket.open(gateway)
            frames = [json.dumps({"id": i, "function": "noop"}).encode() for i in range(1000)]
            await ws.send_raw(
                b"".join(raw_websocket.ws_frame(raw_websocket.OP_TEXT, f) for f in frames)
            )
            replies = [await ws.recv(30) for _ in range(1000)]
            ws.abort()
            return replies

        replies = asyncio.run(burst())
        # recv gives None once the gateway closed the connection (and raises after 30 s
        # of silence): every request answered once, on an open connection, with its result.
        assert sorted(replies, key=lambda r: r["id"] if r else -1) == [
            {"id": i, "result": None} for i in range(1000)
        ]
        assert _fresh_noop_seconds(pool_port, timeout=3.0) < 1.0


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _requests() -> st.SearchStrategy[bytes]:
    """Request-shaped objects with fields of any JSON value."""
    fields = st.fixed_dictionaries(
        {},
        optional={
            "id": _json_values(),
            "function": st.sampled_from(["noop", "echo", "fail", "nope", ""]) | _json_values(),
            "args": _json_values(),
            "kwargs": _json_values(),
            "timeout": _json_values(),
            "batch": _json_values(),
            "cancel": _json_values(),
            "session": _json_values(),
        },
    )
    return fields.map(lambda d: json.dumps(d, allow_nan=True).encode())


def _documented_requests() -> st.SearchStrategy[bytes]:
    """Requests of noop, echo and fail with well-formed fields, whose exact reply the
    protocol documents."""
    keywords = st.dictionaries(st.text(max_size=8), _json_values(), max_size=4)
    fields = st.fixed_dictionaries(
        {"function": st.sampled_from(["noop", "echo", "fail"])},
        optional={
            "id": st.none() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
            "args": st.none() | keywords | st.lists(_json_values(), max_size=2),
            "kwargs": st.none() | keywords,
            "timeout": st.none() | st.floats(min_value=1.0, max_value=1e300),
        },
    )
    return fields.map(lambda d: json.dumps(d).encode())


_INPUTS = (
    st.binary(max_size=200)
    | _requests()
    | _documented_requests()
    | _json_values().map(lambda v: json.dumps(v, allow_nan=True).encode())
)


class HostileInputTests(IntegrationTestCase):
    """Hostile and generated inputs get the replies the protocol documents."""

    @pytest.mark.timeout(90)
    def test_hostile_corpus_gets_documented_replies(self) -> None:
        """The hand-written corpus (deep nesting, huge numbers, NUL bytes, invalid UTF-8,
        10 MB lines and frames, thousands of tiny frames, ids of every JSON type, a
        request split at every byte) and 100 generated inputs judged by the reference
        model, on both ports: each gets its documented reply, and no process dies."""
        counts = hostile.hostile(100, seed=0, count=2, directory=self.tmp_path)
        _report("hostile", counts)
        assert counts["worker_port_inputs"] >= 150 and counts["gateway_inputs"] >= 150
        # Generated inputs the reference model answers exactly, on each port.
        assert counts["judged_worker_port"] >= 90 and counts["judged_gateway"] >= 90
        assert report.problems("hostile", counts) == []

    @pytest.mark.timeout(60)
    def test_huge_timeout_is_served(self) -> None:
        """A request whose timeout is a huge number (1e300, 2**64 - 1) is served like one
        without, on both ports."""
        _, gateway, pool_port = self.role_all(2)

        async def check() -> list[str]:
            found = []
            for timeout in (b"1e300", b"18446744073709551615"):
                request = b'{"id": 1, "function": "noop", "timeout": ' + timeout + b"}"
                expected = [{"id": 1, "result": None}]
                found += await exchange.line_exchange(pool_port, request + b"\n", expected)
                found += await exchange.frame_exchange(
                    gateway, exchange.text_frame(request), expected
                )
            return found

        assert asyncio.run(check()) == []

    @pytest.mark.timeout(90)
    def test_generated_inputs_get_documented_replies(self) -> None:
        """200 hypothesis-generated inputs (bytes, JSON values, request-shaped objects),
        each on both ports: every one gets exactly the reply the reference model of
        docs/protocol.rst gives for it, and no process dies."""
        tree, gateway, pool_port = self.role_all(2)
        workers = tree.worker_pids()
        judged = []  # on the worker port

        @settings(
            max_examples=200,
            deadline=None,
            derandomize=True,  # the same inputs on every CI run; the CLI varies its seed
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(payload=_INPUTS)
        def check(payload: bytes) -> None:
            async def both() -> tuple[list[str], bool]:
                found, worker_judged = await exchange.check_worker_input(pool_port, payload)
                found += (await exchange.check_gateway_input(gateway, payload))[0]
                return found, worker_judged

            found, worker_judged = asyncio.run(both())
            if worker_judged:
                judged.append(payload)
            assert found == []

        check()
        assert len(judged) >= 150  # most inputs have a documented exact reply
        assert tree.process is not None and tree.process.poll() is None
        assert tree.worker_pids() == workers


class SupervisorCrashTests(IntegrationTestCase):
    """SIGKILL of a pool's supervisor under load."""

    @pytest.mark.timeout(60)
    def test_supervisor_crash_under_direct_load(self) -> None:
        """SIGKILL of a pool's supervisor while 5 raw worker-port clients call: they get
        errors and nothing hangs, no process of the pool survives 5 s, and a pool restarted
        on the same port serves again."""
        counts = crash.supervisor_crash(
            1.5, via="direct", orphan_limit=5.0, directory=self.tmp_path
        )
        _report("supervisor crash (direct)", counts)
        assert report.problems("supervisor_crash_direct", counts) == []

    @pytest.mark.timeout(60)
    def test_supervisor_crash_under_gateway_load(self) -> None:
        """SIGKILL of a pool's supervisor while 5 clients call through a separate gateway:
        they get worker_lost and nothing else, no WebSocket is dropped, nothing hangs, no
        process of the pool survives 5 s, and a pool restarted on the same port serves
        through the same gateway."""
        counts = crash.supervisor_crash(
            1.5, via="gateway", orphan_limit=5.0, directory=self.tmp_path
        )
        _report("supervisor crash (gateway)", counts)
        assert report.problems("supervisor_crash", counts) == []


class IdleWebSocketTests(IntegrationTestCase):
    """Thousands of idle WebSocket clients."""

    @pytest.mark.timeout(90)
    def test_gateway_holds_5000_idle_websockets(self) -> None:
        """5000 idle WebSocket clients on the gateway: all stay open, /status counts them,
        and a normal client's noops are answered."""
        limit, _ = raise_open_files_limit()
        assert limit >= 5500, f"5000 connections need an open-files limit above 5500, not {limit}"
        counts = idle.idle_websockets(5000, count=2, hold=1.0, directory=self.tmp_path)
        _report("idle websockets", counts)
        assert counts["n"] == 5000 and counts["noop_ok"] == 20
        assert report.problems("idle_websockets", counts) == []
