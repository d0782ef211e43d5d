"""
``--gateway-processes 2`` end to end: the real ``twistd -n taskoffload`` with two
gateway processes on one port, WebSocket clients (the ``websockets`` library, in
``asyncio.run``) calling through them, one process killed under load, and a stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import psutil
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.support import IntegrationTestCase, Twistd, free_port, wait_for

#: How many WebSocket clients call at once.
CLIENTS = 8

#: The longest a killed gateway process may take to be replaced and listening.
REPLACED_WITHIN = 1.0

#: The longest the parent may take to start the replacement of a killed process
#: ("at once": what remains of REPLACED_WITHIN is the new process's own start).
SPAWNED_WITHIN = 0.25

#: The module a gateway process runs.
GATEWAY_CHILD = "taskoffload._gateway_child"

#: How the parent logs a gateway process's "listening" line.
LISTENING = re.compile(r"gateway (\d+): .*Gateway listening on")

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def http_get(port: int, path: str) -> bytes:
    with _http.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        body: bytes = response.read()
        return body


def scrape(port: int) -> tuple[int, int]:
    """:return: ``/metrics``'s ``taskoffload_requests_total`` summed over its samples,
    and ``/status``'s ``gateway.requests`` (each from whichever process answers)."""
    text = http_get(port, "/metrics").decode()
    total = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "taskoffload_requests_total"
    )
    requests = json.loads(http_get(port, "/status"))["gateway"]["requests"]
    return int(total), requests


def listening_lines(tree: Twistd) -> list[int]:
    """The index of each gateway process's "Gateway listening" line so far, in order."""
    return [int(m.group(1)) for m in LISTENING.finditer(tree.log())]


SERVES = re.compile(r"Gateway process (\d+) \(pid (\d+)\) serves")
SPARE = re.compile(r"Spare gateway process started \(pid (\d+)\)")


def serving_pids(tree: Twistd) -> dict[int, int]:
    """Each gateway process index's pid, as the parent last said it serves."""
    return {int(m.group(1)): int(m.group(2)) for m in SERVES.finditer(tree.log())}


def spare_pid(tree: Twistd) -> int | None:
    """The pid of the spare the parent last started, if any."""
    pids = [int(m.group(1)) for m in SPARE.finditer(tree.log())]
    return pids[-1] if pids else None


def serving_children(tree: Twistd) -> list[psutil.Process]:
    """The live gateway processes that serve (not the spare)."""
    serving = set(serving_pids(tree).values())
    return [p for p in gateway_children(tree) if p.pid in serving]


def gateway_children(tree: Twistd) -> list[psutil.Process]:
    """The twistd process's live gateway processes (the spare among them)."""
    alive = []
    for p in psutil.Process(tree.pid).children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and GATEWAY_CHILD in p.cmdline():
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive


def holders(children: list[psutil.Process], port: int) -> dict[int, int]:
    """Which process holds each connection to ``port``: client port → pid."""
    held: dict[int, int] = {}
    for child in children:
        try:
            connections = child.net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        for c in connections:
            if c.laddr and c.laddr.port == port and c.raddr:
                held[c.raddr.port] = child.pid
    return held


def start_gateway(test: IntegrationTestCase, *extra: str) -> tuple[Twistd, int]:
    """A pool of 2, and a gateway of 2 processes sending to it; wait until both
    processes listen. :return: the gateway's tree and port."""
    _, pool_port = test.pool(2)
    port = free_port()
    tree = test.twistd(
        "--role=gateway",
        "--gateway-processes=2",
        "--pool",
        f"tcp:127.0.0.1:{pool_port}",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        *extra,
    )
    wait_for(
        lambda: sorted(listening_lines(tree)) == [0, 1] or tree.process.poll() is not None,
        30,
        what="gateway 0 and gateway 1 to listen",
    )
    assert tree.process.poll() is None, tree.log()
    return tree, port


@attrs.define
class Caller:
    """One WebSocket client calling ``echo`` again and again, one call at a time."""

    ws: ClientConnection
    calls: int = 0
    #: Calls answered since the kill.
    after_kill: int = 0
    #: Why it stopped calling, if not told to.
    ended: BaseException | None = None
    wrong: list[Any] = attrs.field(factory=list)

    @property
    def port(self) -> int:
        port: int = self.ws.local_address[1]
        return port

    async def run(self, stop: asyncio.Event, killed: asyncio.Event) -> None:
        deadline = time.monotonic() + 60
        try:
            while not stop.is_set() and time.monotonic() < deadline and self.calls < 100_000:
                self.calls += 1
                request = {"id": self.calls, "function": "echo", "args": {"n": self.calls}}
                await self.ws.send(json.dumps(request))
                reply = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
                if reply != {"id": self.calls, "result": {"n": self.calls}}:
                    self.wrong.append(reply)
                    return
                if killed.is_set():
                    self.after_kill += 1
        except (ConnectionClosed, OSError, TimeoutError) as e:
            self.ended = e


async def open_ws(port: int) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{port}/ws", proxy=None, open_timeout=30)


async def open_callers(
    port: int, children: list[psutil.Process], count: int
) -> tuple[list[Caller], dict[int, int]]:
    """``count`` connected clients, more (up to 32 more) until each process holds one.

    :return: the clients, and which process holds each (client port → pid)."""
    callers = [Caller(ws) for ws in await asyncio.gather(*(open_ws(port) for _ in range(count)))]
    for _ in range(33):
        held = await asyncio.to_thread(holders, children, port)
        ports = {c.port for c in callers}
        if ports <= set(held) and {held[p] for p in ports} == {c.pid for c in children}:
            return callers, held
        if ports <= set(held):
            callers.append(Caller(await open_ws(port)))
        await asyncio.sleep(0.02)
    raise AssertionError(f"clients not spread over both processes: {held}")


class GatewayProcessesTest(IntegrationTestCase):
    def test_two_processes_one_killed_under_load_then_stopped(self) -> None:
        """Two processes serve one port; a client on one keeps calling untouched while
        the other is SIGKILLed (only its own clients see their connection close) and
        replaced within a second; the counters never fall; SIGTERM stops it all,
        exit 0, the shared directory removed."""
        tree, port = start_gateway(self)

        # (1) Two gateway processes, children of twistd, serve the one port; a
        # third, the spare, waits started.
        wait_for(lambda: spare_pid(tree) is not None, 10, what="the spare")
        children = serving_children(tree)
        assert len(children) == 2, children
        everyone = {c.pid for c in psutil.Process(tree.pid).children()}
        assert {c.pid for c in children} | {spare_pid(tree)} == everyone
        for child in children:
            listening = [
                c
                for c in child.net_connections("tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr.port == port
            ]
            assert len(listening) == 1, (child, listening)
        directories = {child.environ()["PROMETHEUS_MULTIPROC_DIR"] for child in children}
        assert len(directories) == 1, directories
        [directory] = directories
        assert Path(directory).name.startswith("taskoffload-gateway-") and os.path.isdir(directory)

        scenario = self._kill_one_under_load(tree, port, children)
        spawned, listened, scrapes = asyncio.run(asyncio.wait_for(scenario, 90))

        # (3) Counters never fall: 20 scrapes while calling, across the kill.
        totals = [t for t, _ in scrapes]
        requests = [r for _, r in scrapes]
        assert len(scrapes) == 20
        assert totals == sorted(totals), f"/metrics requests fell: {totals}"
        assert requests == sorted(requests), f"/status requests fell: {requests}"
        assert totals[-1] > totals[0] and requests[-1] > requests[0], scrapes

        # (4) SIGTERM: exit 0; the shared directory is gone (cleanup checks the group).
        os.kill(tree.pid, signal.SIGTERM)
        wait_for(lambda: tree.process.poll() is not None, 30, what="twistd to exit")
        assert tree.process.returncode == 0, tree.log()[-3000:]
        assert not os.path.exists(directory), f"{directory} left behind"
        wait_for(lambda: not tree.group_processes(), 5, what="the gateway processes to end")

        # (2, last, so that a slow start does not hide the rest) Replaced at once,
        # listening within a second.
        print(f"replacement serving {spawned} s, listening {listened} s after the kill")
        assert spawned is not None and spawned <= SPAWNED_WITHIN, (
            f"the replacement was started {spawned} s after the kill (> {SPAWNED_WITHIN} s)"
        )
        assert listened is not None, "no replacement listening within 10 s"
        assert listened <= REPLACED_WITHIN, (
            f"the replacement listened {listened:.3f} s after the kill (> {REPLACED_WITHIN} s;"
            f" started after {spawned:.3f} s)"
        )

    async def _kill_one_under_load(
        self, tree: Twistd, port: int, children: list[psutil.Process]
    ) -> tuple[float | None, float | None, list[tuple[int, int]]]:
        """Kill one process under load; :return: how long after the kill its
        replacement was started and was listening (None: not within 10 s), and
        the scrapes (``/metrics``, ``/status`` requests) taken before and after."""
        callers, held = await open_callers(port, children, CLIENTS)
        stop, killed = asyncio.Event(), asyncio.Event()
        running = [asyncio.create_task(c.run(stop, killed)) for c in callers]
        scrapes: list[tuple[int, int]] = []
        try:
            await self._wait_for_calls(callers, running, 5)
            for _ in range(10):
                scrapes.append(await asyncio.to_thread(scrape, port))
                await asyncio.sleep(0.05)

            # (2) SIGKILL the process holding the first client.
            victim = held[callers[0].port]
            on_victim = [c for c in callers if held[c.port] == victim]
            on_survivor = [c for c in callers if held[c.port] != victim]
            assert on_victim and on_survivor
            lines_before = len(listening_lines(tree))
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            killed.set()
            listened = spawned = None
            old_pids = {c.pid for c in children}
            for _ in range(1000):  # 10 s at most
                if spawned is None and {c.pid for c in serving_children(tree)} - old_pids:
                    spawned = time.monotonic() - killed_at
                if len(listening_lines(tree)) > lines_before:
                    listened = time.monotonic() - killed_at
                    break
                if time.monotonic() - killed_at > 10:
                    break
                await asyncio.sleep(0.01)
            # Scrapes across the kill and the replacement.
            for _ in range(10):
                scrapes.append(await asyncio.to_thread(scrape, port))
                await asyncio.sleep(0.05)
            await self._wait_for_calls(on_survivor, running, 5)
            deadline = time.monotonic() + 10
            for _ in range(500):
                if all(c.ended for c in on_victim) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*running, return_exceptions=True)
            for c in callers:
                await c.ws.close()

        assert all(not c.wrong for c in callers), [c.wrong for c in callers]
        assert all(isinstance(c.ended, ConnectionClosed) for c in on_victim), [
            repr(c.ended) for c in on_victim
        ]
        assert [c.ended for c in on_survivor] == [None] * len(on_survivor), [
            repr(c.ended) for c in on_survivor
        ]
        assert all(c.after_kill > 0 for c in on_survivor), [c.after_kill for c in on_survivor]
        new_children = serving_children(tree)
        assert victim not in {c.pid for c in new_children}
        assert len(new_children) == 2, new_children
        wait_for(lambda: len(gateway_children(tree)) == 3, 10, what="a new spare")
        replacing = re.findall(r"Gateway process (\d+) ended .*; replacing it", tree.log())
        assert len(replacing) == 1, replacing
        assert listening_lines(tree)[-1] == int(replacing[0])
        return spawned, listened, scrapes

    @staticmethod
    async def _wait_for_calls(
        callers: list[Caller], running: list[asyncio.Task[None]], timeout: float
    ) -> None:
        """Wait until each of ``callers`` has had calls answered since now."""
        marks = {id(c): c.calls for c in callers}
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 1):
            if all(c.calls > marks[id(c)] + 1 for c in callers):
                return
            if time.monotonic() > deadline or all(t.done() for t in running):
                break
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"calls stalled: {[(c.calls, repr(c.ended), c.wrong) for c in callers]}"
        )

    def test_a_killed_process_no_longer_counts_its_clients(self) -> None:
        """``/status``'s ``clients`` and ``inflight`` are of live processes: once a
        process is killed, its clients and its requests in flight are not counted.

        Failed at dd0105d (fixed in 9d1bf89): the parent never called prometheus_client's
        ``mark_process_dead`` for an ended process, so the killed one's
        ``gauge_livesum_PID.db`` stays, and its last figures are added for ever."""
        tree, port = start_gateway(self)
        children = serving_children(tree)

        async def scenario() -> tuple[int, dict[str, Any]]:
            callers, held = await open_callers(port, children, 4)
            try:
                victim = held[callers[0].port]
                on_victim = [c for c in callers if held[c.port] == victim]
                survivors = len(callers) - len(on_victim)
                # A call in flight on the victim (the pool's worker takes 3 s).
                sleep = {"id": "s", "function": "sleep", "args": {"seconds": 3}}
                await on_victim[0].ws.send(json.dumps(sleep))

                def counted() -> dict[str, Any] | None:
                    gateway = json.loads(http_get(port, "/status"))["gateway"]
                    ok = gateway["clients"] == len(callers) and gateway["inflight"] == 1
                    return gateway if ok else None

                await poll_async(counted, 5, "every client and the call in flight counted")
                os.kill(victim, signal.SIGKILL)
                for c in on_victim:
                    await asyncio.wait_for(c.ws.wait_closed(), 10)

                # Each process writes its figures every 0.25 s: 3 s is plenty.
                deadline = time.monotonic() + 3
                for _ in range(60):
                    status = await asyncio.to_thread(http_get, port, "/status")
                    gateway = json.loads(status)["gateway"]
                    done = (gateway["clients"], gateway["inflight"]) == (survivors, 0)
                    if done or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                return survivors, gateway
            finally:
                for c in callers:
                    await c.ws.close()

        survivors, gateway = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert (gateway["clients"], gateway["inflight"]) == (survivors, 0), (
            f"{survivors} clients left and none in flight, /status says {gateway}"
        )

    def test_role_all_processes_show_the_parents_pool(self) -> None:
        """Role all with two gateway processes: calls reach the tree's own pool, and
        ``/status``'s ``pool`` and ``/metrics``'s pool gauges are the parent's pool's
        state, whichever process answers; SIGTERM: exit 0, directory removed."""
        tree, port, _ = self.role_all(2, "--gateway-processes=2")
        wait_for(lambda: sorted(listening_lines(tree)) == [0, 1], 30, what="both processes")
        [directory] = {c.environ()["PROMETHEUS_MULTIPROC_DIR"] for c in gateway_children(tree)}

        async def scenario() -> dict[str, Any]:
            ws = await open_ws(port)
            try:
                await ws.send(json.dumps({"id": 1, "function": "echo", "args": {"a": 1}}))
                return json.loads(await asyncio.wait_for(ws.recv(), 10))
            finally:
                await ws.close()

        assert asyncio.run(asyncio.wait_for(scenario(), 30)) == {"id": 1, "result": {"a": 1}}

        def pool_seen() -> dict[str, Any] | None:
            pools = [json.loads(http_get(port, "/status"))["pool"] for _ in range(6)]
            ok = all(p and p.get("count") == 2 and p.get("serving") == 2 for p in pools)
            return pools[0] if ok else None

        pool = wait_for(pool_seen, 10, what="the pool's state in /status")
        assert len(pool["workers"]) == 2
        metrics = http_get(port, "/metrics").decode()
        serving = [
            s.value
            for f in text_string_to_metric_families(metrics)
            for s in f.samples
            if s.name == "taskoffload_workers_serving"
        ]
        assert serving == [2.0], serving
        os.kill(tree.pid, signal.SIGTERM)
        wait_for(lambda: tree.process.poll() is not None, 30, what="twistd to exit")
        assert tree.process.returncode == 0, tree.log()[-3000:]
        assert not os.path.exists(directory)


async def poll_async(predicate: Any, timeout: float, what: str) -> Any:
    """Poll the blocking ``predicate`` (in a thread) until it returns something true."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
