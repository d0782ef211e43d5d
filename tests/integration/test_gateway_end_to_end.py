"""
The gateway end to end: the real ``twistd -n taskoffload`` driven over WebSocket
(the ``websockets`` library, in ``asyncio.run``) and HTTP, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import itertools
import json
import os
import signal
import statistics
import threading
import time
import urllib.request
from collections import defaultdict
from typing import Any

import psutil
import pytest
from aiosmtpd.controller import Controller
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.integration.support import (
    IntegrationTestCase,
    Twistd,
    free_port,
    free_ports,
    wait_for,
)

MIB = 1024 * 1024


# Processes


def start_all(start, count: int = 4, *extra: str) -> tuple[Twistd, int]:
    """Role all (pool + gateway in one twistd); wait until both serve. :return: tree, gateway port."""
    port, pool_port = free_ports(2)
    tree = start(
        f"--count={count}",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        "--pool-listen",
        f"tcp:{pool_port}:interface=127.0.0.1",
        *extra,
    )
    tree.wait_for_log("Gateway listening on")
    tree.wait_for_log(f"All {count} workers serving")
    return tree, port


def start_pool(start, port: int, count: int = 4) -> Twistd:
    """A worker pool alone on ``port``, serving."""
    tree = start("--role=worker", f"--count={count}", "--listen", f"tcp:{port}:interface=127.0.0.1")
    tree.wait_for_log(f"All {count} workers serving")
    return tree


def start_gateway(start, pool_ports: list[int]) -> tuple[Twistd, int]:
    """A gateway alone, to the pools on ``pool_ports``. :return: tree, gateway port."""
    port = free_port()
    pools = [arg for p in pool_ports for arg in ("--pool", f"tcp:127.0.0.1:{p}")]
    tree = start("--role=gateway", "--listen", f"tcp:{port}:interface=127.0.0.1", *pools)
    tree.wait_for_log("Gateway listening on")
    return tree, port


def wait_exited(tree: Twistd, timeout: float) -> int:
    """Wait for the twistd process to exit; :return: its exit code."""
    assert tree.process is not None
    wait_for(lambda: tree.process.poll() is not None, timeout, what="twistd to exit")
    return tree.process.returncode


# HTTP

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def http_get(port: int, path: str) -> tuple[str, bytes]:
    """:return: the content type and body of ``GET path``."""
    with _http.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        return response.headers.get("content-type", ""), response.read()


def status(port: int) -> dict[str, Any]:
    """The gateway's ``/status`` document."""
    return json.loads(http_get(port, "/status")[1])


# WebSocket


async def open_ws(port: int, **options: Any) -> ClientConnection:
    """A raw WebSocket connection to the gateway's ``/ws``."""
    options.setdefault("open_timeout", 30)
    return await connect(
        f"ws://127.0.0.1:{port}/ws", proxy=None, compression=None, max_size=16 * MIB, **options
    )


class Client:
    """A WebSocket client of the gateway: many requests in flight, replies matched by id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.waiting: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        #: Progress values by request id, in arrival order.
        self.progress: dict[Any, list[Any]] = defaultdict(list)
        #: Final replies that answer no request of ours (e.g. ``"id": null`` errors).
        self.unmatched: list[dict[str, Any]] = []
        self._ids = itertools.count()
        self._closing = False
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, port: int, **options: Any) -> Client:
        return cls(await open_ws(port, **options))

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                message = json.loads(text)
                if "progress" in message:
                    self.progress[message["id"]].append(message["progress"])
                    continue
                future = self.waiting.pop(message["id"], None)
                if future is None:
                    self.unmatched.append(message)
                elif not future.done():
                    future.set_result(message)
        except ConnectionClosed:
            pass
        finally:
            for future in self.waiting.values():
                if self._closing:
                    future.cancel()  # we left: nobody waits for these
                elif not future.done():
                    future.set_exception(ConnectionError("the gateway closed the connection"))

    async def send(self, request: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """Send ``request`` (an id is added if it has none); :return: its final reply, to come."""
        request.setdefault("id", next(self._ids))
        future = asyncio.get_running_loop().create_future()
        self.waiting[request["id"]] = future
        await self.ws.send(json.dumps(request))
        return future

    async def request(self, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send ``request`` and wait, at most ``timeout`` s, for its final reply."""
        return await asyncio.wait_for(await self.send(request), timeout)

    async def close(self) -> None:
        self._closing = True
        await self.ws.close()
        await self._reader


async def eventually(predicate, timeout: float, what: str) -> Any:
    """Poll ``predicate`` (without blocking the event loop) until it is true, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def run(scenario, timeout: float) -> Any:
    """Run the coroutine ``scenario`` to its end, failing it after ``timeout`` s."""
    return asyncio.run(asyncio.wait_for(scenario, timeout))


# SMTP


class MailSink:
    """aiosmtpd handler keeping (recipients, subject, body) of every message; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[tuple[tuple[str, ...], str, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content)
        record = (tuple(envelope.rcpt_tos), str(message["Subject"]), message.get_payload())
        with self._lock:
            self._messages.append(record)
        return "250 Message accepted for delivery"

    def messages(self) -> list[tuple[tuple[str, ...], str, str]]:
        with self._lock:
            return list(self._messages)


@contextlib.contextmanager
def smtp_server():
    """An SMTP server on a free loopback port. :return: its port and its :class:`MailSink`."""
    sink = MailSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, sink
    controller.stop()


def mail(c: int, i: int) -> dict[str, str]:
    """The ``send_mail`` arguments of message ``i`` of client ``c``, unique per message."""
    return {
        "to": f"user{c}-{i}@example.org",
        "subject": f"Message {i} of client {c}",
        "body": f"Hello user {c}, this is message {i}.",
    }


def assert_delivered(sink: MailSink, expected: list[dict[str, str]]) -> None:
    """The SMTP server received exactly the ``expected`` messages, each once."""
    received = sink.messages()
    assert len(received) == len(expected)
    assert {(to, subject) for to, subject, _ in received} == {
        ((m["to"],), m["subject"]) for m in expected
    }
    assert {body.strip() for _, _, body in received} == {m["body"] for m in expected}


# 1, 2: the seed scenario


# 4, 5: pools that go away


async def _load_until_error(
    client: Client, stop: asyncio.Event, request: dict[str, Any]
) -> list[dict]:
    """Send ``request`` again and again, one at a time, until an error reply or ``stop``."""
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not stop.is_set() and time.monotonic() < deadline:
        reply = await client.request(dict(request), timeout=10)  # no reply in 10 s: a hang
        replies.append(reply)
        if "error" in reply:
            break
    return replies


# 7: protocol edge cases


def _exchange(
    port: int, frames: list[str | bytes], replies: int, timeout: float = 10
) -> list[dict]:
    """Send ``frames`` on one new connection; :return: the first ``replies`` messages received."""

    async def scenario() -> list[dict[str, Any]]:
        ws = await open_ws(port)
        for frame in frames:
            await ws.send(frame)
        received = [json.loads(await ws.recv()) for _ in range(replies)]
        await ws.close()
        return received

    return run(scenario(), timeout)


class GatewayEndToEndTests(IntegrationTestCase):
    """Tests of gateway end to end."""

    @pytest.mark.timeout(180)
    def test_thousand_mails_from_hundred_clients(self):
        """100 clients x 10 ``send_mail`` in flight at once: 1000 results, 1000 distinct mails sent."""
        smtp_port, sink = self.use(smtp_server())
        _, port = start_all(self.twistd_tree, 100, "--smtp-port", str(smtp_port))

        async def scenario() -> tuple[list[dict[str, Any]], float, float]:
            started = time.monotonic()
            clients = await asyncio.gather(*(Client.open(port) for _ in range(100)))
            sending = time.monotonic()
            replies = [
                [
                    await client.send({"id": i, "function": "send_mail", "args": mail(c, i)})
                    for i in range(10)
                ]
                for c, client in enumerate(clients)
            ]
            answered = await asyncio.gather(*(f for futures in replies for f in futures))
            done = time.monotonic()
            await asyncio.gather(*(client.close() for client in clients))
            assert [c.unmatched for c in clients] == [[]] * 100  # no stray replies
            return answered, sending - started, done - sending

        answered, connecting, elapsed = run(scenario(), 120)
        print(
            f"\n100 connections in {connecting:.3f} s; 1000 send_mail answered in {elapsed:.3f} s "
            f"({1000 / elapsed:.0f}/s)"
        )
        expected = [mail(c, i) for c in range(100) for i in range(10)]
        assert answered == [
            {"id": i, "result": {"sent": True, "to": m["to"]}}
            for m, i in zip(expected, itertools.cycle(range(10)))
        ]
        assert_delivered(sink, expected)

    @pytest.mark.timeout(180)
    def test_thousand_mails_as_one_batch(self):
        """The same 1000 mails as one batch: rising progress, 1000 results in item order, 1000 mails."""
        smtp_port, sink = self.use(smtp_server())
        _, port = start_all(self.twistd_tree, 100, "--smtp-port", str(smtp_port))
        items = [mail(c, i) for c in range(100) for i in range(10)]

        async def scenario() -> tuple[dict[str, Any], list[Any], float]:
            client = await Client.open(port)
            started = time.monotonic()
            reply = await client.request({"id": "b1", "function": "send_mail", "batch": items}, 120)
            elapsed = time.monotonic() - started
            await client.close()
            assert client.unmatched == []
            return reply, client.progress["b1"], elapsed

        reply, progress, elapsed = run(scenario(), 150)
        print(
            f"\nbatch of 1000 send_mail answered in {elapsed:.3f} s ({len(progress)} progress messages)"
        )
        done = [p["done"] for p in progress]
        assert done == sorted(done)
        assert progress[-1] == {"done": 1000, "failed": 0, "total": 1000}
        assert all(p["total"] == 1000 for p in progress)
        assert reply["id"] == "b1"
        assert reply["result"] == [{"result": {"sent": True, "to": m["to"]}} for m in items]
        assert_delivered(sink, items)

    # 3: a client that never reads

    def test_client_that_never_reads_holds_up_neither_memory_nor_others(self):
        """A client sends 200 requests of 0.5 MB and reads nothing: RSS stays bounded, noop < 100 ms."""
        tree, port = start_all(self.twistd_tree, 4)
        gateway = psutil.Process(tree.pid)  # role all: the gateway runs in the supervisor
        pad = "x" * 500_000  # 200 echoed replies: 100 MB the client never reads

        async def scenario() -> tuple[int, int, int, list[float]]:
            other = await Client.open(port)
            for _ in range(20):  # settle the gateway's connections to the pool
                assert (await other.request({"function": "noop"}))["result"] is None
            baseline = gateway.memory_info().rss
            peak = baseline
            slow = await open_ws(port, max_queue=1, ping_interval=None)
            slow.transport.pause_reading()  # read nothing, not even into websockets' queue
            sent = 0

            async def flood() -> None:
                nonlocal sent
                for n in range(200):
                    await slow.send(json.dumps({"id": n, "function": "echo", "args": {"pad": pad}}))
                    sent += 1

            flooding = asyncio.create_task(flood())
            # Wait until the gateway holds the sender back: nothing more sent for 1 s.
            last, still_since = -1, time.monotonic()
            deadline = time.monotonic() + 60
            while time.monotonic() - still_since < 1.0 and not flooding.done():
                assert time.monotonic() < deadline, f"the flood never stalled ({sent} sent)"
                peak = max(peak, gateway.memory_info().rss)
                if sent != last:
                    last, still_since = sent, time.monotonic()
                await asyncio.sleep(0.05)
            latencies = []
            for _ in range(5):
                started = time.monotonic()
                assert (await other.request({"function": "noop"}, 5))["result"] is None
                latencies.append(time.monotonic() - started)
                peak = max(peak, gateway.memory_info().rss)
            flooding.cancel()
            slow.transport.abort()
            await other.close()
            return sent, baseline, peak, latencies

        sent, baseline, peak, latencies = run(scenario(), 90)
        growth = (peak - baseline) / MIB
        print(
            f"\nnon-reading client got {sent}/200 requests through; gateway RSS "
            f"{baseline / MIB:.1f} MB -> peak {peak / MIB:.1f} MB (+{growth:.1f} MB); "
            f"noop latencies {[round(x * 1000, 1) for x in latencies]} ms"
        )
        assert growth < 50
        assert sent < 200, "the gateway read every request although no reply was read"
        assert statistics.median(latencies) < 0.1

    def test_pool_loss_fails_pending_requests_and_gateway_recovers(self):
        """Pool killed under load: every pending request gets ``worker_lost``; a new pool serves again."""
        pool_port = free_port()
        pool_tree = start_pool(self.twistd_tree, pool_port, 4)
        gateway_tree, port = start_gateway(self.twistd_tree, [pool_port])

        async def scenario() -> list[list[dict[str, Any]]]:
            clients = [await Client.open(port) for _ in range(8)]
            stop = asyncio.Event()
            loads = [
                asyncio.create_task(
                    _load_until_error(c, stop, {"function": "sleep", "args": {"seconds": 0.2}})
                )
                for c in clients
            ]
            # 8 requests in flight on 4 workers: 4 running, 4 waiting at the gateway.
            await eventually(
                lambda: (
                    status(port)["gateway"]["requests"] >= 8
                    and status(port)["gateway"]["inflight"] == 8
                ),
                15,
                "load on the pool",
            )
            for pid in pool_tree.worker_pids():
                os.kill(pid, signal.SIGKILL)
            os.killpg(pool_tree.pid, signal.SIGKILL)
            try:
                return await asyncio.gather(*loads)
            finally:
                stop.set()
                for c in clients:
                    await c.close()

        histories = run(scenario(), 60)
        assert wait_exited(pool_tree, 10) == -signal.SIGKILL
        for history in histories:
            assert all(reply["result"] == 0.2 for reply in history[:-1])
            assert history[-1]["error"]["code"] == "worker_lost"
        # The gateway is still up ...
        assert gateway_tree.process.poll() is None
        assert status(port)["gateway"]["inflight"] == 0
        # ... and serves again once a pool listens there again.
        start_pool(self.twistd_tree, pool_port, 4)

        async def recovered() -> tuple[list[dict[str, Any]], float]:
            client = await Client.open(port)
            started = time.monotonic()
            while (await client.request({"function": "noop"})).get("error"):
                assert time.monotonic() - started < 15, (
                    "no noop succeeded within 15 s of the new pool"
                )
                await asyncio.sleep(0.1)
            recovery = time.monotonic() - started
            futures = [
                await client.send({"function": "sleep", "args": {"seconds": 0.2}}) for _ in range(8)
            ]
            replies = await asyncio.gather(*futures)
            await client.close()
            return replies, recovery

        replies, recovery = run(recovered(), 60)
        print(f"\nfirst noop served {recovery:.3f} s after the new pool was up")
        assert [r.get("result") for r in replies] == [0.2] * 8

    def test_graceful_stop_of_one_of_two_pools_loses_nothing(self):
        """Two pools under load, one stopped with SIGTERM mid-run: every request still succeeds."""
        port_a, port_b = free_ports(2)
        pool_a = start_pool(self.twistd_tree, port_a, 4)
        pool_b = start_pool(self.twistd_tree, port_b, 4)
        workers_a, workers_b = pool_a.worker_pids(), pool_b.worker_pids()
        _, port = start_gateway(self.twistd_tree, [port_a, port_b])

        async def scenario() -> tuple[list[dict[str, Any]], int]:
            clients = [await Client.open(port) for _ in range(10)]
            stop = asyncio.Event()
            replies: list[dict[str, Any]] = []

            async def load(client: Client) -> None:
                requests = itertools.cycle(
                    [{"function": "whoami", "args": {"delay": 0.01}}, {"function": "noop"}]
                )
                deadline = time.monotonic() + 60
                while not stop.is_set() and time.monotonic() < deadline:
                    replies.append(await client.request(dict(next(requests)), timeout=10))

            loads = [asyncio.create_task(load(c)) for c in clients]
            await eventually(lambda: len(replies) >= 500, 30, "500 replies before the stop")
            os.killpg(pool_a.pid, signal.SIGTERM)
            await eventually(lambda: pool_a.process.poll() is not None, 30, "pool A to exit")
            stopped_at = len(replies)
            await eventually(
                lambda: len(replies) >= stopped_at + 500, 30, "500 replies after the stop"
            )
            stop.set()
            await asyncio.gather(*loads)
            for c in clients:
                await c.close()
                assert c.unmatched == []
            return replies, stopped_at

        replies, stopped_at = run(scenario(), 90)
        print(f"\n{len(replies)} requests, {stopped_at} of them before pool A had stopped")
        assert [r for r in replies if "error" in r] == []
        assert pool_a.process.returncode == 0

        def pids(replies: list[dict[str, Any]]) -> set[int]:
            return {r["result"]["pid"] for r in replies if r["result"] is not None}

        before = pids(replies[: stopped_at // 2])
        assert before & workers_a, "pool A served nothing before its stop"
        assert before & workers_b, "pool B served nothing before A's stop"
        after = pids(replies[stopped_at + 50 :])  # replies from A may be on their way just then
        assert after and after <= workers_b

    # 6: status, metrics, page

    def test_status_metrics_and_page_reflect_a_run(self):
        """After 100 ``echo`` tasks, /status and /metrics count 100; / serves the HTML page."""
        tree, port = start_all(self.twistd_tree, 4)

        async def scenario() -> list[dict[str, Any]]:
            client = await Client.open(port)
            futures = [
                await client.send({"function": "echo", "args": {"n": n}}) for n in range(100)
            ]
            replies = await asyncio.gather(*futures)
            await client.close()
            return replies

        assert [r["result"] for r in run(scenario(), 60)] == [{"n": n} for n in range(100)]
        document = status(port)
        assert document["gateway"]["by_function"]["echo"] == 100
        assert document["gateway"]["by_outcome"]["ok"] >= 100
        assert document["gateway"]["inflight"] == 0
        assert document["gateway"]["latency"]["p50_ms"] is not None
        assert document["pool"]["count"] == 4
        assert document["pool"]["serving"] == 4
        assert {w["pid"] for w in document["pool"]["workers"]} == tree.worker_pids()
        content_type, metrics = http_get(port, "/metrics")
        assert content_type.startswith("text/plain")
        assert (
            'taskoffload_requests_total{function="echo",outcome="ok"} 100.0'
            in metrics.decode().splitlines()
        )
        content_type, page = http_get(port, "/")
        assert content_type.startswith("text/html")
        assert b"taskoffload" in page

    def test_binary_frame_is_bad_request(self):
        """A binary frame gets ``bad_request``, and the connection still serves."""
        _, port = start_all(self.twistd_tree, 2)
        bad, good = _exchange(
            port, [b'{"id": 1, "function": "noop"}', '{"id": 2, "function": "noop"}'], 2
        )
        assert bad["id"] is None
        assert bad["error"]["code"] == "bad_request"
        assert good == {"id": 2, "result": None}

    def _unreadable_request_is_bad_request(self, frame):
        """A frame that is not a request object gets ``bad_request``, and the connection still serves."""
        _, port = start_all(self.twistd_tree, 2)
        bad, good = _exchange(port, [frame, '{"id": 2, "function": "noop"}'], 2)
        assert bad["error"]["code"] == "bad_request"
        assert bad["error"]["message"]
        assert good == {"id": 2, "result": None}

    def test_unreadable_request_is_bad_request_not_json(self):
        """A frame that is not a request object (not json) gets ``bad_request``; the connection still serves."""
        self._unreadable_request_is_bad_request("this is not json")

    def test_unreadable_request_is_bad_request_array(self):
        """A frame that is not a request object (array) gets ``bad_request``; the connection still serves."""
        self._unreadable_request_is_bad_request("[1, 2]")

    def test_unreadable_request_is_bad_request_no_function(self):
        """A frame that is not a request object (no function) gets ``bad_request``; the connection still serves."""
        self._unreadable_request_is_bad_request('{"id": 3}')

    def test_unreadable_request_is_bad_request_empty(self):
        """A frame that is not a request object (empty) gets ``bad_request``; the connection still serves."""
        self._unreadable_request_is_bad_request("")

    def test_duplicate_inflight_id_is_bad_request(self):
        """A second request with the id of one in flight gets ``bad_request`` under that id."""
        _, port = start_all(self.twistd_tree, 2)
        first = json.dumps({"id": "d", "function": "whoami", "args": {"delay": 0.5}})
        duplicate, original = _exchange(port, [first, first], 2)
        assert duplicate["id"] == "d"
        assert duplicate["error"]["code"] == "bad_request"
        assert "already in flight" in duplicate["error"]["message"]
        assert original["id"] == "d"
        assert "pid" in original["result"]

    def test_cancel_answers_cancelled(self):
        """``{"cancel": id}`` for a running request: its reply is ``cancelled``, long before it would end."""
        _, port = start_all(self.twistd_tree, 2)
        started = time.monotonic()
        (reply,) = _exchange(
            port,
            [
                json.dumps({"id": "c", "function": "whoami", "args": {"delay": 5}}),
                json.dumps({"cancel": "c"}),
            ],
            1,
        )
        assert reply["id"] == "c"
        assert reply["error"]["code"] == "cancelled"
        assert time.monotonic() - started < 4

    def test_oversize_message_is_bad_request_then_closed(self):
        """With ``--max-message 1000`` a 2000-byte frame gets ``bad_request``, then the connection closes."""
        _, port = start_all(self.twistd_tree, 2, "--max-message", "1000")
        frame = json.dumps({"id": 1, "function": "echo", "args": {"pad": "x" * 2000}})

        async def scenario() -> tuple[dict[str, Any], int | None]:
            ws = await open_ws(port)
            await ws.send(frame)
            reply = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            await ws.wait_closed()
            code = ws.close_code
            # Others are still served.
            other = await Client.open(port)
            assert await other.request({"id": 2, "function": "noop"}) == {"id": 2, "result": None}
            await other.close()
            return reply, code

        reply, code = run(scenario(), 20)
        assert reply["error"]["code"] == "bad_request"
        assert "longer than the limit of 1000 bytes" in reply["error"]["message"]
        assert code == 1009

    def test_per_client_inflight_limit_answers_overloaded(self):
        """With ``--max-inflight-per-client 5``, a 6th ``sleep(1)`` in flight gets ``overloaded`` at once."""
        _, port = start_all(self.twistd_tree, 6, "--max-inflight-per-client", "5")

        async def scenario() -> tuple[list[dict[str, Any]], float]:
            client = await Client.open(port)
            started = time.monotonic()
            futures = [
                await client.send({"id": n, "function": "sleep", "args": {"seconds": 1}})
                for n in range(6)
            ]
            sixth = await asyncio.wait_for(futures[5], 10)
            overloaded_after = time.monotonic() - started
            replies = await asyncio.wait_for(asyncio.gather(*futures[:5]), 10)
            await client.close()
            return [*replies, sixth], overloaded_after

        replies, overloaded_after = run(scenario(), 30)
        assert replies[:5] == [{"id": n, "result": 1} for n in range(5)]
        assert replies[5]["id"] == 5
        assert replies[5]["error"]["code"] == "overloaded"
        assert overloaded_after < 0.9  # before any of the five could have finished

    def test_idless_replies_in_request_order(self):
        """Replies to id-less requests come back in request order, however long each one takes."""
        _, port = start_all(self.twistd_tree, 4)
        seconds = [0.6, 0.1, 0.4, 0.0]
        frames = [json.dumps({"function": "sleep", "args": {"seconds": s}}) for s in seconds]
        frames += [json.dumps({"function": "echo", "args": {"n": n}}) for n in range(10)]
        replies = _exchange(port, frames, 14)
        assert replies == [{"id": None, "result": s} for s in seconds] + [
            {"id": None, "result": {"n": n}} for n in range(10)
        ]

    # 8: a client that leaves

    def test_disconnect_cancels_unfinished_requests(self):
        """A client leaving with requests in flight: they are cancelled, and the worker is free at once."""
        _, port = start_all(self.twistd_tree, 1)

        async def scenario() -> tuple[float, float]:
            leaving = await Client.open(port)
            for n in range(3):
                await leaving.send({"id": n, "function": "whoami", "args": {"delay": 5}})
            await eventually(
                lambda: status(port)["gateway"]["inflight"] == 3, 5, "3 requests in flight"
            )
            started = time.monotonic()
            await leaving.close()
            await eventually(
                lambda: status(port)["gateway"]["inflight"] == 0, 2, "inflight back to 0"
            )
            drained = time.monotonic() - started
            # The single worker is free again: the 5 s whoami no longer occupies it.
            other = await Client.open(port)
            started = time.monotonic()
            assert await other.request({"id": "n", "function": "noop"}, 5) == {
                "id": "n",
                "result": None,
            }
            noop = time.monotonic() - started
            await other.close()
            return drained, noop

        drained, noop = run(scenario(), 30)
        print(
            f"\ninflight back to 0 in {drained:.3f} s; noop on the freed worker in {noop * 1000:.1f} ms"
        )
        assert noop < 2
