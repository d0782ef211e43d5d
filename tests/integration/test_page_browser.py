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
from collections.abc import Iterator
from pathlib import Path

import psutil
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

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


def _open(context: BrowserContext, port: int) -> Page:
    """Open the gateway's page and wait until its WebSocket is connected."""
    page = context.pages[0] if context.pages else context.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    expect(page.locator("#connection")).to_have_text("connected")
    return page


class PageBrowserTests(IntegrationTestCase):
    """Tests of page browser."""

    def test_page_runs_a_batch_and_shows_progress_and_pool(self):
        """A person submits 20 ``sleep`` tasks on the page and sees 20/20 done, the results and 4 serving workers."""
        _tree, port, _pool_port = self.role_all(4)
        page = _open(self.use(browser(self.tmp_path)), port)

        page.fill("#function", "sleep")
        page.fill("#args", '{"seconds": 0.2}')
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
        assert isinstance(results, list) and len(results) == 20, results
        assert all("result" in item for item in results), results

        # The pool table is refreshed from /status every second.
        rows = page.locator("#workers tr")
        expect(rows).to_have_count(4)
        # Columns: index, lane, pid, state.
        expect(page.locator("#workers td:nth-child(2)")).to_have_text(["default"] * 4)
        expect(page.locator("#workers td:nth-child(4)")).to_have_text(["serving"] * 4)
        expect(page.locator("#pool-summary")).to_have_text("4/4 serving, 0 restarts")

        # The gateway's counters, refreshed from /status as well, catch up with the batch.
        gateway = page.locator("#gateway")
        expect(gateway).to_contain_text('"requests": 20,')
        expect(gateway).to_contain_text('"inflight": 0,')

        screenshot = self.tmp_path / "page.png"
        page.screenshot(path=screenshot, full_page=True)
        assert screenshot.stat().st_size > 0
        print(f"screenshot of the page: {screenshot}")
