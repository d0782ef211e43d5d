"""Worker recycling and the idle timeout, on the real pool."""

from __future__ import annotations

import json
import time

from tests.integration.support import IntegrationTestCase, LineClient, wait_for


def _whoami_pids(port: int, calls: int) -> list[int]:
    """``calls`` sequential ``whoami`` calls, each on a new connection; their pids."""
    pids = []
    for n in range(calls):
        client = LineClient(port)
        client.send(json.dumps({"id": n, "function": "whoami"}).encode() + b"\n")
        reply = client.reply()
        assert "result" in reply, reply
        pids.append(reply["result"]["pid"])
        client.close()
    return pids


class RecyclingTests(IntegrationTestCase):
    """Tests of recycling."""

    def test_max_tasks_per_child_recycles_without_failures(self):
        """With --max-tasks-per-child 3, one worker is replaced after every 3 tasks;
        no call fails."""
        tree, port = self.pool(1, "--max-tasks-per-child", "3")
        pids = _whoami_pids(port, 9)
        assert len(set(pids)) == 3
        assert [pids.count(p) for p in dict.fromkeys(pids)] == [3, 3, 3]
        tree.wait_for_log("recycles itself: ran 3 tasks (--max-tasks-per-child 3)", timeout=5)

    def test_max_memory_per_child_recycles(self):
        """A worker over --max-memory-per-child is replaced after its task."""
        tree, port = self.pool(1, "--max-memory-per-child", "1")
        pids = _whoami_pids(port, 3)
        assert len(set(pids)) == 3
        tree.wait_for_log("(--max-memory-per-child 1)", timeout=5)

    def test_stalled_partial_line_closed_after_idle_timeout(self):
        """A connection that starts a line and stalls is answered and closed after
        --idle-timeout, and the worker serves others meanwhile."""
        _, port = self.pool(1, "--idle-timeout", "1")
        stalled = LineClient(port)
        stalled.send(b'{"function": "ec')
        started = time.monotonic()
        other = LineClient(port)
        other.send(b'{"id": 1, "function": "noop"}\n')
        assert other.reply() == {"id": 1, "result": None}
        reply = stalled.reply()
        assert reply["error"]["code"] == "bad_request"
        assert "no newline within 1 s" in reply["error"]["message"]
        assert wait_for(stalled.closed, 5, what="the stalled connection to close")
        assert 0.9 < time.monotonic() - started < 5
