"""The worker port's shared secret, on the real pool."""

from __future__ import annotations

import hashlib
import hmac
import json

from taskoffload.client import TaskClient, TaskError
from tests.integration.support import IntegrationTestCase, LineClient, free_port, wait_for


def _secret_pool(twistd, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("correct horse battery staple\n")
    port = free_port()
    tree = twistd(
        "--role=worker",
        "--count=2",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--secret-file",
        str(secret_file),
    )
    tree.wait_for_log("All 2 workers serving")
    return tree, port, b"correct horse battery staple"


class WorkerSecretTests(IntegrationTestCase):
    """Tests of worker secret."""

    def test_raw_client_must_answer_the_challenge(self):
        """With --secret-file, a connection is challenged; the right HMAC unlocks it, a
        wrong one gets ``unauthorized`` and a close."""
        _, port, secret = _secret_pool(self.twistd, self.tmp_path)
        good = LineClient(port)
        nonce = good.reply()["challenge"]
        digest = hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()
        good.send(json.dumps({"auth": digest}).encode() + b"\n")
        good.send(b'{"id": 1, "function": "echo", "args": {"ok": 1}}\n')
        assert good.reply() == {"id": 1, "result": {"ok": 1}}
        bad = LineClient(port)
        bad.reply()  # the challenge
        bad.send(b'{"auth": "00"}\n{"id": 2, "function": "echo"}\n')
        assert bad.reply()["error"]["code"] == "unauthorized"
        assert wait_for(bad.closed, 5, what="the worker to close")

    def test_each_connection_gets_its_own_nonce_and_a_replay_is_refused(self):
        """Two connections get different challenge nonces, and the answer recorded on
        the first, replayed on the second, gets ``unauthorized`` and a close."""
        _, port, secret = _secret_pool(self.twistd, self.tmp_path)
        first, second = LineClient(port), LineClient(port)
        self.addCleanup(first.close)
        self.addCleanup(second.close)
        nonces = [first.reply()["challenge"], second.reply()["challenge"]]
        assert nonces[0] != nonces[1], nonces
        recorded = hmac.new(secret, nonces[0].encode(), hashlib.sha256).hexdigest()
        first.send(json.dumps({"auth": recorded}).encode() + b"\n")
        first.send(b'{"id": 1, "function": "noop"}\n')
        assert first.reply() == {"id": 1, "result": None}
        second.send(json.dumps({"auth": recorded}).encode() + b"\n")
        second.send(b'{"id": 2, "function": "noop"}\n')
        refused = second.reply()
        assert refused["error"]["code"] == "unauthorized", refused
        assert wait_for(second.closed, 5, what="the worker to close the replaying connection")

    async def test_task_client_with_and_without_the_secret(self):
        """TaskClient given the secret is served; one without it fails naming the secret."""
        from twisted.internet import reactor

        _, port, secret = _secret_pool(self.twistd, self.tmp_path)
        with_secret = TaskClient(reactor, [f"tcp:127.0.0.1:{port}"], secret=secret)
        without = TaskClient(reactor, [f"tcp:127.0.0.1:{port}"])
        try:
            assert await with_secret.call("echo", a=1) == {"a": 1}
            try:
                await without.call("echo", a=1)
            except TaskError as e:
                assert e.code == "worker_lost"
                assert "shared secret" in e.message
            else:
                raise AssertionError("a client without the secret was served")
        finally:
            await with_secret.close()
            await without.close()

    def test_non_loopback_listen_refused_without_secret(self):
        """Listening beyond loopback without --secret-file or --insecure is refused."""
        tree = self.twistd("--role=worker", "--count=1", "--listen", f"tcp:{free_port()}")
        assert tree.process.wait(timeout=20) != 0
        assert "--secret-file" in tree.log() and "--insecure" in tree.log()
