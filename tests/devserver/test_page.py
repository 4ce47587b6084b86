"""The page at the dev gateway's root, in a real headless browser (Debian's chromium,
driven by Playwright, which never downloads a browser of its own here) during real
runs of a real worker: the connection is listed, runs and their steps appear and
change state without a reload. A screenshot is kept in the test's tmp directory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright import async_api as playwright_api

from connect_worker.devserver import DevServer
from connect_worker.devserver.testing import fast_config

from ..engine import apps
from ..engine.harness import running_worker
from ..missing import missing

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_MISSING = "Debian's chromium is missing (scripts/setup.d/chromium.sh installs it)"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
async def browser_page(tmp_path: Path) -> AsyncIterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        missing(CHROMIUM_MISSING)
    async with playwright_api.async_playwright() as pw:
        # A persistent context on a new empty profile (--user-data-dir), headless.
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield context.pages[0] if context.pages else await context.new_page()
        finally:
            await context.close()


async def test_page_shows_connections_runs_and_steps_live(
    browser_page: Any, tmp_path: Path
) -> None:
    page = browser_page
    apps.probe.reset()
    async with DevServer(fast_config()) as dev, \
            running_worker(dev, instance_id="page-worker-1", app_version="v7"):
        await page.goto(dev.api_url + "/")
        row = page.locator('#connections tr[data-worker="page-worker-1"]')
        await row.filter(has_text="READY").wait_for(timeout=10_000)
        assert "engine @ v7" in await row.inner_text()
        await page.evaluate("window.__notReloaded = true")

        # Sent from the page's form: a run of three steps; each step by name, by this
        # worker, over the socket.
        await page.fill('#send input[name="name"]', "t/three")
        await page.click('#send button[type="submit"]')
        await dev.wait_for(lambda: len(dev.runs) == 1)
        [done_id] = list(dev.runs)
        await page.locator("#sent", has_text=f"started run {done_id}").wait_for(timeout=10_000)
        await dev.wait_for_run(done_id)
        done = page.locator(f'.run[data-run-id="{done_id}"][data-status="completed"]')
        await done.wait_for(timeout=10_000)
        steps = done.locator("tr.step")
        assert await steps.count() == 3
        for index, name in enumerate(["a", "b", "c"]):
            cells = await steps.nth(index).locator("td").all_inner_texts()
            assert cells[:5] == [name, "completed", "1", "page-worker-1", "v7"], cells
            assert cells[7] == "socket"
        assert await done.locator(".lane").count() == 4  # three steps, then the return
        # What the run returned, as `connect-worker runs RUN_ID` prints it.
        assert await done.locator(".result").inner_text() == 'output: ["A","B","C"]'

        # A run held inside its step: running on the page and in flight on the connection.
        [held_id] = await dev.send_event("t/gated", {"key": "page"})
        await apps.probe.wait_started("page")
        held = page.locator(f'.run[data-run-id="{held_id}"][data-status="running"]')
        await held.wait_for(timeout=10_000)
        await page.wait_for_function(
            "() => document.querySelector('#connections tr[data-worker=\"page-worker-1\"]')"
            ".innerText.includes('engine-gated')", timeout=10_000)
        await page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        apps.probe.gates["page"].set()
        await dev.wait_for_run(held_id)
        await page.locator(f'.run[data-run-id="{held_id}"][data-status="completed"]'
                           ).wait_for(timeout=10_000)

        # Rehearse a gateway deploy from the page: the worker reconnects.
        [old] = dev.live_connections
        await row.locator('button[data-fault="gateway-closing"]').click()
        await dev.wait_for_connection(lambda c: c.conn_id != old.conn_id)
        await dev.wait_for(lambda: old.close_code is not None)
        await page.locator(f'#connections tr.closed[data-conn="{old.conn_id}"]'
                           ).wait_for(timeout=10_000)
        assert await page.evaluate("window.__notReloaded") is True
    assert (tmp_path / "page.png").stat().st_size > 10_000
