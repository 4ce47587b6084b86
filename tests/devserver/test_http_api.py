"""/v0/connect/start, /v0/connect/flush, auth, event and run APIs (spec §4)."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from connect_worker.devserver import DevServer, is_ulid
from connect_worker.devserver.testing import fast_config, make_reply, scripted_worker, step_script
from connect_worker.protocol import pb

PROTOBUF = "application/protobuf"
JSON = {"content-type": "application/json"}
KEY = "signkey-test-" + "ab" * 32
HASHED = hashlib.sha256(bytes.fromhex("ab" * 32)).hexdigest()


async def _start(dev: DevServer, headers: dict[str, str] | None = None,
                 body: bytes = b"") -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{dev.api_url}/v0/connect/start", content=body,
                               headers={"content-type": PROTOBUF, **(headers or {})})


async def _flush(dev: DevServer, body: bytes, headers: dict[str, str] | None = None
                 ) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(f"{dev.api_url}/v0/connect/flush", content=body,
                               headers={"content-type": PROTOBUF, **(headers or {})})


async def test_start_empty_body_dev_mode() -> None:
    async with DevServer(fast_config()) as dev:
        res = await _start(dev, {"X-Inngest-Env": "branch-1"})
        assert res.status_code == 200
        start = pb.StartResponse()
        start.ParseFromString(res.content)
        assert is_ulid(start.connection_id)
        assert start.gateway_endpoint.startswith("ws://127.0.0.1:")
        assert start.gateway_endpoint.endswith("/v0/connect")
        assert start.session_token
        call = dev.start_calls[0]
        assert call.env == "branch-1" and call.status == 200
        assert call.connection_id == start.connection_id


async def test_start_bad_body() -> None:
    async with DevServer(fast_config()) as dev:
        assert (await _start(dev, body=b"\xff\xff\xff")).status_code == 400


async def test_start_failures_and_delay() -> None:
    async with DevServer(fast_config()) as dev:
        dev.faults.start_failures = [500, 429, 401]
        statuses = [(await _start(dev)).status_code for _ in range(4)]
        assert statuses == [500, 429, 401, 200]
        assert [c.status for c in dev.start_calls] == statuses


async def test_exclude_gateways_with_two_groups() -> None:
    async with DevServer(fast_config(gateway_groups=("gw-a", "gw-b"))) as dev:
        assert len(set(dev.gateway_urls.values())) == 2
        req = pb.StartRequest(exclude_gateways=["gw-a"]).SerializeToString()
        start = pb.StartResponse()
        start.ParseFromString((await _start(dev, body=req)).content)
        assert start.gateway_group == "gw-b"
        assert start.gateway_endpoint == dev.gateway_urls["gw-b"]
        assert dev.start_calls[0].exclude_gateways == ["gw-a"]
        # Connecting there puts the connection in that group.
        async with scripted_worker(dev) as w:
            w.start = start
            await w.connect()
            info = await dev.wait_for_connection()
            assert info.gateway_group == "gw-b"


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        (f"Bearer {HASHED}", 200),
        (f"Bearer {KEY}", 200),
        (f"Bearer signkey-test-{HASHED}", 200),
        (f"Bearer signkey-prod-{HASHED}", 200),
    ],
    ids=["missing", "wrong", "hashed", "plain", "prefixed-hash", "other-prefix"],
)
async def test_auth_mode(header: str | None, status: int) -> None:
    async with DevServer(fast_config(signing_key=KEY)) as dev:
        headers = {"Authorization": header} if header else {}
        res = await _start(dev, headers)
        assert res.status_code == status
        if status == 200:
            start = pb.StartResponse()
            start.ParseFromString(res.content)
            assert start.sync_token == header.split(" ", 1)[1]  # type: ignore[union-attr]
        assert (await _flush(dev, b"", headers)).status_code == (400 if status == 200 else 401)


async def test_flush_validation_and_dedupe() -> None:
    async with DevServer(fast_config()) as dev:
        assert (await _flush(dev, b"")).status_code == 400
        assert (await _flush(dev, b"\xff\xff\xff")).status_code == 400
        bad_trace = pb.SDKResponse(request_id="r1", system_trace_ctx=b"not json")
        assert (await _flush(dev, bad_trace.SerializeToString())).status_code == 400
        no_trace = pb.SDKResponse(request_id="r1")
        assert (await _flush(dev, no_trace.SerializeToString())).status_code == 400
        good = pb.SDKResponse(request_id="r1", system_trace_ctx=b"{}", body=b'"one"')
        res = await _flush(dev, good.SerializeToString())
        assert res.status_code == 200
        out = pb.FlushResponse()
        out.ParseFromString(res.content)
        assert out.request_id == "r1"
        dup = pb.SDKResponse(request_id="r1", system_trace_ctx=b"{}", body=b'"two"')
        assert (await _flush(dev, dup.SerializeToString())).status_code == 200
        assert [f.stored for f in dev.flushes] == [True, False]
        stored = dev.core.buffer.get("r1")
        assert stored is not None and stored.body == b'"one"'


async def test_flushed_reply_completes_the_step() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        dev.faults.withhold_reply_ack = True
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        reply = make_reply(req, pb.SDKResponseStatus.DONE, {"ok": True})
        await w.reply(reply, wait_ack=False)
        await dev.wait_for(lambda: len(dev.replies) == 1)
        # The worker got no ACK: it flushes the same reply over HTTP. Harmless.
        assert (await _flush(dev, reply.SerializeToString())).status_code == 200
        run = await dev.wait_for_run(run_id)
        assert run.output == {"ok": True}
        assert not w.received(pb.GatewayMessageType.WORKER_REPLY_ACK)
        assert dev.dispatches[0].reply_via == "ws"


async def test_event_api_and_run_api() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, replier=step_script(["a"], output={"done": 1})
    ) as w:
        await w.connect()
        await dev.wait_for_connection()
        async with httpx.AsyncClient() as http:
            res = await http.post(f"{dev.api_url}/e/NO_EVENT_KEY_SET",
                                  json=[{"name": "test/evt", "data": {"x": 1}},
                                        {"name": "other/evt"}])
            assert res.status_code == 200
            body = res.json()
            assert body["status"] == 200 and len(body["ids"]) == 2
            event_id = body["ids"][0]
            await dev.wait_for(
                lambda: all(r.status.terminal for r in dev.runs.values()) and bool(dev.runs)
            )
            runs = (await http.get(f"{dev.api_url}/v1/events/{event_id}/runs")).json()["data"]
            assert len(runs) == 1 and runs[0]["status"] == "completed"
            run = (await http.get(f"{dev.api_url}/v1/runs/{runs[0]['run_id']}")).json()["data"]
            assert run["output"] == {"done": 1}
            assert (await http.get(f"{dev.api_url}/v1/runs/nope")).status_code == 404
            assert (await http.get(f"{dev.api_url}/v1/events/{body['ids'][1]}/runs")).json()[
                "data"
            ] == []
            bad = await http.post(f"{dev.api_url}/e/k", content=b"{", headers=JSON)
            assert bad.status_code == 400
            assert (await http.post(f"{dev.api_url}/e/k", json={"data": 1})).status_code == 400
            inv = await http.post(f"{dev.api_url}/invoke/test-app-fn", json={"data": {"y": 2}})
            assert inv.status_code == 200
            invoked = await dev.wait_for_run(inv.json()["run_id"])
            assert invoked.event.data == {"y": 2}
            assert (await http.post(f"{dev.api_url}/invoke/missing", json={})).status_code == 404


async def test_timeline_file(tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "timeline.jsonl"
    async with DevServer(fast_config(timeline_path=str(path))) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.wait_for_connection()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["kind"] for x in lines][:3] == ["HTTP_START", "GATEWAY_HELLO", "WORKER_CONNECT"]
