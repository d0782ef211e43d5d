"""
Integration tests for ``python -m taskoffload status``: the command run in a
subprocess against a real ``twistd -n taskoffload`` (role all) on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator

from websockets.asyncio.client import connect

from taskoffload.__main__ import CLEAR_SCREEN
from tests.integration.support import IntegrationTestCase, free_port


def status_command(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m taskoffload status ARGV...``; :return: the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "taskoffload", "status", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def echo_through_gateway(port: int, count: int) -> list[dict]:
    """Send ``count`` ``echo`` tasks over one WebSocket; :return: the replies."""

    async def scenario() -> list[dict]:
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            for n in range(count):
                await ws.send(json.dumps({"id": n, "function": "echo", "args": {"n": n}}))
            return [json.loads(await ws.recv()) for _ in range(count)]

    return asyncio.run(asyncio.wait_for(scenario(), 20))


@contextlib.contextmanager
def recording_gateway() -> Iterator[tuple[str, list[str | None]]]:
    """A stand-in /status server that records each request's Authorization header."""
    seen: list[str | None] = []
    document = json.dumps({"gateway": {"requests": 7}, "pool": {"addresses": []}}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200 if self.path == "/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: object) -> None:
            pass  # keep the test output quiet

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    server.shutdown()
    server.server_close()


class StatusCommandTests(IntegrationTestCase):
    """Tests of status command."""

    def test_status_shows_every_worker(self):
        """After two ``echo`` calls, ``status`` lists both workers' pids as serving and the calls."""
        tree, gateway_port, _ = self.role_all(2)
        replies = echo_through_gateway(gateway_port, 2)
        assert sorted(r["result"]["n"] for r in replies) == [0, 1]

        done = status_command("--gateway", f"http://127.0.0.1:{gateway_port}")
        print(done.stdout)
        assert done.returncode == 0, done.stderr
        pids = tree.worker_pids()
        assert len(pids) == 2
        rows = {
            int(fields[1]): fields
            for fields in (line.split() for line in done.stdout.splitlines())
            if len(fields) > 2 and fields[0].isdigit() and fields[1].isdigit()
        }
        assert set(rows) == pids
        assert all(fields[2] == "serving" for fields in rows.values())
        assert "serving 2/2" in done.stdout
        assert "requests 2" in done.stdout
        assert any(line.split() == ["echo", "2"] for line in done.stdout.splitlines())

    def test_status_watch_redraws(self):
        """``--watch 0.2 --count 2`` draws the table twice, each after a screen clear, and exits 0."""
        _, gateway_port, _ = self.role_all(2)
        done = status_command(
            "--gateway", f"http://127.0.0.1:{gateway_port}", "--watch", "0.2", "--count", "2"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(CLEAR_SCREEN) == 2
        assert done.stdout.count("serving 2/2") == 2

    def test_status_unreachable_gateway_exits_2(self):
        """With nothing listening at ``--gateway``, the command says so on stderr and exits 2."""
        url = f"http://127.0.0.1:{free_port()}"
        done = status_command("--gateway", url)
        assert done.returncode == 2
        assert done.stdout == ""
        assert f"cannot reach {url}/status" in done.stderr

    def test_status_sends_token(self):
        """``--token`` is sent as a Bearer token, and a trailing slash on the URL is harmless."""
        url, seen = self.use(recording_gateway())
        done = status_command("--gateway", url, "--token", "s3cret")
        assert done.returncode == 0, done.stderr
        assert seen == ["Bearer s3cret"]
        assert "requests 7" in done.stdout
