"""
The worker pool's documented lifecycle on the real ``twistd -n taskoffload
--role=worker``: the fork server's death, a task module that imports the reactor,
``--concurrency``, an ``auth`` line without a secret, and a cancel that reaches a
synchronous task too late.  Raw newline-JSON lines over loopback sockets.
"""

from __future__ import annotations

import json

import psutil

from tests.integration.support import IntegrationTestCase, LineClient, wait_for

TASKS = """
import os
import time
from pathlib import Path

from taskoffload import task

_arrived = 0


@task
async def meet(n):
    # Returns once n calls have arrived in this process: only calls that run at
    # the same time can all return.
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    global _arrived
    _arrived += 1
    while _arrived < n:
        await deferLater(reactor, 0.01, lambda: None)
    return os.getpid()


@task
def hold(marker, seconds):
    Path(marker).touch()
    time.sleep(seconds)
    return "held"


@task
def ping():
    return "pong"
"""

REACTOR_AT_IMPORT = """
from twisted.internet import reactor

from taskoffload import task


@task
def later():
    return reactor.seconds()
"""


def line(message: dict) -> bytes:
    return json.dumps(message).encode() + b"\n"


def call(port: int, request: dict) -> dict:
    """Send one request on a new connection; :return: its reply."""
    client = LineClient(port, timeout=10)
    try:
        client.send(line(request))
        return client.reply()
    finally:
        client.close()


class WorkerLifecycleTests(IntegrationTestCase):
    """The worker pool's documented lifecycle, end to end."""

    def tasks_pool(self, count: int, *extra: str):
        """A pool serving this file's :data:`TASKS` module."""
        self.tasks_module("lifecycle_tasks", TASKS)
        return self.pool(count, "--tasks", "lifecycle_tasks", *extra)

    def test_fork_server_death_reforks_the_pool(self):
        """docs/architecture.rst (Supervision): when the fork server dies its workers die
        with it, and the supervisor starts another that forks a new pool, which serves."""
        tree, port = self.pool(2)
        supervisor = psutil.Process(tree.pid)
        (old_server,) = supervisor.children()
        old_workers = tree.worker_pids()
        assert len(old_workers) == 2
        old_server.kill()

        def new_pool() -> set[int] | None:
            try:
                servers = [p for p in supervisor.children() if p.pid != old_server.pid]
                if len(servers) != 1:
                    return None
                workers = {
                    p.pid for p in servers[0].children() if p.status() != psutil.STATUS_ZOMBIE
                }
            except psutil.NoSuchProcess:
                return None  # caught mid-change
            return workers if len(workers) == 2 else None

        new_workers = wait_for(new_pool, 15, what="a new fork server with 2 workers")
        assert not new_workers & old_workers
        wait_for(
            lambda: not any(psutil.pid_exists(pid) for pid in old_workers),
            5,
            what="the old workers to be gone",
        )
        tree.wait_for_log("The fork server exited")
        reply = call(port, {"id": 1, "function": "whoami"})
        assert reply["result"]["pid"] in new_workers, reply

    def test_task_module_importing_the_reactor_is_refused(self):
        """README (Writing tasks): a --tasks module that imports twisted.internet.reactor
        at import time stops the start, and the log says to import it inside the task."""
        log = self.refused_start("reactor_tasks", REACTOR_AT_IMPORT)
        assert "The worker pool cannot start" in log, log
        assert "a task module imported twisted.internet.reactor at import time" in log, log
        assert "import it inside the task function instead" in log, log
        assert "workers serving" not in log, log

    def test_concurrency_runs_several_tasks_in_one_worker(self):
        """README (--concurrency): with ``--count=1 --concurrency=3`` the one worker
        process runs three tasks at once: three calls that each wait for the other two
        all return, from that process."""
        tree, port = self.tasks_pool(1, "--concurrency=3")
        (worker,) = tree.worker_pids()
        clients = [LineClient(port, timeout=10) for _ in range(3)]
        for n, client in enumerate(clients):
            client.send(line({"id": n, "function": "meet", "args": {"n": 3}, "timeout": 5}))
        replies = [client.reply() for client in clients]
        for client in clients:
            client.close()
        assert replies == [{"id": n, "result": worker} for n in range(3)]

    def test_auth_line_without_a_secret_is_ignored(self):
        """docs/protocol.rst (Challenge): on a pool without a secret an ``auth`` line is
        ignored: no reply, and the connection serves the request after it."""
        _, port = self.pool(1)
        client = LineClient(port)
        self.addCleanup(client.close)
        client.send(b'{"auth": "00"}\n' + line({"id": 1, "function": "echo", "args": {"a": 1}}))
        assert client.reply() == {"id": 1, "result": {"a": 1}}

    def test_cancel_of_a_running_synchronous_task_gets_its_result(self):
        """docs/protocol.rst (Cancel): a synchronous task blocks its worker, which reads a
        cancel only after the task returned, so the task's result is sent."""
        _, port = self.tasks_pool(1)
        marker = self.tmp_path / "started"
        client = LineClient(port, timeout=10)
        self.addCleanup(client.close)
        client.send(line({"id": "h", "function": "hold", "args": [str(marker), 1]}))
        wait_for(marker.exists, 5, what="the task to start")
        client.send(line({"cancel": "h"}) + line({"id": 2, "function": "ping"}))
        assert client.reply() == {"id": "h", "result": "held"}
        assert client.reply() == {"id": 2, "result": "pong"}
