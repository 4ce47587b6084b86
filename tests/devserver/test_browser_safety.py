"""The dev gateway refuses what a web page in the developer's browser could send
(devserver/browser.py): cross-site POSTs, simple (text/plain, form) bodies, and any
request addressed to a name that is not this machine (DNS rebinding)."""

from __future__ import annotations

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from connect_worker.devserver import DevServer
from connect_worker.devserver.browser import host_allowed, origin_allowed
from connect_worker.devserver.testing import fast_config, scripted_worker

EVIL = "http://evil.example"
TEXT = {"content-type": "text/plain"}


async def test_cross_site_requests_start_no_run_and_fire_no_fault() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as worker, \
            httpx.AsyncClient(base_url=dev.api_url) as http:
        await worker.connect()
        event = b'{"name": "test/evt", "data": {}}'
        attempts = [
            # The requests from the issue: what a page's <form> or fetch(no-cors) sends.
            ("/e/dev", {**TEXT, "origin": EVIL}, event),
            ("/v1/faults/drop", {**TEXT, "origin": EVIL}, b"{}"),
            # Each check on its own: a JSON body from another site; a simple body with
            # no Origin (a page that hides it); a Referer from another site; a page
            # that rebound its own name to 127.0.0.1.
            ("/e/dev", {"content-type": "application/json", "origin": EVIL}, event),
            ("/e/dev", TEXT, event),
            ("/e/dev", {}, event),
            ("/e/dev", {"content-type": "application/x-www-form-urlencoded"}, event),
            ("/v1/faults/drop", {"referer": EVIL + "/page"}, b"{}"),
            ("/e/dev", {"content-type": "application/json", "host": "evil.example:8288"},
             event),
            ("/v1/faults/drop", {"content-type": "application/json", "origin": "null"}, b"{}"),
            ("/v1/faults/dual-dispatch",
             {"content-type": "application/json", "host": "evil.example"}, b"{}"),
        ]
        statuses = [(await http.post(path, content=body, headers=headers)).status_code
                    for path, headers, body in attempts]
        assert statuses == [403, 403, 403, 415, 415, 415, 403, 403, 403, 403]
        # Reading through a rebound name is refused too (the API shows event data).
        for path in ("/v1/runs", "/v1/connections", "/", "/v0/connect/conns"):
            res = await http.get(path, headers={"host": "evil.example"})
            assert res.status_code == 403, path
        # What counts: no run started, no fault fired, the worker's socket untouched.
        assert dev.runs == {} and dev.events == {}
        assert dev.faults.dual_dispatch == 0
        assert [c.closed_at for c in dev.connections] == [None]
        # The same requests as the page and the CLI send them are accepted.
        ok = await http.post("/e/dev", content=event, headers={
            "content-type": "application/json", "origin": dev.api_url,
            "referer": dev.api_url + "/"})
        assert ok.status_code == 200
        assert len(dev.runs) == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "app.localhost"])
async def test_loopback_names_are_answered(host: str) -> None:
    async with DevServer(fast_config()) as dev, httpx.AsyncClient() as http:
        port = dev.api_url.rsplit(":", 1)[1]
        res = await http.get(f"{dev.api_url}/v1/runs", headers={"host": f"{host}:{port}"})
        assert res.status_code == 200


async def test_a_worker_addressing_the_gateway_as_localhost_connects() -> None:
    """start hands out the name the worker used; the upgrade is checked as the API is."""
    async with DevServer(fast_config()) as dev:
        worker = scripted_worker(dev)
        worker.api_url = dev.api_url.replace("127.0.0.1", "localhost")
        async with worker:
            await worker.connect()
            assert worker.start is not None
            assert worker.start.gateway_endpoint.startswith("ws://localhost:")
            assert [c.closed_at for c in dev.connections] == [None]  # it got in


async def test_websocket_upgrade_from_another_site_or_name_is_refused() -> None:
    async with DevServer(fast_config()) as dev:
        for headers in ({"Origin": EVIL}, {"Host": "evil.example"}):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(dev.gateway_url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 403
        assert dev.connections == []


async def test_allow_host_names_a_service_the_gateway_answers_to() -> None:
    """A Compose/Kubernetes service name: --allow-host devserver."""
    async with DevServer(fast_config(allowed_hosts=("devserver",))) as dev, \
            httpx.AsyncClient() as http:
        res = await http.get(f"{dev.api_url}/v1/runs", headers={"host": "devserver:8288"})
        assert res.status_code == 200
        res = await http.get(f"{dev.api_url}/v1/runs", headers={"host": "other:8288"})
        assert res.status_code == 403


def test_the_checks_by_value() -> None:
    assert host_allowed("10.0.0.5:8288")  # an address cannot be rebound
    assert host_allowed("[fd00::1]:8288") and host_allowed(None)
    assert not host_allowed("127.0.0.1.evil.example") and not host_allowed("localhost.evil")
    assert origin_allowed("http://localhost:3000") and origin_allowed("https://[::1]")
    assert not origin_allowed("http://127.0.0.1.nip.io") and not origin_allowed("file://")
