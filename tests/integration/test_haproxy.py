"""
Real HAProxy (Debian's ``haproxy``) in front of two worker pools, driven through
a gateway over WebSocket, as ``docs/operations.rst`` describes; and balancing them
by their agents (``--agent-listen``), over raw connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from tests.integration.support import (
    IntegrationTestCase,
    LineClient,
    Twistd,
    free_ports,
    wait_for,
)


def haproxy_config(
    port: int,
    pools: dict[str, int],
    stats: Path,
    agents: dict[str, int] | None = None,
    check: str = "check inter 200ms fall 1 rise 1",
) -> str:
    """
    A TCP load balancer on ``port`` over the worker pools named in ``pools``, each
    checked by ``check`` and, if ``agents`` names its agent port, by the pool's
    agent (``--agent-listen``) every 200 ms.
    """
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{pool_port} {check}"
        + (f" agent-check agent-port {agents[name]} agent-inter 200ms weight 100" if agents else "")
        for name, pool_port in pools.items()
    )
    return f"""\
global
    maxconn 4096
    stats socket {stats} mode 600 level admin
    log stdout format raw local0

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 500ms
    retries 3
    option redispatch

frontend pools
    bind 127.0.0.1:{port}
    default_backend workers

backend workers
    balance leastconn
    option tcp-check
{servers}
"""


class HAProxy:
    """One ``haproxy -db`` process in a session of its own."""

    def __init__(self, directory: Path, port: int, pools: dict[str, int], **options: Any) -> None:
        self.port = port
        self.stats = directory / "haproxy.sock"
        self.config = directory / "haproxy.cfg"
        self.config.write_text(haproxy_config(port, pools, self.stats, **options))
        self.log_path = directory / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, executable: str) -> HAProxy:
        check = subprocess.run(
            [executable, "-c", "-f", str(self.config)], capture_output=True, text=True
        )
        assert check.returncode == 0, (
            f"haproxy rejects {self.config}:\n{check.stdout}{check.stderr}"
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [executable, "-db", "-f", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def command(self, line: str) -> str:
        """:return: the stats socket's answer to ``line``."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.stats))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self) -> dict[str, str]:
        """``UP``, ``DOWN``... of each server of the ``workers`` backend."""
        return {name: record["status"] for name, record in self.server_stats().items()}

    def server_stats(self) -> dict[str, dict[str, str]]:
        """The ``show stat`` record (``status``, ``weight``, ``stot``...) of each
        server of the ``workers`` backend."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
        try:
            rows = self.command("show stat").splitlines()
        except OSError:
            return {}  # not listening yet
        header = rows[0].lstrip("# ").split(",")
        found = {}
        for row in rows[1:]:
            record = dict(zip(header, row.split(","), strict=False))
            if record.get("pxname") == "workers" and record["svname"] not in ("BACKEND", ""):
                found[record["svname"]] = record
        return found

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


@contextlib.contextmanager
def haproxies(tmp_path: Path) -> Iterator[Any]:
    """Start HAProxy over given pools; it is ended, with its process group, on teardown."""
    executable = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if executable is None:
        raise AssertionError(
            "haproxy is not installed: this test runs the real one "
            "(apt-get install haproxy; .ci/run installs it)"
        )
    started: list[HAProxy] = []

    def start(port: int, pools: dict[str, int], **options: Any) -> HAProxy:
        proxy = HAProxy(tmp_path, port, pools, **options)
        started.append(proxy)
        return proxy.start(executable)

    yield start
    for proxy in started:
        proxy.stop()


def start_pool(start, port: int, count: int) -> Twistd:
    """A worker pool alone on ``port``, serving."""
    tree = start("--role=worker", f"--count={count}", "--listen", f"tcp:{port}:interface=127.0.0.1")
    tree.wait_for_log(f"All {count} workers serving")
    return tree


class HAProxyTests(IntegrationTestCase):
    """Tests of haproxy."""

    def _stopping_one_of_two_pools_behind_haproxy_leaves_no_request_unanswered(self, drain_first):
        """Load through gateway, HAProxy and two pools; one pool stops mid-run: one reply each."""
        haproxy = self.use(haproxies(self.tmp_path))
        port_a, port_b, proxy_port, gateway_port = free_ports(4)
        pool_a = start_pool(self.twistd_tree, port_a, 2)
        pool_b = start_pool(self.twistd_tree, port_b, 2)
        workers_a, workers_b = pool_a.worker_pids(), pool_b.worker_pids()
        proxy = haproxy(proxy_port, {"a": port_a, "b": port_b})
        wait_for(
            lambda: proxy.server_status() == {"a": "UP", "b": "UP"},
            10,
            what="both pools UP in haproxy",
        )
        gateway = self.twistd_tree(
            "--role=gateway",
            "--pool",
            f"tcp:127.0.0.1:{proxy_port}",
            "--listen",
            f"tcp:{gateway_port}:interface=127.0.0.1",
        )
        gateway.wait_for_log("Gateway listening on")

        sent: list[tuple[int, int]] = []
        replies: dict[tuple[int, int], list[dict[str, Any]]] = {}
        marks: dict[str, float] = {}

        async def client(c: int, stop: asyncio.Event) -> None:
            requests = itertools.cycle(
                [{"function": "whoami", "args": {"delay": 0.005}}, {"function": "noop"}]
            )
            async with connect(
                f"ws://127.0.0.1:{gateway_port}/ws", proxy=None, compression=None, open_timeout=10
            ) as ws:
                for i in itertools.count():
                    if stop.is_set():
                        break
                    key = (c, i)
                    sent.append(key)
                    replies[key] = []
                    await ws.send(json.dumps({**next(requests), "id": i}))
                    # One request in flight per client: the next is sent after its reply.
                    while True:
                        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                        if "progress" in message:
                            continue
                        replies[(c, message["id"])].append(message | {"at": time.monotonic()})
                        if message["id"] == i:
                            break

        async def scenario() -> None:
            stop = asyncio.Event()
            loads = [asyncio.create_task(client(c, stop)) for c in range(10)]
            start = time.monotonic()
            await asyncio.sleep(1.5)
            marks["stop"] = time.monotonic()
            if drain_first:
                # The documented procedure: no new connections to A, then stop it.
                proxy.command("set server workers/a state maint")
                while proxy.server_status()["a"] != "MAINT":
                    await asyncio.sleep(0.02)
            os.killpg(pool_a.pid, signal.SIGTERM)
            while pool_a.process.poll() is None and time.monotonic() - marks["stop"] < 15:
                await asyncio.sleep(0.02)
            marks["exited"] = time.monotonic()
            await asyncio.sleep(max(1.5, 4.0 - (time.monotonic() - start)))
            stop.set()
            await asyncio.gather(*loads)

        asyncio.run(asyncio.wait_for(scenario(), 40))

        final = [r for rs in replies.values() for r in rs]
        errors = [r for r in final if "error" in r]
        outcomes = Counter(r["error"]["code"] if "error" in r else "ok" for r in final)
        print(
            f"\n{len(sent)} requests through haproxy, {len(final)} replies, {outcomes}; "
            f"pool A exited {marks['exited'] - marks['stop']:.2f} s after SIGTERM; "
            f"haproxy sees {proxy.server_status()}"
        )
        for error in errors[:5]:
            print("error:", error)
        unanswered = [k for k in sent if len(replies[k]) != 1]
        assert unanswered == [], f"requests without exactly one reply: {unanswered[:10]}"
        assert pool_a.process.returncode == 0, pool_a.log()
        # Drained or not, nothing is lost: a stopping pool refuses new connections at
        # once (HAProxy redispatches them), and a connection closed before a worker
        # took it is retried by the gateway's client (see docs/operations.rst).
        assert errors == [], f"{len(errors)} errors, e.g. {errors[:3]}\n{proxy.log()[-3000:]}"

        pids_before = {
            r["result"]["pid"]
            for r in final
            if r["at"] < marks["stop"] and isinstance(r.get("result"), dict)
        }
        assert pids_before & workers_a, "pool A served nothing before its stop"
        assert pids_before & workers_b, "pool B served nothing before A's stop"
        pids_after = {
            r["result"]["pid"]
            for r in final
            if r["at"] > marks["exited"] and isinstance(r.get("result"), dict)
        }
        assert pids_after and pids_after <= workers_b
        assert proxy.server_status()["a"] == ("MAINT" if drain_first else "DOWN")

    def test_stopping_one_of_two_pools_behind_haproxy_leaves_no_request_unanswered_drained_then_stopped(
        self,
    ):
        """One of two pools behind HAProxy drained then stopped mid-load: every request gets one reply."""
        self._stopping_one_of_two_pools_behind_haproxy_leaves_no_request_unanswered(
            drain_first=True
        )

    def test_stopping_one_of_two_pools_behind_haproxy_leaves_no_request_unanswered_stopped(self):
        """One of two pools behind HAProxy stopped mid-load: every request gets one reply."""
        self._stopping_one_of_two_pools_behind_haproxy_leaves_no_request_unanswered(
            drain_first=False
        )


#: ``hold`` runs until its release file exists (a slow task the test ends); ``pid``
#: names its worker at once.
AGENT_TASKS = '''\
"""A task that runs until the test releases it, and one that answers at once."""

import os

from taskoffload import task


@task
async def hold(release):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    while not os.path.exists(release):
        await deferLater(reactor, 0.02, lambda: None)
    return os.getpid()


@task
def pid():
    return os.getpid()
'''


class HAProxyAgentTests(IntegrationTestCase):
    """
    HAProxy over two pools of two workers, each with ``agent-check`` on its pool's
    ``--agent-listen`` every 200 ms. The regular check is slow on purpose (a pool
    is down after 3 failed checks a second apart), so what HAProxy does at once is
    the agent's doing.
    """

    def setUp(self) -> None:
        super().setUp()
        self.tasks_module("agent_tasks", AGENT_TASKS)
        start = self.use(haproxies(self.tmp_path))
        port_a, port_b, agent_a, agent_b, proxy_port = free_ports(5)
        self.ports = {"a": port_a, "b": port_b}
        self.agents = {"a": agent_a, "b": agent_b}
        self.pools = {
            "a": self.agent_pool(port_a, agent_a),
            "b": self.agent_pool(port_b, agent_b),
        }
        self.proxy = start(
            proxy_port,
            self.ports,
            agents={"a": agent_a, "b": agent_b},
            check="check inter 1s fall 3 rise 1",
        )
        wait_for(
            lambda: self.proxy.server_status() == {"a": "UP", "b": "UP"},
            10,
            what="both pools UP in haproxy",
        )
        self.weights_are({"a": "100", "b": "100"})

    def agent_pool(self, port: int, agent_port: int) -> Twistd:
        tree = self.twistd_tree(
            "--role=worker",
            "--count=2",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--tasks=agent_tasks",
            "--agent-listen",
            f"tcp:{agent_port}:interface=127.0.0.1",
        )
        tree.wait_for_log("All 2 workers serving")
        tree.wait_for_log("HAProxy agent on")
        return tree

    def weights_are(self, weights: dict[str, str]) -> None:
        def current() -> dict[str, str]:
            return {name: r["weight"] for name, r in self.proxy.server_stats().items()}

        wait_for(lambda: current() == weights, 10, what=f"haproxy weights {weights}")

    def hold(self, pool: str, name: str) -> tuple[LineClient, Path]:
        """Send ``hold`` straight to ``pool`` (not through HAProxy);
        :return: its connection and its release file."""
        release = self.tmp_path / name
        client = LineClient(self.ports[pool], timeout=30)
        client.send(json.dumps({"id": 1, "function": "hold", "args": [str(release)]}).encode())
        client.send(b"\n")
        self.addCleanup(client.close)
        self.addCleanup(release.touch)
        return client, release

    def connect_through(self, n: int) -> set[int]:
        """
        Open ``n`` connections through HAProxy, one after the other, each running
        ``pid``; they stay open (so HAProxy's ``leastconn`` sees them) until cleanup.

        :return: the workers that answered.
        """
        pids = set()
        for i in range(n):
            client = LineClient(self.proxy.port, timeout=5)
            self.addCleanup(client.close)
            client.send(json.dumps({"id": i, "function": "pid"}).encode() + b"\n")
            pids.add(client.reply()["result"])
        return pids

    def sessions(self) -> dict[str, tuple[int, int]]:
        """Each server's sessions so far, and its failed connection attempts."""
        return {
            name: (int(r["stot"] or 0), int(r["econ"] or 0))
            for name, r in self.proxy.server_stats().items()
        }

    def test_new_connections_go_where_task_slots_are_free(self) -> None:
        """Each pool holding a connection from HAProxy (as a gateway's are), pool A fully
        busy (weight 1%) and B idle (100%): ten new connections all go to B. Once A is
        idle again its weight is back to 100%, and the next go to A, which now has
        fewer connections."""
        # leastconn sends a connection to a server that has none whatever its weight:
        # give each pool one first, as the gateways' lasting connections do.
        first = self.connect_through(2)
        assert first & self.pools["a"].worker_pids() and first & self.pools["b"].worker_pids()
        holds = [self.hold("a", f"release-{i}") for i in range(2)]
        self.weights_are({"a": "1", "b": "100"})
        before = self.sessions()
        assert self.connect_through(10) <= self.pools["b"].worker_pids()
        after = self.sessions()
        assert after["a"] == before["a"], (before, after)
        assert after["b"][0] - before["b"][0] == 10, (before, after)

        for client, release in holds:
            release.touch()
            assert client.reply()["result"] in self.pools["a"].worker_pids()
        self.weights_are({"a": "100", "b": "100"})
        assert self.connect_through(3) <= self.pools["a"].worker_pids()

    def test_a_stopping_pool_gets_no_new_connection(self) -> None:
        """SIGTERM to pool A while it runs a task: HAProxy drains A at once (its agent
        says ``drain``), sends ten new connections to B without trying A, and A's
        task still gets its result before A exits. A pool started again in A's place
        lifts the drain (its agent says ``ready``) and gets connections again."""
        client, release = self.hold("a", "release")
        self.weights_are({"a": "50", "b": "100"})
        workers_a = self.pools["a"].worker_pids()
        os.kill(self.pools["a"].pid, signal.SIGTERM)
        wait_for(
            lambda: self.proxy.server_status()["a"].startswith("DRAIN"),
            5,
            what="haproxy to drain pool A",
        )
        before = self.sessions()
        assert self.connect_through(10) <= self.pools["b"].worker_pids()
        after = self.sessions()
        assert after["a"] == before["a"], (before, after)
        assert after["b"][0] - before["b"][0] == 10, (before, after)
        assert self.pools["a"].process.poll() is None, "pool A stopped before its task ended"
        release.touch()
        assert client.reply()["result"] in workers_a
        self.pools["a"].process.wait(timeout=20)
        assert self.pools["a"].process.returncode == 0, self.pools["a"].log()

        again = self.agent_pool(self.ports["a"], self.agents["a"])
        wait_for(
            lambda: self.proxy.server_status()["a"] == "UP",
            10,
            what="haproxy to take the restarted pool A back",
        )
        self.weights_are({"a": "100", "b": "100"})
        # B holds the ten connections, A none: the next goes to A.
        assert self.connect_through(1) <= again.worker_pids()
