"""
Why a worker died, and poison quarantine, against real process trees: the
``cause`` of ``worker_lost`` through the gateway (role all, and a pool and a
gateway apart) and through ``TaskClient``; a call that killed two workers is
answered ``poisoned`` and counted in ``/status`` and ``/metrics``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from taskoffload.client import TaskClient, TaskError
from tests.integration.support import IntegrationTestCase, poll
from tests.integration.test_gateway_end_to_end import Client, eventually, http_get, run, status

# Each task appends its worker's pid to the marker file first: what ran, and where.
TASKS = '''\
"""Tasks that end their worker."""

import os
import time

from taskoffload import task


def _mark(marker):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\\n")


@task
def die(code, marker):
    _mark(marker)
    os._exit(code)


@task
def linger(marker):
    _mark(marker)
    time.sleep(30)
'''


def started(marker: Path) -> list[int]:
    """The pids that have started a task, in order."""
    try:
        return [int(line) for line in marker.read_text().split()]
    except FileNotFoundError:
        return []


class WorkerDeathTests(IntegrationTestCase):
    """The cause of a worker's death, and quarantine, from outside."""

    def deaths_tasks(self) -> Path:
        self.tasks_module("death_tasks", TASKS)
        return self.tmp_path / "ran"

    def test_poison_through_the_gateway(self) -> None:
        """die(3): worker_lost naming exit status 3; again: a second worker dies; the
        third call is poisoned without reaching a worker; die(4) still runs."""
        marker = self.deaths_tasks()
        tree, gateway, _ = self.role_all(2, "--tasks=death_tasks")
        die3 = {"function": "die", "args": {"code": 3, "marker": str(marker)}}

        async def scenario() -> list[dict[str, Any]]:
            client = await Client.open(gateway)
            try:
                replies = [await client.request(dict(die3)) for _ in range(3)]
                die4 = {"function": "die", "args": {"code": 4, "marker": str(marker)}}
                replies.append(await client.request(die4))
                return replies
            finally:
                await client.close()

        first, second, third, fourth = run(scenario(), 60)
        for reply in (first, second):
            assert reply["error"]["code"] == "worker_lost", reply
            assert reply["error"]["cause"]["exit_status"] == 3, reply
            assert "exit status 3" in reply["error"]["message"]
        assert third["error"]["code"] == "poisoned", third
        assert "die" in third["error"]["message"]
        assert fourth["error"]["code"] == "worker_lost", fourth
        assert fourth["error"]["cause"]["exit_status"] == 4
        ran = started(marker)
        assert len(ran) == 3 and len(set(ran)) == 3  # two for die(3), one for die(4)
        poison = status(gateway)["gateway"]["poison"]
        assert poison == {"quarantined": 1, "refused": 1, "kills": 3}
        metrics = http_get(gateway, "/metrics")[1].decode()
        assert "taskoffload_poison_quarantined 1.0" in metrics
        assert "taskoffload_poisoned_total 1.0" in metrics
        assert "died: exit status 3" in tree.log()

    def test_sigkill_names_the_signal_and_memory(self) -> None:
        """A SIGKILLed worker's call gets {"signal": "SIGKILL"} and its last RSS."""
        marker = self.deaths_tasks()
        tree, gateway, _ = self.role_all(2, "--tasks=death_tasks")
        linger = {"function": "linger", "args": {"marker": str(marker)}}

        async def scenario() -> dict[str, Any]:
            client = await Client.open(gateway)
            try:
                reply = await client.send(linger)
                [victim] = await eventually(lambda: started(marker), 10, "the task to start")
                # Its memory is reported about every second.
                await eventually(
                    lambda: any(
                        w["pid"] == victim and w["rss_mib"]
                        for w in status(gateway)["pool"]["workers"]
                    ),
                    10,
                    "its memory reported",
                )
                os.kill(victim, signal.SIGKILL)
                return await reply
            finally:
                await client.close()

        reply = run(scenario(), 60)
        cause = reply["error"]["cause"]
        assert cause["signal"] == "SIGKILL", reply
        assert cause["rss_mib"] > 0
        assert "killed by SIGKILL" in reply["error"]["message"]
        assert "killed by SIGKILL" in tree.log()

    def test_split_roles_carry_the_cause(self) -> None:
        """A pool and a gateway apart: the gateway's worker_lost carries the cause too."""
        marker = self.deaths_tasks()
        _, pool_port = self.pool(2, "--tasks=death_tasks")
        _gateway, gateway_port = self.gateway(f"tcp:127.0.0.1:{pool_port}")

        async def scenario() -> dict[str, Any]:
            client = await Client.open(gateway_port)
            try:
                die = {"function": "die", "args": {"code": 5, "marker": str(marker)}}
                return await client.request(die)
            finally:
                await client.close()

        reply = run(scenario(), 60)
        assert reply["error"]["code"] == "worker_lost", reply
        assert reply["error"]["cause"]["exit_status"] == 5

    async def test_task_client_gets_the_cause_and_quarantines(self) -> None:
        """TaskClient directly: TaskError.cause, then poisoned after two kills."""
        from twisted.internet import reactor

        marker = self.deaths_tasks()
        _, port = self.pool(2, "--tasks=death_tasks")
        client = TaskClient(reactor, [f"tcp:127.0.0.1:{port}"], timeout=20)
        try:
            for _ in range(2):
                with pytest.raises(TaskError) as raised:
                    await client.call("die", code=6, marker=str(marker))
                assert raised.value.code == "worker_lost"
                assert raised.value.cause is not None
                assert raised.value.cause["exit_status"] == 6
            await poll(lambda: len(started(marker)) == 2, 5, "both deaths")
            with pytest.raises(TaskError) as raised:
                await client.call("die", code=6, marker=str(marker))
            assert raised.value.code == "poisoned"
            assert len(started(marker)) == 2
            assert client.poison.status()["quarantined"] == 1
        finally:
            await client.close()
