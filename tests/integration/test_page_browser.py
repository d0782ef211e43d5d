"""
The live page at ``/``, driven in a real headless Chromium (Debian's ``chromium``,
installed by ``.ci/run``) through Playwright's Python API, against the real
``twistd -n taskoffload``.

Playwright's own browser download is never used: ``executable_path`` points at the
system Chromium, so the test needs no network. A missing browser fails the test; it is
not skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from playwright.sync_api import BrowserContext, Locator, Page, Route, expect, sync_playwright

from tests.integration.support import IntegrationTestCase, wait_for

CHROMIUM = "/usr/bin/chromium"
#: Flags: no sandbox (CI runs as root), no GPU, and nothing that reaches out
#: to the network or to Google on its own. ``--headless`` is passed by Playwright too;
#: it is repeated here so the command line says what it does.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
#: Milliseconds Playwright waits for anything on the page.
PAGE_TIMEOUT_MS = 20_000


def _live(pids: set[int]) -> list[psutil.Process]:
    """The processes among ``pids`` that still run (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def _tree(pids: set[int]) -> set[int]:
    """``pids`` and all their live descendants."""
    found = set(pids)
    for process in _live(pids):
        try:
            found |= {child.pid for child in process.children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return found


@contextlib.contextmanager
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """
    Headless Debian Chromium with a fresh profile in ``tmp_path``; on teardown the
    browser and Playwright's driver are closed, and none of their processes survive.
    """
    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(
            f"{CHROMIUM} is not installed: the browser test needs Debian's chromium "
            "(apt-get install chromium)"
        )
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    before = {p.pid for p in psutil.Process().children()}
    browser_pids: set[int] = set()
    with sync_playwright() as playwright:
        # Playwright's driver is this process's new child; Chromium runs under it.
        drivers = {p.pid for p in psutil.Process().children()} - before
        assert drivers, "Playwright's driver did not start"
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 700},
            timeout=PAGE_TIMEOUT_MS,
        )
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        with context:
            browser_pids = _tree(drivers)
            assert len(browser_pids) > len(drivers), "no browser process was started"
            yield context
            # Noted while Chromium's processes are still the driver's descendants, so
            # that one reparented to init after the close still counts as a survivor.
            browser_pids |= _tree(drivers)
    wait_for(lambda: not _live(browser_pids), 10.0, what="every browser process to exit")
    chromium = _live({p.pid for p in psutil.Process().children(recursive=True)})
    assert not [p for p in chromium if _named_chromium(p)], chromium


def _named_chromium(process: psutil.Process) -> bool:
    """True if ``process`` is (still) a Chromium process."""
    try:
        return "chrom" in process.name().lower()
    except psutil.NoSuchProcess:
        return False


def _open(
    context: BrowserContext, port: int, errors: list[str] | None = None, path: str = "/"
) -> Page:
    """
    Open the gateway's page (at ``path``) and wait until its WebSocket is connected.

    :param errors: if given, the page's uncaught script errors are appended to it.
    """
    page = context.pages[0] if context.pages else context.new_page()
    if errors is not None:
        page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://127.0.0.1:{port}{path}")
    expect(page.locator("#connection")).to_have_text("connected")
    return page


_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def _get_json(url: str) -> tuple[int, Any]:
    """``GET url``; :return: its status and JSON body."""
    try:
        with _http.open(url, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read() or b"null")


def _described(port: int) -> list[dict[str, Any]]:
    """
    The gateway's ``GET /tasks``, asked before any call: the gateway asks the pool
    for them then, and answers once a worker has described them.
    """
    code, document = _get_json(f"http://127.0.0.1:{port}/tasks")
    assert code == 200, (code, document)
    return list(document["tasks"])


#: What the page's charts show: each SVG chart's samples drawn (``data-points``) and
#: the ``d`` of its lines; the heat map's samples and rows, and how many pixels of
#: its area are not the area's most common colour (where nothing was painted).
_CHARTS_JS = """() => {
  const svg = {};
  for (const chart of document.querySelectorAll("svg.chart")) {
    svg[chart.id] = { points: Number(chart.dataset.points),
                      lines: [...chart.querySelectorAll("path.line")].map((p) => p.getAttribute("d") || "") };
  }
  const canvas = document.querySelector("canvas.chart");
  const heat = { id: canvas && canvas.id, points: canvas ? Number(canvas.dataset.points) : 0,
                 rows: canvas ? Number(canvas.dataset.rows) : 0, painted: 0 };
  if (canvas && canvas.dataset.plot) {
    const ratio = canvas.width / canvas.getBoundingClientRect().width;
    const [l, t, w, h] = canvas.dataset.plot.split(" ").map((v) => Math.round(Number(v) * ratio));
    const data = canvas.getContext("2d").getImageData(l, t, w, h).data;
    const counts = new Map();
    for (let i = 0; i < data.length; i += 4) {
      const key = data[i] << 16 | data[i + 1] << 8 | data[i + 2];
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    heat.painted = data.length / 4 - Math.max(0, ...counts.values());
  }
  return { svg, heat };
}"""

#: A count of 2 or more.
TWO_OR_MORE = re.compile(r"^([2-9]|[1-9][0-9]+)$")

#: The line charts, by id.
LINE_CHARTS = ("chart-rate", "chart-latency", "chart-pending")


def _charts_drawn(charts: dict[str, Any]) -> bool:
    """True once every line chart and the busy heat map have drawn 2 samples or more."""
    lines = [charts["svg"].get(name) for name in LINE_CHARTS]
    return (
        all(c and c["points"] >= 2 and any("L" in d for d in c["lines"]) for c in lines)
        and charts["heat"]["points"] >= 2
        and charts["heat"]["painted"] > 0
    )


def _heights(path: str) -> set[float]:
    """The y coordinates of an SVG path made of ``M x y`` and ``L x y``."""
    numbers = path.replace("M", " ").replace("L", " ").split()
    return {float(y) for y in numbers[1::2]}


def _milliseconds(text: str) -> float:
    """A duration as the page writes it (``203 ms``, ``1.52 s``), in milliseconds."""
    number, _, unit = text.partition(" ")
    assert unit in ("ms", "s"), text
    return float(number) * (1000 if unit == "s" else 1)


TOKEN = "page-token-5c1e-unmistakable"


class PageBrowserTests(IntegrationTestCase):
    """Tests of page browser."""

    def test_page_runs_a_batch_and_shows_progress_and_pool(self):
        """A person picks ``sleep``, gives its seconds in the parameter form, submits 20
        and sees 20/20 done, the results, 4 serving workers and the gateway's figures."""
        _tree, port, _pool_port = self.role_all(4)
        _described(port)
        errors: list[str] = []
        page = _open(self.use(browser(self.tmp_path)), port, errors)

        # The picker, filled from /tasks, starts on sleep; its form rewrites the arguments.
        expect(page.locator("select#function")).to_have_value("sleep")
        page.fill("#param-seconds", "0.2")
        expect(page.locator("#args")).to_have_value('{"seconds":0.2}')
        page.fill("#count", "20")
        page.click("#run")

        task = page.locator("#tasks .task").first
        expect(task.locator("b")).to_have_text(
            "sleep \u00d720"
        )  # the page writes a multiplication sign
        expect(task.locator(".status")).to_have_text("20/20 done")
        bar = task.locator("progress")
        expect(bar).to_have_attribute("max", "20")
        expect(bar).to_have_attribute("value", "20")
        assert bar.evaluate("b => [b.value, b.max]") == [20, 20]

        # The result arrives just after the last progress message: one entry per item.
        output = task.locator("pre")
        expect(output).not_to_be_empty()
        results = json.loads(output.text_content() or "null")
        assert results == [{"result": 0.2}] * 20, results

        # The pool table is refreshed from /status every second.
        rows = page.locator("#workers tr")
        expect(rows).to_have_count(4)
        # Columns: index, lane, pid, state.
        expect(page.locator("#workers td:nth-child(1)")).to_have_text(["0", "1", "2", "3"])
        expect(page.locator("#workers td:nth-child(2)")).to_have_text(["default"] * 4)
        expect(page.locator("#workers td:nth-child(4)")).to_have_text(["serving"] * 4)
        expect(page.locator("#pool-summary")).to_have_text("4/4 serving, 0 restarts")

        # The gateway's figures, refreshed from /status as well, catch up with the batch:
        # labelled numbers, not a JSON dump.
        gateway = page.locator("#gateway")

        def figure(key: str) -> Locator:
            return gateway.locator(f'[data-key="{key}"] .value')

        expect(figure("requests")).to_have_text("20")
        expect(figure("inflight")).to_have_text("0")
        expect(figure("pending")).to_have_text("0")
        expect(gateway.locator('[data-key="requests"] .label')).to_have_text("requests")
        expect(page.locator('#by-function [data-key="sleep"] b')).to_have_text("20")
        expect(page.locator('#by-outcome [data-key="ok"] b')).to_have_text("20")
        # The median of 20 sleeps of 0.2 s, with its unit.
        p50 = figure("p50").text_content() or ""
        assert _milliseconds(p50) >= 200, p50
        assert "{" not in (gateway.text_content() or ""), gateway.text_content()

        screenshot = self.tmp_path / "page.png"
        page.screenshot(path=screenshot, full_page=True)
        assert screenshot.stat().st_size > 0
        print(f"screenshot of the page: {screenshot}")
        assert errors == []

    def test_page_sends_a_thousand_mails_and_draws_its_charts(self):
        """A person picks ``send_mail`` from the tasks ``/tasks`` lists, fills its form,
        sends it 1000 times and sees 1000/1000 done, the outbox count 1000 received,
        and the charts drawn; 4 s after the page opened its DOM holds a chart and the
        outbox."""
        _tree, port, _pool_port = self.role_all(4)
        tasks = _described(port)
        errors: list[str] = []
        page = _open(self.use(browser(self.tmp_path)), port, errors)

        # The picker lists what /tasks describes; send_mail's form has its parameters.
        by_name = {t["name"]: t for t in tasks}
        expect(page.locator("#function option")).to_have_text(sorted(by_name))
        page.select_option("#function", "send_mail")
        expect(page.locator("#function-doc")).to_contain_text(by_name["send_mail"]["doc"])
        parameters = page.locator("#params [data-param]")
        expect(parameters).to_have_count(4)
        named = parameters.evaluate_all("fields => fields.map((f) => f.dataset.param)")
        assert named == [p["name"] for p in by_name["send_mail"]["parameters"]], named
        assert named == ["to", "subject", "body", "sender"], named
        for name in ("to", "subject", "body"):
            expect(page.locator(f'label[for="param-{name}"]')).to_contain_text(f"{name}: str")
        expect(page.locator("#param-sender")).to_have_value("taskoffload@localhost")

        page.fill("#param-to", "reader@example.org")
        page.fill("#param-subject", "Mail from the page")
        page.fill("#param-body", "One of a thousand.")
        assert json.loads(page.input_value("#args")) == {
            "to": "reader@example.org",
            "subject": "Mail from the page",
            "body": "One of a thousand.",
            "sender": "taskoffload@localhost",
        }
        page.fill("#count", "1000")
        page.click("#run")

        task = page.locator("#tasks .task").first
        expect(task.locator("b")).to_have_text("send_mail \u00d71000")
        expect(task.locator(".status")).to_have_text("1000/1000 done", timeout=120_000)
        output = task.locator("pre")
        expect(output).not_to_be_empty()
        sent = {"result": {"sent": True, "to": "reader@example.org"}}
        assert json.loads(output.text_content() or "null") == [sent] * 1000

        expect(page.locator("#outbox")).to_be_visible()
        expect(page.locator("#outbox-summary")).to_have_text("1000 received; the latest 10:")
        mails = page.locator("#outbox-messages tr")
        expect(mails).to_have_count(10)
        expect(mails.locator("td:nth-child(2)")).to_have_text(["reader@example.org"] * 10)
        expect(mails.locator("td:nth-child(3)")).to_have_text(["Mail from the page"] * 10)

        # The charts, sampled from /status each second, show the batch.
        try:
            charts = wait_for(
                lambda: _charts_drawn(found := page.evaluate(_CHARTS_JS)) and found,
                20,
                interval=0.25,
                what="the charts to be drawn",
            )
        except AssertionError as late:
            raise AssertionError(f"{late}: {page.evaluate(_CHARTS_JS)}") from None
        rate = charts["svg"]["chart-rate"]
        assert len(_heights("".join(rate["lines"]))) > 1, rate  # the rate rose and fell
        assert charts["heat"]["id"] == "chart-busy", charts["heat"]
        assert charts["heat"]["rows"] == 4, charts["heat"]  # a row per worker
        for name in LINE_CHARTS:
            expect(page.locator(f"#{name}")).to_have_attribute("data-points", TWO_OR_MORE)

        # 4 s after the page opened, its DOM holds a drawn chart and the outbox.
        page.wait_for_function("() => performance.now() >= 4000")
        held = page.evaluate(
            """() => ({
              chart: document.querySelectorAll('svg.chart path.line[d^="M"]').length > 0
                && document.querySelectorAll('canvas.chart:not([data-points="0"])').length > 0,
              outbox: !document.getElementById("outbox").hidden
                && document.getElementById("outbox-summary").textContent })"""
        )
        assert held == {"chart": True, "outbox": "1000 received; the latest 10:"}, held

        screenshot = self.tmp_path / "page-1000-mails.png"
        page.screenshot(path=screenshot, full_page=True)
        assert screenshot.stat().st_size > 0
        print(f"screenshot of the page: {screenshot}")
        shots = os.environ.get("TASKOFFLOAD_SCREENSHOT_DIR")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            kept = shutil.copy(screenshot, Path(shots) / screenshot.name)
            print(f"screenshot kept: {kept}")
        assert errors == []

    def test_page_picks_a_batch_up_after_a_reload(self):
        """A batch sent from the page is detachable: reloading the page while it runs
        shows it again and it goes on to 30/30 done, with all 30 results, under its
        first id; once done, the tab forgets it."""
        _tree, port, _pool_port = self.role_all(2)
        errors: list[str] = []
        page = _open(self.use(browser(self.tmp_path)), port, errors)
        page.fill("#param-seconds", "0.2")
        page.fill("#count", "30")
        page.click("#run")
        task = page.locator("#tasks .task").first
        expect(task.locator(".status")).to_have_text(re.compile(r"^([1-9]|1[0-9])/30 done$"))
        [(first_id, kept)] = page.evaluate(
            "() => Object.entries(JSON.parse(sessionStorage.getItem('taskoffload.detached')))"
        )
        assert kept["token"] and kept["title"] == "sleep \u00d730", kept

        page.reload()
        expect(page.locator("#connection")).to_have_text("connected")
        task = page.locator("#tasks .task").first
        expect(task.locator("b")).to_have_text("sleep \u00d730")
        expect(task.locator(".status")).to_have_text("30/30 done")
        results = json.loads(task.locator("pre").text_content() or "null")
        assert results == [{"result": 0.2}] * 30, results
        # Every item ran once: the gateway counted 30 final replies, no second batch.
        wait_for(
            lambda: _get_json(f"http://127.0.0.1:{port}/status")[1]["gateway"]["requests"] == 30,
            10,
            what="/status to count the batch's 30 replies",
        )
        assert page.evaluate("() => sessionStorage.getItem('taskoffload.detached')") == "{}"
        assert first_id.startswith("page-"), first_id
        assert errors == []

    def test_page_falls_back_to_free_text_while_tasks_fail(self):
        """While ``/tasks`` fails the function is typed and still runs; once it answers
        (read with the page's token), the page offers the picker, keeping the name."""
        token_file = self.tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        _tree, port, _pool_port = self.role_all(1, "--token-file", str(token_file))
        context = self.use(browser(self.tmp_path))

        def unavailable(route: Route) -> None:
            route.fulfill(status=503, json={"error": "the test says no"})

        context.route("**/tasks?*", unavailable)
        errors: list[str] = []
        page = _open(context, port, errors, f"/?token={TOKEN}")

        expect(page.locator("#function-doc")).to_have_text(
            "GET /tasks: 503 (the test says no): type the task's name."
        )
        expect(page.locator("input#function")).to_be_editable()
        expect(page.locator("#params > *")).to_have_count(0)
        page.fill("#function", "echo")
        page.fill("#args", '{"greeting": "hello"}')
        page.click("#run")
        task = page.locator("#tasks .task").first
        expect(task.locator(".status")).to_have_text("done")
        expect(task.locator("pre")).not_to_be_empty()
        assert json.loads(task.locator("pre").text_content() or "null") == {"greeting": "hello"}
        expect(page.locator("input#function")).to_be_editable()  # /tasks still fails

        context.unroute("**/tasks?*")
        expect(page.locator("select#function")).to_have_value("echo")
        expect(page.locator("#params")).to_contain_text("**kwargs")
        expect(page.locator("#args")).to_have_value('{"greeting": "hello"}')
        assert errors == []

    def test_page_charts_read_the_status_document(self):
        """Given ``/status`` documents whose counters move in known steps, the page shows
        the rate of final replies, the latency percentiles in ms, pending as the calls
        waiting over every lane, and each worker's busy slots in its own heat map row."""
        _tree, port, _pool_port = self.role_all(1)
        context = self.use(browser(self.tmp_path))
        polls: list[int] = []

        def status(route: Route) -> None:
            polls.append(len(polls))
            workers = [
                {"index": i, "pid": 100 + i, "state": state, "uptime": 5.0, "restarts": 0,
                 "recycled": 0, "tasks_done": 0, "rss_mib": 30.0, "busy": busy, "lane": "default"}
                for i, (state, busy) in enumerate(
                    [("serving", 0), ("serving", 1), ("serving", 2), ("down", 0)]
                )
            ]  # fmt: skip
            document = {
                "gateway": {
                    "clients": 1,
                    "inflight": 9,
                    "requests": 50 * len(polls),  # 50 final replies between two polls
                    "by_function": {"noop": 50 * len(polls)},
                    "by_outcome": {"ok": 50 * len(polls)},
                    "latency": {"p50_ms": 12.5, "p90_ms": 40.0, "p99_ms": 80.0, "max_ms": 95.0},
                    "lanes": {
                        "default": {"slots": 3, "waiting": 3, "at_pool": 1},
                        "slow": {"slots": 1, "waiting": 4, "at_pool": 1},
                    },
                },
                "pool": {"count": 4, "alive": 3, "serving": 3, "busy": 3, "restarts": 0,
                         "lanes": {"default": {"count": 4, "serving": 3}}, "workers": workers},
            }  # fmt: skip
            route.fulfill(status=200, json=document)

        context.route("**/status*", status)
        errors: list[str] = []
        page = _open(context, port, errors)
        heat_map = page.locator("#chart-busy")
        expect(heat_map).to_have_attribute("data-points", re.compile(r"^([4-9]|\d{2,})$"))

        rate = page.locator("#now-rate").text_content() or ""
        assert rate.endswith(" /s") and 35 <= float(rate[:-3]) <= 70, rate  # about 50 a second
        expect(page.locator("#now-latency")).to_have_text("p50 12.5 ms \u00b7 p99 80.0 ms")
        expect(page.locator("#now-pending")).to_have_text("7")  # 3 + 4 waiting
        expect(page.locator('#gateway [data-key="pending"] .value')).to_have_text("7")
        expect(page.locator('#gateway [data-key="p99"] .value')).to_have_text("80.0 ms")
        expect(page.locator("#now-busy")).to_have_text("3 slots busy, 4 workers")
        # The y axis: 0, half way and a top at or above the rate, with its unit.
        axis = page.locator("#chart-rate text").all_text_contents()[:3]
        assert axis[0] == "0" and float(axis[2]) >= float(rate[:-3]), axis
        latency_axis = page.locator("#chart-latency text").all_text_contents()[:3]
        assert latency_axis == ["0", "50.0 ms", "100 ms"], latency_axis

        # The heat map's latest column, one pixel per row: idle, 1 slot, 2 slots, down.
        colours = heat_map.evaluate(
            """canvas => {
              const ratio = canvas.width / canvas.getBoundingClientRect().width;
              const [l, t, w] = canvas.dataset.plot.split(" ").map(Number);
              const row = Number(canvas.dataset.rowHeight);
              return [0, 1, 2, 3].map((r) => [...canvas.getContext("2d").getImageData(
                Math.round((l + w - 3) * ratio), Math.round((t + r * row + row / 2) * ratio), 1, 1).data]);
            }"""
        )
        assert heat_map.get_attribute("data-rows") == "4"
        assert len({tuple(c) for c in colours}) == 4, colours  # each row its own colour
        idle, one, two, _down = (sum(c[:3]) for c in colours)
        assert idle < one < two, colours  # busier is brighter
        assert polls, "the page never read /status"
        assert errors == []
