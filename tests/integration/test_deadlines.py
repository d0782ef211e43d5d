"""Hard deadlines on the real pool: a task past its timeout never keeps its slot."""

from __future__ import annotations

import json
import time

from tests.integration.support import IntegrationTestCase, LineClient, wait_for

TASKS = """
import signal
import time

from taskoffload import task


@task
def spin():
    while True:
        pass


@task
def unstoppable(seconds=30):
    # Block the alarm: nothing inside the process can end this call.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(seconds)


@task
def noop():
    return None
"""


def _start(case: IntegrationTestCase, *extra: str):
    case.tasks_module("deadline_tasks", TASKS)
    return case.pool(1, "--tasks", "deadline_tasks", *extra)


def _call(port: int, function: str, **fields) -> LineClient:
    client = LineClient(port, timeout=10)
    client.send(json.dumps({"id": 1, "function": function, **fields}).encode() + b"\n")
    return client


class DeadlineTests(IntegrationTestCase):
    """Tests of deadlines."""

    def test_spinning_task_times_out_and_slot_serves_again(self):
        """A task that never returns, called with timeout=1, gets ``timeout`` after about
        1 s and the worker serves again at once."""
        _, port = _start(self)
        started = time.monotonic()
        reply = _call(port, "spin", timeout=1).reply()
        elapsed = time.monotonic() - started
        assert reply["error"]["code"] == "timeout"
        assert 0.9 < elapsed < 2.0, elapsed
        assert _call(port, "noop").reply() == {"id": 1, "result": None}
        assert time.monotonic() - started < 3.0

    def test_task_timeout_option_applies_to_calls_without_one(self):
        """--task-timeout bounds a call that gives no timeout of its own."""
        _, port = _start(self, "--task-timeout", "1")
        reply = _call(port, "spin").reply()
        assert reply["error"]["code"] == "timeout"

    def test_uninterruptible_task_is_killed_after_grace(self):
        """A task that cannot be interrupted is killed 1 s after its deadline; its worker
        is replaced and serves again within 2 s of the deadline."""
        tree, port = _start(self)
        (victim,) = tree.worker_pids()
        client = _call(port, "unstoppable", timeout=1)
        started = time.monotonic()
        assert wait_for(client.closed, 10, what="the stuck worker's connection to drop")
        assert time.monotonic() - started < 3.0
        tree.wait_for_log(f"(pid {victim}) is still running a task 1.0 s past its deadline")

        def fresh_worker_serves():
            return _call(port, "noop").reply() == {"id": 1, "result": None}

        assert wait_for(fresh_worker_serves, 5, what="a replacement worker")
        assert time.monotonic() - started < 3.5
        assert victim not in tree.worker_pids()
