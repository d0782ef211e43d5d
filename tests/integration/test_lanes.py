"""
Lanes on the real ``twistd -n taskoffload``: workers set aside for a lane's tasks
run only those, and a burst on the default lane never holds a lane's call; through
``TaskClient``, through the gateway, and with a lane on another pool.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

from twisted.internet import defer
from websockets.asyncio.client import connect

from taskoffload.client import TaskClient
from tests.integration.support import IntegrationTestCase, Twistd, free_port, free_ports, wait_for

LANE_TASKS = """\
import os

from taskoffload.registry import task


@task(lane="interactive")
def noop():
    return os.getpid()


@task
def send_mail(to="someone@example.org", seconds=1.0):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, os.getpid)
"""

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def fetch(url: str) -> bytes:
    """GET ``url``; :return: the body."""
    with _http.open(url, timeout=10) as response:
        body: bytes = response.read()
        return body


def lane_pids(status: dict[str, Any]) -> dict[str, set[int]]:
    """:return: the worker processes of each lane, from a pool's ``/status``."""
    pids: dict[str, set[int]] = {}
    for worker in status["pool"]["workers"]:
        if worker["pid"] is not None:
            pids.setdefault(worker["lane"], set()).add(worker["pid"])
    return pids


class LaneTests(IntegrationTestCase):
    def start_pool(self, count: int, lane: str, *extra: str) -> tuple[Twistd, int, str]:
        """
        A pool of ``count`` workers with ``--lane lane`` and its own ``/status``,
        serving the lane tasks. :return: the tree, its port, its status URL.
        """
        port, status_port = free_ports(2)
        tree = self.twistd_tree(
            "--role=worker",
            f"--count={count}",
            f"--lane={lane}",
            "--tasks",
            "lane_tasks",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--status-listen",
            f"tcp:{status_port}:interface=127.0.0.1",
            *extra,
        )
        tree.wait_for_log(f"All {count} workers serving")
        tree.wait_for_log("Pool status on")
        return tree, port, f"http://127.0.0.1:{status_port}/status"

    def serving_pids(self, url: str, count: int) -> dict[str, set[int]]:
        """:return: each lane's workers, once ``count`` of them serve."""

        def all_serving() -> bool:
            return json.loads(fetch(url))["pool"]["serving"] == count

        wait_for(all_serving, 10, what=f"{count} workers serving")
        return lane_pids(json.loads(fetch(url)))

    async def test_task_client_sends_each_call_to_its_lane(self) -> None:
        """Through TaskClient, on a pool of 6 with --lane interactive=2: every noop runs
        on one of the 2 interactive workers, and all 10 answer while a burst of 12
        one-second send_mail holds every default worker; the mails run only on the
        default lane's 4 workers."""
        self.tasks_module("lane_tasks", LANE_TASKS)
        _tree, port, status = self.start_pool(6, "interactive=2")
        pids = self.serving_pids(status, 6)
        assert len(pids["interactive"]) == 2 and len(pids["default"]) == 4
        from twisted.internet import reactor

        client = TaskClient(reactor, [f"tcp:127.0.0.1:{port}"])
        try:
            mails = [client.call("send_mail", seconds=1.0) for _ in range(12)]
            done = [0]
            for mail in mails:
                mail.addCallback(lambda pid: done.__setitem__(0, done[0] + 1) or pid)
            noops = []
            for _ in range(10):
                noops.append(await client.call("noop"))
            assert done[0] == 0, f"{done[0]} mails had finished before the 10th noop"
            assert set(noops) <= pids["interactive"], (noops, pids)
            assert client.lane_of("noop") == "interactive"
            assert client.slots("interactive") == 2
            assert client.slots("default") == 4
            mail_pids = await defer.gatherResults(mails)
            assert set(mail_pids) <= pids["default"], (mail_pids, pids)
        finally:
            await client.close()

    def test_gateway_keeps_a_line_per_lane(self) -> None:
        """Through the gateway of role all with --lane interactive=2: one client's
        batch of 24 one-second send_mail waits in the default lane, and another
        client's noop calls, sent while it does, run on interactive workers;
        /status shows the lanes, /metrics their gauges."""
        self.tasks_module("lane_tasks", LANE_TASKS)
        gateway_port, pool_port = free_ports(2)
        tree = self.twistd(
            "--count=6",
            "--lane=interactive=2",
            "--tasks",
            "lane_tasks",
            "--listen",
            f"tcp:{gateway_port}:interface=127.0.0.1",
            "--pool-listen",
            f"tcp:{pool_port}:interface=127.0.0.1",
        )
        tree.wait_for_log("Gateway listening on")
        tree.wait_for_log("All 6 workers serving")
        base = f"http://127.0.0.1:{gateway_port}"
        pids = lane_pids(json.loads(fetch(f"{base}/status")))
        url = f"ws://127.0.0.1:{gateway_port}/ws"

        async def run() -> tuple[list[int], dict[str, Any]]:
            async with connect(url) as burst, connect(url) as probe:
                batch = [{"seconds": 1.0} for _ in range(24)]
                await burst.send(json.dumps({"id": "b", "function": "send_mail", "batch": batch}))
                # The batch is in the gateway (its first progress comes as a mail ends).
                assert "progress" in json.loads(await asyncio.wait_for(burst.recv(), 10))
                noops = []
                for n in range(10):
                    await probe.send(json.dumps({"id": n, "function": "noop"}))
                    reply = json.loads(await asyncio.wait_for(probe.recv(), 10))
                    assert "result" in reply, reply
                    noops.append(reply["result"])
                during = json.loads(fetch(f"{base}/status"))
                while "progress" in (reply := json.loads(await asyncio.wait_for(burst.recv(), 30))):
                    pass
                assert "result" in reply and len(reply["result"]) == 24, reply
                assert all("result" in item for item in reply["result"]), reply
                return noops, during

        noops, during = asyncio.run(run())
        assert set(noops) <= pids["interactive"], (noops, pids)
        assert during["pool"]["lanes"]["interactive"]["count"] == 2
        assert during["pool"]["lanes"]["default"]["count"] == 4
        assert during["pool"]["lanes"]["interactive"]["serving"] == 2
        gateway_lanes = during["gateway"]["lanes"]
        # The batch's 24 calls: 4 at the default workers, 20 waiting in its line.
        assert gateway_lanes["default"]["waiting"] + gateway_lanes["default"]["at_pool"] > 4
        assert gateway_lanes["interactive"]["waiting"] == 0
        metrics = fetch(f"{base}/metrics").decode()
        assert 'taskoffload_lane_workers_serving{lane="interactive"} 2.0' in metrics
        assert 'taskoffload_lane_workers{lane="default"} 4.0' in metrics

    def test_a_lane_on_another_pool(self) -> None:
        """A gateway given --pool interactive=ADDRESS sends the lane's calls there: to
        the other pool's interactive workers, not to the first pool's."""
        self.tasks_module("lane_tasks", LANE_TASKS)
        _first, first_port, first_status = self.start_pool(3, "interactive=1")
        lane_port = free_port()
        _second, _, second_status = self.start_pool(
            3, f"interactive=2:tcp:{lane_port}:interface=127.0.0.1"
        )
        first_pids = self.serving_pids(first_status, 3)
        second_pids = self.serving_pids(second_status, 3)
        _gateway, gateway_port = self.gateway(
            f"tcp:127.0.0.1:{first_port}", f"interactive=tcp:127.0.0.1:{lane_port}"
        )

        async def run() -> list[int]:
            async with connect(f"ws://127.0.0.1:{gateway_port}/ws") as ws:
                pids = []
                for n in range(6):
                    await ws.send(json.dumps({"id": n, "function": "noop"}))
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert "result" in reply, reply
                    pids.append(reply["result"])
                return pids

        noops = asyncio.run(run())
        assert set(noops) <= second_pids["interactive"], (noops, first_pids, second_pids)

    def test_a_pool_without_workers_for_a_lane_is_refused(self) -> None:
        """A task module naming a lane the pool reserves no workers for: the pool does
        not start, and its log says which task and how to give the lane workers."""
        log = self.refused_start("lane_tasks", LANE_TASKS)
        assert "noop (lane 'interactive')" in log, log[-2000:]
        assert "--lane interactive=COUNT" in log, log[-2000:]
