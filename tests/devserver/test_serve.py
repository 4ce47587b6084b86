"""``serve()``, the pytest fixture and the module entry point."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from connect_worker.devserver import DevServer, RunStatus, serve
from connect_worker.devserver.testing import (
    devserver_fixture,
    fast_config,
    scripted_worker,
    step_script,
)


async def test_serve_runs_until_cancelled() -> None:
    started: asyncio.Future[DevServer] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(fast_config(), api_port=0, gateway_port=0, ready=started.set_result)
    )
    try:
        dev = await asyncio.wait_for(asyncio.shield(started), 5)
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{dev.api_url}/health")).status_code == 200
            assert (await http.get(dev.gateway_url.replace("ws://", "http://")
                                   .replace("/v0/connect", "/ready"))).status_code == 200
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_devserver_fixture(devserver: DevServer) -> None:
    async with scripted_worker(devserver, replier=step_script(["x"])) as w:
        await w.connect()
        run = await devserver.wait_for_run((await devserver.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED and run.output == "done"


two_groups = devserver_fixture(gateway_groups=("gw-a", "gw-b"))


async def test_fixture_factory(two_groups: DevServer) -> None:
    assert set(two_groups.gateway_urls) == {"gw-a", "gw-b"}
    assert two_groups.config.heartbeat_interval == 1.0
