"""
The pool's HAProxy agent (``--agent-listen``) on the real ``twistd -n taskoffload
--role=worker``, read as HAProxy reads it (connect, read one line, closed): the
weight follows the free task slots, and a stopping or reloading pool says
``drain`` while it finishes what it runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

from tests.integration.support import IntegrationTestCase, LineClient, free_port, wait_for

#: ``hold`` runs until its release file exists: a slow task the test ends.
TASKS = '''\
"""A task that runs until the test releases it."""

import os

from taskoffload import task


@task
async def hold(release):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    while not os.path.exists(release):
        await deferLater(reactor, 0.02, lambda: None)
    return os.getpid()
'''


def read_agent(port: int) -> str:
    """
    One agent check: :return: what the agent wrote before it closed, or ``""`` if
    nothing listens.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as agent:
            chunks = []
            while chunk := agent.recv(1024):
                chunks.append(chunk)
    except OSError:
        return ""
    return b"".join(chunks).decode("ascii")


class AgentCheckTests(IntegrationTestCase):
    """Tests of the pool's agent check."""

    def agent_pool(self, *extra: str) -> tuple[int, int, int]:
        """
        Start two workers on the ``hold`` task with ``--agent-listen``, and wait until
        the agent answers.

        :return: the tree's pid, the pool's port and the agent's.
        """
        self.tasks_module("agent_tasks", TASKS)
        agent_port = free_port()
        self.tree, port = self.pool(
            2,
            "--tasks=agent_tasks",
            "--agent-listen",
            f"tcp:{agent_port}:interface=127.0.0.1",
            *extra,
        )
        self.tree.wait_for_log("HAProxy agent on")
        return self.tree.pid, port, agent_port

    def hold(self, port: int, name: str) -> tuple[LineClient, Path]:
        """Send ``hold`` to the pool; :return: its connection and its release file."""
        release = self.tmp_path / name
        client = LineClient(port, timeout=30)
        client.send(json.dumps({"id": 1, "function": "hold", "args": [str(release)]}).encode())
        client.send(b"\n")
        self.addCleanup(client.close)
        self.addCleanup(release.touch)
        return client, release

    def answers(self, agent_port: int, line: str, what: str, timeout: float = 10) -> None:
        wait_for(lambda: read_agent(agent_port) == line, timeout, what=f"{line!r} {what}")

    def test_weight_follows_free_slots_and_a_stopping_pool_drains(self) -> None:
        """Idle: ``up ready 100%``; one of two workers busy: ``up ready 50%``; back to
        100% when its task ends. SIGTERM while a task runs: ``drain`` until the stop is
        done, and that task still gets its result."""
        pid, port, agent_port = self.agent_pool()
        self.answers(agent_port, "up ready 100%\n", "from an idle pool")

        client, release = self.hold(port, "release-1")
        self.answers(agent_port, "up ready 50%\n", "with one of two workers busy")
        release.touch()
        worker = client.reply()
        assert worker["id"] == 1 and worker["result"] in self.tree.worker_pids()
        self.answers(agent_port, "up ready 100%\n", "once the task ended")

        client, release = self.hold(port, "release-2")
        self.answers(agent_port, "up ready 50%\n", "with one of two workers busy")
        workers = self.tree.worker_pids()
        os.kill(pid, signal.SIGTERM)
        self.answers(agent_port, "drain\n", "from the stopping pool")
        self.tree.wait_for_log("Stopping: finishing 1 task(s)")
        # The stop waits for the task: the agent goes on saying drain meanwhile.
        assert self.tree.process.poll() is None
        assert read_agent(agent_port) == "drain\n"
        release.touch()
        reply = client.reply()
        assert reply["id"] == 1 and reply["result"] in workers, reply
        self.tree.process.wait(timeout=20)
        assert self.tree.process.returncode == 0, self.tree.log()
        assert read_agent(agent_port) == ""

    def test_a_reloading_pool_drains_then_is_ready_again(self) -> None:
        """SIGHUP while a task runs: ``drain`` until the reload completes (the busy
        worker is replaced once its task ends), then ``up ready 100%`` again."""
        pid, port, agent_port = self.agent_pool()
        self.answers(agent_port, "up ready 100%\n", "from an idle pool")
        client, release = self.hold(port, "release")
        self.answers(agent_port, "up ready 50%\n", "with one of two workers busy")
        os.kill(pid, signal.SIGHUP)
        self.answers(agent_port, "drain\n", "from the reloading pool")
        release.touch()
        assert client.reply()["id"] == 1
        self.tree.wait_for_log("Reload complete: 2 workers replaced")
        self.answers(agent_port, "up ready 100%\n", "after the reload")
