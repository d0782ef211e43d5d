"""TaskClient's retry of idempotent tasks (``@task(retry=True)``) against the real worker pool."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from taskoffload.client import TaskClient, TaskError
from tests.integration.support import IntegrationTestCase, poll

# Each task appends its worker's pid to ``marker`` as it starts, so the test knows
# which worker to kill (and when the task is running), and how often it ran.
TASKS = '''\
"""The same slow task, idempotent and not."""

import os
import time

from taskoffload import task


def _run(seconds, marker):
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(seconds)
    return os.getpid()


@task(retry=True)
def slow_pid(seconds, marker):
    return _run(seconds, marker)


@task
def slow_pid_once(seconds, marker):
    return _run(seconds, marker)
'''


def _client(port: int) -> TaskClient:
    from twisted.internet import reactor

    return TaskClient(reactor, [f"tcp:127.0.0.1:{port}"])


def _started(marker: Path) -> list[int]:
    """The pids that have started the task, in order."""
    try:
        return [int(line) for line in marker.read_text().split()]
    except FileNotFoundError:
        return []


class ClientRetryTests(IntegrationTestCase):
    """Tests of client retry."""

    def retry_pool(self):
        """A pool of two workers serving ``retry_tasks``, written into the test's directory."""
        # twistd inherits the environment, and the workers the supervisor's sys.path.
        self.tasks_module("retry_tasks", TASKS)
        return self.pool(2, "--tasks=retry_tasks")

    async def test_idempotent_task_survives_its_worker(self):
        """SIGKILL of the worker running a retry=True task: the call succeeds on another worker."""
        tree, port = self.retry_pool()
        marker = self.tmp_path / "slow_pid.started"
        client = _client(port)
        try:
            call = client.send_task(
                "slow_pid", kwargs={"seconds": 1.0, "marker": str(marker)}, timeout=10
            )
            [victim] = await poll(lambda: _started(marker), 5, "the task to start")
            assert victim in tree.worker_pids()
            os.kill(victim, signal.SIGKILL)
            pid = await call
            assert pid != victim
            assert _started(marker) == [victim, pid]
        finally:
            await client.close()

    async def test_other_task_fails_with_its_worker(self):
        """SIGKILL of the worker running a task without retry: the call fails with worker_lost."""
        tree, port = self.retry_pool()
        marker = self.tmp_path / "slow_pid_once.started"
        client = _client(port)
        try:
            call = client.send_task(
                "slow_pid_once", kwargs={"seconds": 1.0, "marker": str(marker)}, timeout=10
            )
            [victim] = await poll(lambda: _started(marker), 5, "the task to start")
            assert victim in tree.worker_pids()
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(TaskError) as raised:
                await call
            assert raised.value.code == "worker_lost"
            assert _started(marker) == [victim]
        finally:
            await client.close()
