"""
The embedded outbox end to end: the real ``twistd -n taskoffload`` on role
``all``'s defaults (only ``--listen``, ``--pool-listen`` and ``--token-file``
given), a batch of ``send_mail`` over the WebSocket, each mail sent by a worker
over SMTP to the outbox, and ``/outbox`` read over HTTP; and the page's outbox
panel in headless Chromium (as ``test_page_browser`` drives it).
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from typing import Any

import psutil
import pytest
from playwright.sync_api import expect
from websockets.asyncio.client import connect

from taskoffload.option_values import default_count
from tests.integration.support import IntegrationTestCase, Twistd, free_ports, wait_for
from tests.integration.test_page_browser import browser

TOKEN = "outbox-token-7f3a-unmistakable"

_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def get_json(url: str, token: str | None = TOKEN) -> tuple[int, Any]:
    """``GET url`` (with the token, if given); :return: its status and JSON body (or None)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with _http.open(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, None


def mail(i: int) -> dict[str, str]:
    """The ``send_mail`` arguments of message ``i``."""
    return {"to": f"user{i}@example.org", "subject": f"Outbox message {i}", "body": f"Hello {i}."}


async def batch(port: int, items: list[dict[str, str]], timeout: float) -> dict[str, Any]:
    """Run ``send_mail`` on ``items`` as one batch over the WebSocket, with the token;
    :return: its final reply (progress messages are skipped)."""
    async with connect(
        f"ws://127.0.0.1:{port}/ws",
        proxy=None,
        open_timeout=10,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
    ) as ws:
        await ws.send(json.dumps({"id": "mails", "function": "send_mail", "batch": items}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            if "progress" not in message:
                return message


class OutboxEndToEndTests(IntegrationTestCase):
    """Tests of the embedded outbox end to end."""

    def start(self, *extra: str, count: str | None = None) -> tuple[Twistd, int]:
        """Role all with the token in a file; wait until it serves. :return: tree, port."""
        token_file = self.tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        port, pool_port = free_ports(2)
        tree = self.twistd_tree(
            *([f"--count={count}"] if count else []),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--pool-listen",
            f"tcp:{pool_port}:interface=127.0.0.1",
            "--token-file",
            str(token_file),
            *extra,
        )
        tree.wait_for_log("Gateway listening on")
        tree.wait_for_log(f"All {count or default_count()} workers serving", timeout=60)
        return tree, port

    @pytest.mark.timeout(120)
    def test_hundred_mails_reach_the_outbox(self) -> None:
        """100 ``send_mail`` in one batch all succeed on role all's defaults, and
        ``/outbox`` then counts 100, with every recipient; the start log says where
        mail goes; ``/tasks`` lists ``send_mail`` with its parameters."""
        tree, port = self.start()
        said = re.search(
            r"Mail from send_mail goes to the embedded outbox on 127\.0\.0\.1:(\d+) "
            r"\(see /outbox\); give --smtp-host to deliver it for real",
            tree.log(),
        )
        assert said is not None, tree.log()
        smtp_port = int(said.group(1))
        # The supervisor itself listens there, on loopback.
        listening = {
            (c.laddr.ip, c.laddr.port)
            for c in psutil.Process(tree.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        }
        assert ("127.0.0.1", smtp_port) in listening

        items = [mail(i) for i in range(100)]
        reply = asyncio.run(asyncio.wait_for(batch(port, items, 60), 90))
        assert reply == {
            "id": "mails",
            "result": [{"result": {"sent": True, "to": m["to"]}} for m in items],
        }

        outbox = f"http://127.0.0.1:{port}/outbox"
        assert get_json(outbox, token=None)[0] == 401
        document = wait_for(
            lambda: (d := get_json(outbox)[1]) and d["count"] == 100 and d,
            10,
            what="/outbox to count 100",
        )
        assert len(document["messages"]) == 100
        assert {tuple(m["to"]) for m in document["messages"]} == {(m["to"],) for m in items}
        assert {m["subject"] for m in document["messages"]} == {m["subject"] for m in items}
        assert all(m["from"] == "taskoffload@localhost" for m in document["messages"])

        # /tasks, behind the same token, describes send_mail as its workers loaded it.
        tasks = f"http://127.0.0.1:{port}/tasks"
        assert get_json(tasks, token=None)[0] == 401
        code, described = get_json(tasks)
        assert code == 200, described
        by_name = {t["name"]: t for t in described["tasks"]}
        assert [p["name"] for p in by_name["send_mail"]["parameters"]] == [
            "to",
            "subject",
            "body",
            "sender",
        ]
        assert by_name["send_mail"]["lane"] == "default"

    @pytest.mark.timeout(120)
    def test_the_page_shows_the_outbox(self) -> None:
        """The page's outbox panel (read with the page's token) shows the count and
        the latest mails, latest first; with an SMTP server named, it stays hidden."""
        _tree, port = self.start(count="2")
        _other, no_outbox = self.start("--smtp-port=2525", count="1")
        reply = asyncio.run(asyncio.wait_for(batch(port, [mail(i) for i in range(12)], 30), 60))
        assert all("result" in item for item in reply["result"]), reply
        context = self.use(browser(self.tmp_path))
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(f"http://127.0.0.1:{port}/?token={TOKEN}")
        expect(page.locator("#outbox")).to_be_visible()
        expect(page.locator("#outbox-summary")).to_have_text("12 received; the latest 10:")
        rows = page.locator("#outbox-messages tr")
        expect(rows).to_have_count(10)
        # The batch's items run in parallel: which came last is not known, only
        # that the ten shown are ten of them, each row its own mail.
        shown = {
            (row.locator("td").nth(1).inner_text(), row.locator("td").nth(2).inner_text())
            for row in rows.all()
        }
        assert len(shown) == 10
        received = rows.locator("td:first-child").all_inner_texts()
        assert received == sorted(received, reverse=True)  # ISO 8601 times: latest first
        assert shown <= {(m["to"], m["subject"]) for m in map(mail, range(12))}

        page.goto(f"http://127.0.0.1:{no_outbox}/?token={TOKEN}")
        expect(page.locator("#pool-summary")).to_have_text("1/1 serving, 0 restarts")
        expect(page.locator("#outbox")).to_be_hidden()
        expect(page.locator("#outbox-summary")).to_have_text("…")
