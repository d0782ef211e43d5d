"""The worker role end to end: the real ``twistd -n taskoffload --role=worker``."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import psutil

from tests.integration.support import (
    IntegrationTestCase,
    LineClient,
    wait_for,
)

BAD_INPUTS = {
    "not_json": (b"this is not json\n", "bad_request"),
    "array": (b"[1, 2, 3]\n", "bad_request"),
    "missing_function": (b'{"id": 3, "args": {}}\n', "bad_request"),
    "unknown": (b'{"id": 4, "function": "no_such_task"}\n', "unknown_function"),
    "wrong_argument_names": (
        b'{"id": 5, "function": "sleep", "args": {"secs": 1}}\n',
        "bad_arguments",
    ),
    "invalid_utf8": (b'{"function": "echo", "args": {"a": "\xff\xfe"}}\n', "bad_request"),
    "empty_line": (b"\n", "bad_request"),
}


class WorkerPoolTests(IntegrationTestCase):
    """Tests of worker pool."""

    def test_raw_echo_line_gets_result(self):
        """The raw line from the FAQ, with no id, gets ``{"id": null, "result": {"a": 1}}``."""
        _, port = self.pool(8)
        client = LineClient(port)
        client.send(b'{"function":"echo","args":{"a":1}}\n')
        assert client.reply() == {"id": None, "result": {"a": 1}}
        client.close()

    def test_idless_replies_in_request_order(self):
        """Replies to id-less requests on one connection come back in request order."""
        _, port = self.pool(2)
        client = LineClient(port)
        lines = b"".join(
            json.dumps({"function": "echo", "args": {"n": n}}).encode() + b"\n" for n in range(20)
        )
        client.send(lines)
        assert [client.reply()["result"]["n"] for _ in range(20)] == list(range(20))
        client.close()

    def _bad_input_gets_documented_error_and_pool_keeps_serving(self, line, code):
        """Each kind of bad input gets its error code, and the worker still serves others."""
        _, port = self.pool(2)
        bad = LineClient(port)
        bad.send(line)
        reply = bad.reply()
        assert reply["error"]["code"] == code
        assert reply["error"]["message"]
        # The same connection still works ...
        bad.send(b'{"id": "after", "function": "noop"}\n')
        assert bad.reply() == {"id": "after", "result": None}
        # ... and so does another one.
        other = LineClient(port)
        other.send(b'{"id": 1, "function": "echo", "args": {"ok": true}}\n')
        assert other.reply() == {"id": 1, "result": {"ok": True}}
        bad.close()
        other.close()

    def test_bad_input_gets_documented_error_and_pool_keeps_serving_not_json(self):
        """Bad input (not json) gets its error code, and the worker still serves others."""
        self._bad_input_gets_documented_error_and_pool_keeps_serving(*BAD_INPUTS["not_json"])

    def test_bad_input_gets_documented_error_and_pool_keeps_serving_array(self):
        """Bad input (array) gets its error code, and the worker still serves others."""
        self._bad_input_gets_documented_error_and_pool_keeps_serving(*BAD_INPUTS["array"])

    def test_bad_input_gets_documented_error_and_pool_keeps_serving_missing_function(self):
        """Bad input (missing function) gets its error code, and the worker still serves others."""
        self._bad_input_gets_documented_error_and_pool_keeps_serving(
            *BAD_INPUTS["missing_function"]
        )

    def test_bad_input_gets_documented_error_and_pool_keeps_serving_unknown(self):
        """Bad input (unknown) gets its error code, and the worker still serves others."""
        self._bad_input_gets_documented_error_and_pool_keeps_serving(*BAD_INPUTS["unknown"])

    def test_bad_input_gets_documented_error_and_pool_keeps_serving_wrong_argument_names(self):
        """Bad input (wrong argument names) gets its error code, and the worker still serves others."""
        self._bad_input_gets_documented_error_and_pool_keeps_serving(
            *BAD_INPUTS["wrong_argument_names"]
        )

    def test_bad_input_gets_documented_error_and_pool_keeps_serving_invalid_utf8(self):
        """Bad input (invalid utf8) gets its error code, and the worker still serves others."""
        self._bad_input_gets_documented_error_and_pool_keeps_serving(*BAD_INPUTS["invalid_utf8"])

    def test_bad_input_gets_documented_error_and_pool_keeps_serving_empty_line(self):
        """Bad input (empty line) gets its error code, and the worker still serves others."""
        self._bad_input_gets_documented_error_and_pool_keeps_serving(*BAD_INPUTS["empty_line"])

    def test_only_registered_tasks_run(self):
        """Builtins, attribute paths and module globals are ``unknown_function``: only
        registered task names run, nothing is looked up from the wire."""
        _, port = self.pool(1)
        client = LineClient(port)
        self.addCleanup(client.close)
        names = [
            "eval",
            "exec",
            "open",
            "print",
            "getattr",
            "__import__",
            "noop.__globals__",
            "echo.__code__",
            "os.system",
            "taskoffload.examples.noop",
            "task",
        ]
        for n, name in enumerate(names):
            request = {"id": n, "function": name, "args": ["1"]}
            client.send(json.dumps(request).encode() + b"\n")
        replies = {}
        for _ in names:
            reply = client.reply()
            replies[names[reply["id"]]] = reply["error"]["code"]
        assert replies == dict.fromkeys(names, "unknown_function")
        client.send(b'{"id": "after", "function": "noop"}\n')
        assert client.reply() == {"id": "after", "result": None}

    def test_ids_of_bad_requests_are_echoed(self):
        """A bad request whose id could be read gets its error under that id."""
        _, port = self.pool(1)
        client = LineClient(port)
        client.send(b'{"id": "x1", "function": "no_such_task"}\n')
        assert client.reply()["id"] == "x1"
        client.close()

    def test_oversize_line_gets_error_then_close(self):
        """A 2 MiB line gets ``bad_request``, then the connection closes; others are served."""
        _, port = self.pool(2)
        big = LineClient(port, timeout=10)
        payload = b'{"function": "echo", "args": {"a": "' + b"x" * (2 * 1024 * 1024) + b'"}}\n'
        try:
            big.send(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before it has read it all
        reply = big.reply()
        assert reply["error"]["code"] == "bad_request"
        assert "longer than" in reply["error"]["message"]
        assert wait_for(big.closed, 5, what="the connection to close")
        other = LineClient(port)
        other.send(b'{"id": 2, "function": "noop"}\n')
        assert other.reply() == {"id": 2, "result": None}

    def test_worker_logs_reach_supervisor_tagged(self):
        """A worker's log line appears in the supervisor's log with its index and pid."""
        tree, port = self.pool(1)
        client = LineClient(port)
        client.send(b'{"id": 1, "function": "fail", "args": {"message": "boom-for-the-log"}}\n')
        reply = client.reply()
        assert reply["error"] == {
            "code": "task_failed",
            "message": "boom-for-the-log",
            "type": "TaskRaised",
        }
        (pid,) = tree.worker_pids()
        tree.wait_for_log(f"[worker 0 pid {pid}] Task fail (request 1) failed", timeout=5)
        assert "boom-for-the-log" in tree.log()

    def test_supervisor_sigkill_leaves_no_child(self):
        """After SIGKILL of the supervisor, every worker and the fork server exit within 5 s."""
        tree, _ = self.pool(8)
        assert len(tree.worker_pids()) == 8
        os.kill(tree.pid, signal.SIGKILL)
        tree.process.wait(timeout=5)
        start = time.monotonic()
        wait_for(lambda: not tree.group_processes(), 5.0, what="all children to exit")
        assert time.monotonic() - start < 5.0

    def test_sigterm_finishes_running_tasks_then_exits_zero(self):
        """SIGTERM while 8 ``sleep(1)`` run: all 8 results arrive, then twistd exits 0."""
        tree, port = self.pool(8)
        clients = [LineClient(port) for _ in range(8)]
        for n, client in enumerate(clients):
            client.send(
                json.dumps({"id": n, "function": "sleep", "args": {"seconds": 1}}).encode() + b"\n"
            )
        ours = {c.socket.getsockname()[1] for c in clients}

        def all_accepted() -> bool:
            taken = set()
            for pid in tree.worker_pids():
                for conn in psutil.Process(pid).net_connections("tcp"):
                    if conn.raddr and conn.raddr.port in ours:
                        taken.add(conn.raddr.port)
            return taken == ours

        wait_for(all_accepted, 5.0, what="every connection to be accepted by a worker")
        os.kill(tree.pid, signal.SIGTERM)
        replies = [client.reply() for client in clients]
        assert replies == [{"id": n, "result": 1} for n in range(8)]
        assert tree.process.wait(timeout=15) == 0

    def test_unix_socket_listen(self):
        """The pool also serves a UNIX socket given as an endpoint string."""
        path = self.tmp_path / "pool.sock"
        tree = self.twistd("--role=worker", "--count=2", "--listen", f"unix:{path}")
        tree.wait_for_log("All 2 workers serving")
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b'{"id": 1, "function": "echo", "args": {"u": 1}}\n')
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(4096)
        assert json.loads(data) == {"id": 1, "result": {"u": 1}}
        s.close()

    def test_bad_option_is_a_usage_error(self):
        """A role that does not exist is refused with a message naming the valid ones."""
        tree = self.twistd("--role=bogus")
        assert tree.process.wait(timeout=20) != 0
        assert "--role must be one of" in tree.log()

    def test_half_closed_connection_gets_its_replies(self):
        """A client that sends and then shuts down its writing side still gets its replies."""
        _, port = self.pool(1)
        client = LineClient(port)
        client.send(
            b'{"id": 1, "function": "echo", "args": {"x": 1}}\n{"id": 2, "function": "noop"}\n'
        )
        client.socket.shutdown(socket.SHUT_WR)
        assert client.reply() == {"id": 1, "result": {"x": 1}}
        assert client.reply() == {"id": 2, "result": None}
        assert wait_for(client.closed, 5, what="the worker to close")

    def test_tasks_module_that_fails_to_import_stops_the_service(self):
        """A --tasks module that raises on import stops twistd with the error in its log,
        instead of holding the port open with no worker to accept."""
        log = self.refused_start("broken_tasks", "raise RuntimeError('broken on purpose')\n")
        assert "The worker pool cannot start" in log
        assert "broken on purpose" in log
