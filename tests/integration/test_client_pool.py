"""TaskClient against the real worker pool."""

from __future__ import annotations

import os
import signal
import time

import pytest
from twisted.internet import defer

from taskoffload.client import TaskClient, TaskError
from tests.integration.support import IntegrationTestCase, accepted_by_workers, client_ports, poll


def _client(port: int) -> TaskClient:
    from twisted.internet import reactor

    return TaskClient(reactor, [f"tcp:127.0.0.1:{port}"])


class ClientPoolTests(IntegrationTestCase):
    """Tests of client pool."""

    async def test_sixteen_whoami_spread_over_eight_workers(self):
        """16 concurrent ``whoami(delay=0.5)`` on 8 workers finish in under 1.3 s on 8 pids."""
        tree, port = self.pool(8)
        client = _client(port)
        try:
            start = time.monotonic()
            results = await defer.gatherResults(
                [client.call("whoami", delay=0.5) for _ in range(16)]
            )
            elapsed = time.monotonic() - start
            assert {r["pid"] for r in results} == tree.worker_pids()
            assert len({r["pid"] for r in results}) == 8
            assert elapsed < 1.3, elapsed
        finally:
            await client.close()

    async def test_noop_not_stuck_behind_sleep(self):
        """A ``noop`` sent while a ``sleep(2)`` runs returns in under 0.2 s."""
        tree, port = self.pool(8)
        client = _client(port)
        try:
            sleeping = client.call("sleep", seconds=2)

            def sleep_accepted() -> bool:
                ours = client_ports(tree, port)
                return bool(ours) and accepted_by_workers(tree, ours)

            await poll(sleep_accepted, 5, "a worker to take the sleep")
            start = time.monotonic()
            assert await client.call("noop") is None
            assert time.monotonic() - start < 0.2
            assert await sleeping == 2
        finally:
            await client.close()

    async def test_sigkill_of_busy_worker(self):
        """SIGKILL of a worker mid-task: its caller gets worker_lost, the others results,
        and 8 distinct pids answer again within 2 s."""
        tree, port = self.pool(8)
        client = _client(port)
        try:
            calls = [client.call("whoami", delay=1) for _ in range(8)]
            await poll(lambda: len(client_ports(tree, port)) == 8, 5, "8 connections")
            await poll(
                lambda: accepted_by_workers(tree, client_ports(tree, port)),
                5,
                "every call to be taken by a worker",
            )
            victim = sorted(tree.worker_pids())[0]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = await defer.DeferredList(calls, consumeErrors=True)
            failures = [o for ok, o in outcomes if not ok]
            results = [o for ok, o in outcomes if ok]
            assert len(failures) == 1
            assert failures[0].check(TaskError)
            assert failures[0].value.code == "worker_lost"
            assert len(results) == 7
            assert victim not in {r["pid"] for r in results}
            seen: set[int] = set()
            while len(seen) < 8:
                assert time.monotonic() - killed_at < 2.0, f"only {len(seen)} pids within 2 s"
                batch = await defer.gatherResults(
                    [client.call("whoami", delay=0.2) for _ in range(8)]
                )
                seen = {r["pid"] for r in batch}
            assert victim not in seen
        finally:
            await client.close()

    async def test_errors_arrive_as_task_errors(self):
        """Errors from the pool fail the call with a TaskError carrying code, message, type."""
        _, port = self.pool(2)
        client = _client(port)
        try:
            with pytest.raises(TaskError) as raised:
                await client.call("fail", message="nope")
            assert (raised.value.code, raised.value.message, raised.value.type) == (
                "task_failed",
                "nope",
                "TaskRaised",
            )
            with pytest.raises(TaskError) as raised:
                await client.call("sleep", wrong=1)
            assert raised.value.code == "bad_arguments"
            with pytest.raises(TaskError) as raised:
                await client.send_task("sleep", kwargs={"seconds": 5}, timeout=0.3)
            assert raised.value.code == "timeout"
        finally:
            await client.close()
