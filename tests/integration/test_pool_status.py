"""A pool on its own host is observable: ``--role=worker --status-listen`` on the real twistd."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.integration.support import IntegrationTestCase, free_port, wait_for

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def fetch(url: str, token: str | None = None) -> tuple[int, bytes]:
    """GET ``url``; :return: the status code and the body."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _http.open(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class PoolStatusTests(IntegrationTestCase):
    def test_pool_serves_its_status_and_metrics_behind_the_token(self) -> None:
        """A pool with ``--status-listen`` and ``--token-file`` serves /status (its count)
        and /metrics (taskoffload_workers_serving), and refuses a request without the token."""
        token = self.tmp_path / "token"
        token.write_text("pool-token\n")
        status_port, pool_port = free_port(), free_port()
        tree = self.twistd(
            "--role=worker",
            "--count=2",
            "--listen",
            f"tcp:{pool_port}:interface=127.0.0.1",
            "--status-listen",
            f"tcp:{status_port}:interface=127.0.0.1",
            f"--token-file={token}",
        )
        tree.wait_for_log("All 2 workers serving")
        tree.wait_for_log("Pool status on")
        base = f"http://127.0.0.1:{status_port}"
        assert fetch(f"{base}/status")[0] == 401
        assert fetch(f"{base}/metrics")[0] == 401

        def serving() -> bool:
            code, document = fetch(f"{base}/status", "pool-token")
            return code == 200 and json.loads(document)["pool"]["serving"] == 2

        wait_for(serving, 10, what="/status to count 2 workers serving")
        code, document = fetch(f"{base}/status", "pool-token")
        assert json.loads(document)["pool"]["count"] == 2
        code, metrics = fetch(f"{base}/metrics", "pool-token")
        assert code == 200
        assert b"taskoffload_workers_serving 2.0" in metrics
