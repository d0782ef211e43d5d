"""Rolling reload (SIGHUP) on the real pool: new code, no failed request."""

from __future__ import annotations

import os
import signal
import time

from twisted.internet import defer

from taskoffload.client import TaskClient
from tests.integration.support import IntegrationTestCase, LineClient, poll, wait_for

VERSION = """
import time

from taskoffload import task


@task
def version(work=0.02):
    time.sleep(work)
    return {VERSION!r}
"""


class ReloadTests(IntegrationTestCase):
    """Tests of reload."""

    async def test_sighup_reloads_new_code_without_failed_requests(self):
        """Under load from 20 callers, SIGHUP replaces every worker with the changed task
        module; no request fails, and replies after the reload come from the new code."""
        from twisted.internet import reactor

        module = self.tasks_module("versioned_tasks", VERSION.replace("{VERSION!r}", repr("one")))
        tree, port = self.pool(4, "--tasks", "versioned_tasks")
        client = TaskClient(reactor, [f"tcp:127.0.0.1:{port}"], timeout=20)
        outcomes: list[tuple[float, object]] = []
        running = True

        async def caller() -> None:
            while running:
                try:
                    outcomes.append((time.monotonic(), await client.call("version")))
                except Exception as e:  # every failure is a finding
                    outcomes.append((time.monotonic(), e))

        callers = [defer.ensureDeferred(caller()) for _ in range(20)]
        try:
            await poll(lambda: len(outcomes) >= 50, 10, "50 calls before the reload")
            # A different size as well as a new mtime, so no stale bytecode is used.
            module.write_text(VERSION.replace("{VERSION!r}", repr("two, the new one")))
            future = time.time() + 5
            os.utime(module, (future, future))
            os.kill(tree.pid, signal.SIGHUP)
            await poll(
                lambda: "Reload complete: 4 workers replaced" in tree.log(), 20, "the reload"
            )
            reloaded_at = time.monotonic()
            await poll(
                lambda: sum(1 for t, _ in outcomes if t > reloaded_at) >= 50,
                10,
                "50 calls after the reload",
            )
        finally:
            running = False
            await defer.DeferredList(callers)
            await client.close()
        failures = [o for _, o in outcomes if not isinstance(o, str)]
        assert failures == []
        assert outcomes[0][1] == "one"
        assert {o for t, o in outcomes if t > reloaded_at} == {"two, the new one"}
        assert len(tree.worker_pids()) == 4

    def test_reload_with_broken_code_keeps_the_old_workers(self):
        """A reload whose new code fails to import is aborted; the old workers serve on."""
        import json

        module = self.tasks_module("versioned_tasks", VERSION.replace("{VERSION!r}", repr("one")))
        tree, port = self.pool(2, "--tasks", "versioned_tasks")
        before = tree.worker_pids()
        module.write_text("this is not python\n")
        future = time.time() + 5
        os.utime(module, (future, future))
        os.kill(tree.pid, signal.SIGHUP)
        tree.wait_for_log("Reload aborted, the workers keep the old code", timeout=20)
        # (The failed fork server may take a moment to exit; until then the tree
        # has two, and worker_pids() cannot tell which is which.)
        wait_for(lambda: tree.worker_pids() == before, 5, what="the same workers, and only them")
        client = LineClient(port)
        client.send(
            json.dumps({"id": 1, "function": "version", "args": {"work": 0}}).encode() + b"\n"
        )
        assert client.reply() == {"id": 1, "result": "one"}
