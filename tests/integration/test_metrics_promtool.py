"""
The gateway's ``/metrics`` as Prometheus reads it, and the status command's
token, end to end: the real ``twistd -n taskoffload`` (role all) on loopback.

``/metrics`` is checked by Debian's ``promtool check metrics`` (package
``prometheus``, installed by ``.ci/run``), which must find nothing to say, after
calls that succeed, fail and name no task, with one gateway process and with
two.  A missing promtool fails the tests; they are not skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from typing import Any

from websockets.asyncio.client import connect

from tests.integration.support import IntegrationTestCase, wait_for

#: The calls sent before each scrape: each id, its function and arguments.
CALLS: list[tuple[int, str, dict[str, Any]]] = [
    (1, "echo", {"n": 1}),
    (2, "echo", {"n": 2}),
    (3, "fail", {}),
    (4, "no_such_task", {}),
]


def send_calls(port: int, token: str | None = None) -> dict[int, dict[str, Any]]:
    """Send :data:`CALLS` over one WebSocket; :return: the final replies by id."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def scenario() -> dict[int, dict[str, Any]]:
        async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers=headers) as ws:
            for request_id, function, kwargs in CALLS:
                await ws.send(
                    json.dumps({"id": request_id, "function": function, "kwargs": kwargs})
                )
            replies = {}
            while len(replies) < len(CALLS):
                reply = json.loads(await ws.recv())
                if "progress" not in reply:
                    replies[reply["id"]] = reply
            return replies

    return asyncio.run(asyncio.wait_for(scenario(), 20))


def scrape(port: int, token: str | None = None) -> str:
    """:return: the gateway's ``/metrics``."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode("utf-8"))


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    """Pipe ``text`` to ``promtool check metrics``; :return: the finished process."""
    promtool = shutil.which("promtool")
    if promtool is None:
        raise AssertionError(
            "promtool is not installed: this test runs the real one "
            "(apt-get install prometheus; .ci/run installs it)"
        )
    return subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )


def samples(text: str) -> dict[str, float]:
    """The samples of an exposition, by name with labels, e.g. ``'x{a="b"}'``."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, number = line.rsplit(" ", 1)
            found[name] = float(number)
    return found


def status_command(
    *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m taskoffload status ARGV...``; :return: the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "taskoffload", "status", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=env,
    )


class MetricsPromtoolTests(IntegrationTestCase):
    """promtool on a real gateway's /metrics; the status command's token sources."""

    def check_metrics_after_calls(self, port: int, token: str | None = None) -> dict[str, float]:
        """Send the calls, wait until /metrics has counted them and shows the pool
        serving and idle, check it with promtool; :return: its samples."""
        replies = send_calls(port, token)
        assert replies[1]["result"] == {"n": 1}
        assert replies[3]["error"]["code"] == "task_failed"
        assert replies[4]["error"]["code"] == "unknown_function"

        def counted() -> str | None:
            text = scrape(port, token)
            found = samples(text)
            done = found.get('taskoffload_task_seconds_count{function="fail"}') == 1
            # The pool's figures are its latest state: the parent of several
            # gateway processes writes it twice a second.
            idle = found.get("taskoffload_workers_busy") == 0
            return text if done and idle and found["taskoffload_workers_serving"] == 2 else None

        text = wait_for(counted, 20, what="the calls in /metrics, and the pool idle")
        checked = promtool_check(text)
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", ""), text
        return samples(text)

    def assert_the_expected_metrics(self, found: dict[str, float]) -> None:
        assert found['taskoffload_task_seconds_count{function="echo"}'] == 2
        assert found['taskoffload_task_seconds_count{function="(unknown)"}'] == 1
        assert found['taskoffload_requests_total{function="fail",outcome="task_failed"}'] == 1
        assert found["taskoffload_pending"] == 0
        assert found["taskoffload_workers_busy"] == 0
        assert found["taskoffload_worker_restarts_total"] == 0
        assert found["taskoffload_workers_serving"] == 2

    def test_promtool_finds_nothing_wrong_with_metrics(self) -> None:
        """One gateway process: promtool prints nothing and exits 0, and the metrics
        operators expect are there with the values the calls left."""
        _, port, _ = self.role_all(2)
        self.assert_the_expected_metrics(self.check_metrics_after_calls(port))

    def test_promtool_finds_nothing_wrong_with_shared_metrics(self) -> None:
        """Two gateway processes (prometheus_client's multiprocess mode): the same."""
        _, port, _ = self.role_all(2, "--gateway-processes=2")
        self.assert_the_expected_metrics(self.check_metrics_after_calls(port))

    def test_status_command_token_from_file_and_environment(self) -> None:
        """Against a gateway started with --token-file, the status command is let in
        with --token-file (the same file) and with TASKOFFLOAD_TOKEN, and refused
        without a token; /metrics, read with it, passes promtool too."""
        token = "status-token-0123456789"
        path = self.tmp_path / "token"
        path.write_text(token + "\n")
        _, port, _ = self.role_all(2, f"--token-file={path}")
        gateway = f"http://127.0.0.1:{port}"
        plain = {k: v for k, v in os.environ.items() if k != "TASKOFFLOAD_TOKEN"}

        from_file = status_command("--gateway", gateway, "--token-file", str(path), env=plain)
        assert from_file.returncode == 0, from_file.stderr
        assert "serving 2/2" in from_file.stdout
        from_env = status_command("--gateway", gateway, env={**plain, "TASKOFFLOAD_TOKEN": token})
        assert from_env.returncode == 0, from_env.stderr
        assert "serving 2/2" in from_env.stdout
        refused = status_command("--gateway", gateway, env=plain)
        assert refused.returncode == 2
        assert "HTTP 401" in refused.stderr
        self.check_metrics_after_calls(port, token)
