"""
Single flight (``"key"``) and detach and resume end to end: the real
``twistd -n taskoffload`` (role all) driven over its WebSocket with the
``websockets`` library, in ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from tests.integration.support import IntegrationTestCase, wait_for

TASKS = '''
import os

from taskoffload import task


async def _pause(seconds):
    from twisted.internet import reactor, task as twisted_task

    await twisted_task.deferLater(reactor, seconds, lambda: None)


def _note(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")


@task
async def steps(progress, count=10, delay=0.2):
    """Reports count progress steps, a pause between them."""
    for n in range(count):
        progress({"step": n})
        await _pause(delay)
    return {"steps": count}


@task
async def counted(path, seconds=1.0):
    """Notes each run in path, waits, returns how many runs it has seen."""
    _note(path, "run")
    await _pause(seconds)
    with open(path) as f:
        return {"runs": len(f.read().split())}


@task
async def held(path, seconds=60.0):
    """Notes its start, waits, and notes when it is cancelled."""
    from twisted.internet.defer import CancelledError

    _note(path, "started")
    try:
        await _pause(seconds)
    except CancelledError:
        _note(path, "cancelled")
        raise
    return "finished"
'''

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(port: int, path: str) -> bytes:
    with _http.open(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read()


def detached_status(port: int) -> dict[str, int]:
    status: dict[str, int] = json.loads(http_get(port, "/status"))["gateway"]["detached"]
    return status


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def open_ws(port: int) -> ClientConnection:
    return await connect(f"ws://127.0.0.1:{port}/ws", proxy=None, compression=None, open_timeout=30)


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def receive(ws: ClientConnection, timeout: float = 20.0) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return message


async def final(ws: ClientConnection, timeout: float = 20.0) -> tuple[list[Any], dict[str, Any]]:
    """Read up to a final reply; :return: the progress messages before it, and it."""
    before = []
    while True:
        message = await receive(ws, timeout)
        if "result" in message or "error" in message:
            return before, message
        before.append(message)


def run(scenario: Any, timeout: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(scenario, timeout))


class SingleFlightTests(IntegrationTestCase):
    """Calls of one function with one key share one run."""

    def setUp(self) -> None:
        super().setUp()
        self.tasks_module("flight_tasks", TASKS)
        self.tree, self.port, _ = self.role_all(2, "--tasks", "flight_tasks")

    def test_five_concurrent_calls_with_one_key_run_once(self) -> None:
        """Five connections call one function with one key at once: it runs
        once, and all five get its result, each under its own id."""
        notes = self.tmp_path / "runs"

        async def scenario() -> list[dict[str, Any]]:
            sockets = [await open_ws(self.port) for _ in range(5)]
            for n, ws in enumerate(sockets):
                request = {"path": str(notes), "seconds": 1.0}
                await send(ws, {"id": n, "function": "counted", "args": request, "key": "k"})
            replies = [(await final(ws))[1] for ws in sockets]
            for ws in sockets:
                await ws.close()
            return replies

        replies = run(scenario())
        self.assertEqual(replies, [{"id": n, "result": {"runs": 1}} for n in range(5)])
        self.assertEqual(lines(notes), ["run"])

    def test_cancel_detaches_one_caller_and_the_last_cancels_the_run(self) -> None:
        """One caller's cancel answers it cancelled and leaves the run, whose
        result the other gets; when every caller of a run has cancelled, the run
        is cancelled at the worker."""
        notes = self.tmp_path / "held"

        async def callers(seconds: float) -> tuple[ClientConnection, ClientConnection]:
            a, b = await open_ws(self.port), await open_ws(self.port)
            call = {"function": "held", "args": {"path": str(notes), "seconds": seconds}}
            await send(a, {"id": "a", "key": str(seconds), **call})
            await send(b, {"id": "b", "key": str(seconds), **call})
            return a, b

        async def one_leaves() -> tuple[dict[str, Any], dict[str, Any]]:
            a, b = await callers(2.0)
            await send(b, {"cancel": "b"})
            b_reply = (await final(b))[1]
            a_reply = (await final(a))[1]
            await a.close()
            await b.close()
            return a_reply, b_reply

        a_reply, b_reply = run(one_leaves())
        self.assertEqual(b_reply["error"]["code"], "cancelled")
        self.assertEqual(a_reply, {"id": "a", "result": "finished"})
        self.assertEqual(lines(notes), ["started"])

        async def both_leave() -> list[dict[str, Any]]:
            a, b = await callers(60.0)
            while lines(notes) != ["started", "started"]:
                await asyncio.sleep(0.02)
            await send(a, {"cancel": "a"})
            await send(b, {"cancel": "b"})
            replies = [(await final(ws))[1] for ws in (a, b)]
            await a.close()
            await b.close()
            return replies

        replies = run(both_leave())
        self.assertEqual([r["error"]["code"] for r in replies], ["cancelled", "cancelled"])
        wait_for(
            lambda: lines(notes) == ["started", "started", "cancelled"],
            10,
            what="the run cancelled",
        )


class DetachTests(IntegrationTestCase):
    """Detachable calls outlive their WebSocket and are resumed on another."""

    def setUp(self) -> None:
        super().setUp()
        self.tasks_module("detach_tasks", TASKS)
        self.tree, self.port, _ = self.role_all(2, "--tasks", "detach_tasks")

    def test_read_two_close_resume_elsewhere_sees_every_step(self) -> None:
        """Read two progress steps, close, resume on a new connection with the
        token: every step 0-9 is seen across the two, then the result under the
        original id; a wrong token gets unknown_resume."""

        async def first_connection() -> tuple[str, list[dict[str, Any]]]:
            ws = await open_ws(self.port)
            await send(ws, {"id": "job", "function": "steps", "detach": 60})
            answer = await receive(ws)
            self.assertEqual(set(answer), {"id", "resume"})
            seen = [await receive(ws), await receive(ws)]
            await ws.close()
            return answer["resume"], seen

        token, seen = run(first_connection())
        self.assertEqual([m["seq"] for m in seen], [0, 1])
        wait_for(lambda: detached_status(self.port)["held"] == 1, 10, what="a held call")

        async def second_connection() -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
            ws = await open_ws(self.port)
            await send(ws, {"resume": "no-such-token"})
            wrong = await receive(ws)
            await send(ws, {"resume": token})
            progress, result = await final(ws)
            await ws.close()
            return progress, result, wrong

        progress, result, wrong = run(second_connection())
        self.assertEqual(wrong["id"], None)
        self.assertEqual(wrong["error"]["code"], "unknown_resume")
        self.assertEqual(progress[0], {"id": "job", "resumed": token, "dropped": 0})
        steps = {m["progress"]["step"] for m in [*seen, *progress[1:]]}
        self.assertEqual(steps, set(range(10)))
        self.assertTrue(all(m["id"] == "job" for m in progress))
        self.assertEqual(result, {"id": "job", "result": {"steps": 10}})
        self.assertEqual(detached_status(self.port), {"held": 0, "resumed": 1, "expired": 0})
        metrics = http_get(self.port, "/metrics").decode().splitlines()
        self.assertIn("taskoffload_resumed_total 1.0", metrics)
        self.assertIn("taskoffload_detached 0.0", metrics)

    def test_an_expired_call_is_cancelled_and_its_token_refused(self) -> None:
        """A short detach, the connection closed: past its seconds the call is
        cancelled at the worker, and a resume gets unknown_resume."""
        notes = self.tmp_path / "held"

        async def start() -> str:
            ws = await open_ws(self.port)
            request = {"path": str(notes)}
            await send(ws, {"id": 1, "function": "held", "args": request, "detach": 1})
            token: str = (await receive(ws))["resume"]
            while lines(notes) != ["started"]:
                await asyncio.sleep(0.02)
            await ws.close()
            return token

        token = run(start())
        closed = time.monotonic()
        wait_for(lambda: lines(notes) == ["started", "cancelled"], 15, what="the expired call")
        self.assertGreaterEqual(time.monotonic() - closed, 0.5)

        async def resume() -> dict[str, Any]:
            ws = await open_ws(self.port)
            await send(ws, {"resume": token})
            reply = await receive(ws)
            await ws.close()
            return reply

        reply = run(resume())
        self.assertEqual(reply["error"]["code"], "unknown_resume")
        self.assertEqual(detached_status(self.port)["expired"], 1)


class SeveralProcessesTests(IntegrationTestCase):
    """With --gateway-processes, a resume finds its call by connecting again."""

    def test_a_resume_reconnects_until_it_reaches_the_process_holding_the_call(self) -> None:
        """The token names its process; a resume landing in another one is told
        so, and a later connection reaches the call and gets its result."""
        self.tasks_module("processes_tasks", TASKS)
        tree, port, _ = self.role_all(2, "--tasks", "processes_tasks", "--gateway-processes", "2")
        tree.wait_for_log("Gateway process 1 (pid")

        async def scenario() -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
            ws = await open_ws(port)
            request = {"id": "p", "function": "steps", "args": {"count": 3}, "detach": 60}
            await send(ws, request)
            token: str = (await receive(ws))["resume"]
            await ws.close()
            elsewhere: list[dict[str, Any]] = []
            for _ in range(50):
                ws = await open_ws(port)
                await send(ws, {"resume": token})
                first = await receive(ws)
                if "error" not in first:
                    result = (await final(ws))[1]
                    await ws.close()
                    return token, elsewhere, result
                elsewhere.append(first)
                await ws.close()
            raise AssertionError("no connection reached the process holding the call")

        token, elsewhere, result = run(scenario())
        process = token.partition(".")[0]
        self.assertTrue(process.isdigit())
        for refusal in elsewhere:
            self.assertEqual(refusal["error"]["code"], "unknown_resume")
            self.assertIn(f"gateway process {process}", refusal["error"]["message"])
        self.assertEqual(result, {"id": "p", "result": {"steps": 3}})
        wait_for(lambda: detached_status(port)["resumed"] == 1, 10, what="the resume counted")
