"""Handshake validation, close codes, readiness, heartbeats (spec §2.1, §5.1, §5.4.3)."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import InvalidStatus

from connect_worker.devserver import ConnStatus, DevServer, DevServerConfig, Phase, is_ulid
from connect_worker.devserver.testing import (
    ScriptedWorker,
    fast_config,
    scripted_worker,
)
from connect_worker.protocol import pb

Kind = pb.GatewayMessageType


async def test_happy_handshake_go_intervals() -> None:
    cfg = fast_config(heartbeat_interval=60.0, extend_lease_interval=0.5)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        start = await w.start_session()
        assert is_ulid(start.connection_id)
        assert start.gateway_endpoint == dev.gateway_url
        assert start.gateway_group == "gw-a"
        ready = await w.connect()
        assert ready.heartbeat_interval == "1m0s"
        assert ready.extend_lease_interval == "500ms"
        assert ready.status_interval == "0s"
        info = await dev.wait_for_connection()
        assert info.conn_id == start.connection_id
        assert info.status is ConnStatus.READY and info.phase is Phase.READY
        assert info.functions == {"test-app": ["test-app-fn"]}
        assert info.connect_request.instance_id == "scripted-1"
        kinds = [t.kind for t in dev.timeline if t.conn_id is None or t.conn_id == w.conn_id]
        assert kinds[:4] == ["HTTP_START", "GATEWAY_HELLO", "WORKER_CONNECT",
                             "GATEWAY_CONNECTION_READY"]


async def test_seconds_interval_format() -> None:
    cfg = DevServerConfig.fast(interval_format="seconds", extend_lease_interval=0.4)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        ready = await w.connect()
        assert ready.heartbeat_interval == "1s"
        assert ready.extend_lease_interval == "1s"


async def test_hello_timeout() -> None:
    async with DevServer(fast_config(hello_timeout=0.3)) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        await w.expect(Kind.GATEWAY_HELLO)
        assert await w.wait_closed() == (1008, "connect_worker_hello_timeout")


async def test_first_frame_not_worker_connect() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        await w.send(Kind.WORKER_HEARTBEAT)
        assert await w.wait_closed() == (1008, "connect_worker_hello_invalid_msg")


async def test_garbage_first_frame() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        await w.send_raw(b"\xff\xff\xff\xff")
        assert await w.wait_closed() == (1008, "connect_worker_hello_invalid_msg")


@pytest.mark.parametrize(
    "overrides",
    [
        {"connection_id": "not-a-ulid"},
        {"instance_id": ""},
        {"apps": []},
    ],
    ids=["bad-ulid", "empty-instance", "no-apps"],
)
async def test_invalid_payload(overrides: dict[str, object]) -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        await w.send(Kind.WORKER_CONNECT, w.connect_request(**overrides))
        assert await w.wait_closed() == (1008, "connect_worker_hello_invalid_payload")
        assert dev.connections == []


async def test_undecodable_worker_connect_payload() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        frame = pb.ConnectMessage(kind=Kind.WORKER_CONNECT, payload=b"\xff\xff\xff")
        await w.send_raw(frame.SerializeToString())
        assert await w.wait_closed() == (1008, "connect_worker_hello_invalid_payload")


async def test_bad_session_token() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        auth = pb.AuthData(session_token="forged", sync_token="x")
        await w.send(Kind.WORKER_CONNECT, w.connect_request(auth_data=auth))
        assert await w.wait_closed() == (1008, "connect_authentication_failed")


async def test_too_many_apps() -> None:
    async with DevServer(fast_config(max_apps_per_connection=2)) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        apps = [pb.AppConfiguration(app_name=f"a{i}", functions=b"[]") for i in range(3)]
        await w.send(Kind.WORKER_CONNECT, w.connect_request(apps=apps))
        assert await w.wait_closed() == (1008, "connect_too_many_apps_per_connection")


async def test_invalid_function_json_is_internal_error() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.start_session()
        await w.open()
        apps = [pb.AppConfiguration(app_name="a", functions=b"{not json")]
        await w.send(Kind.WORKER_CONNECT, w.connect_request(apps=apps))
        assert await w.wait_closed() == (1011, "connect_internal_error")


async def test_sync_failure() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        dev.faults.sync_failure = ("too_many_functions", "nope")
        await w.start_session()
        await w.open()
        await w.send(Kind.WORKER_CONNECT, w.connect_request())
        err = (await w.expect(Kind.SYNC_FAILED)).parse(pb.SystemError)
        assert (err.code, err.message) == ("too_many_functions", "nope")
        assert await w.wait_closed() == (1008, "too_many_functions")
        # One-shot: the next connection syncs fine.
        async with scripted_worker(dev) as w2:
            await w2.connect()
            await dev.wait_for_connection()


async def test_missing_subprotocol_rejected() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.start_session()
        with pytest.raises(InvalidStatus) as info:
            await w.open(subprotocol=False)
        assert info.value.response.status_code == 400


async def test_manual_readiness_and_heartbeats() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev, manual_readiness=True) as w:
        await w.connect()
        await dev.wait_for(lambda: bool(dev.connections))
        info = dev.connections[0]
        assert info.status is ConnStatus.CONNECTED and info.phase is Phase.HANDSHAKING
        # Heartbeats are recorded but not answered before readiness.
        await w.send(Kind.WORKER_HEARTBEAT)
        await dev.wait_for(lambda: info.heartbeats == 1)
        assert not w.received(Kind.GATEWAY_HEARTBEAT)
        # Not routable: an event waits for a route.
        await w.send(Kind.WORKER_READY)
        await dev.wait_for(lambda: info.status is ConnStatus.READY)
        await w.send(Kind.WORKER_HEARTBEAT)
        await w.expect(Kind.GATEWAY_HEARTBEAT)


async def test_not_routable_until_ready() -> None:
    cfg = fast_config(route_wait=0.2, default_retries=0)
    async with DevServer(cfg) as dev, scripted_worker(dev, manual_readiness=True) as w:
        await w.connect()
        run_ids = await dev.send_event("test/evt")
        run = await dev.wait_for_run(run_ids[0])
        assert run.status.value == "failed"
        assert run.error["message"] == "connect_no_healthy_connection"
        assert dev.dispatches == []


async def test_ready_after_pause_is_ignored() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev, manual_readiness=True) as w:
        await w.connect()
        await w.send(Kind.WORKER_PAUSE)
        await w.send(Kind.WORKER_READY)
        await w.send(Kind.WORKER_HEARTBEAT)
        await dev.wait_for(lambda: bool(dev.connections) and dev.connections[0].heartbeats == 1)
        info = dev.connections[0]
        assert info.phase is Phase.DRAINING
        assert info.status is ConnStatus.DRAINING
        # Draining connections still get heartbeat answers.
        await w.expect(Kind.GATEWAY_HEARTBEAT)


async def test_worker_close_classification() -> None:
    async with DevServer(fast_config()) as dev:
        async with scripted_worker(dev, instance_id="a") as w1:
            await w1.connect()
            await w1.close(1000, "WORKER_SHUTDOWN")
        async with scripted_worker(dev, instance_id="b") as w2:
            await w2.connect()
            await w2.close(1000, "")
        async with scripted_worker(dev, instance_id="c") as w3:
            await w3.connect()
            await w3.abort()
        await dev.wait_for(
            lambda: len(dev.connections) == 3
            and all(c.status is ConnStatus.DISCONNECTED for c in dev.connections)
        )
        assert [c.close_class for c in dev.connections] == [
            "WORKER_SHUTDOWN", "UNEXPECTED", "UNEXPECTED"
        ]
        assert [c.close_code for c in dev.connections] == [1000, 1000, 1006]


async def test_heartbeat_miss_drops_socket_without_close_frame() -> None:
    cfg = fast_config(heartbeat_miss_close=0.3)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.wait_for(
            lambda: bool(dev.connections)
            and dev.connections[0].status is ConnStatus.DISCONNECTED
        )
        assert dev.connections[0].close_class == "CONSECUTIVE_HEARTBEATS_MISSED"
        code, _ = await w.wait_closed()
        assert code is None  # no close frame from the gateway


async def test_stale_heartbeat_not_routed() -> None:
    cfg = fast_config(heartbeat_stale=0.2, route_wait=0.5, default_retries=0)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        await asyncio.sleep(0.3)  # let the last heartbeat go stale (time is the point here)
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.error["message"] == "connect_no_healthy_connection"


async def test_unknown_kind_ignored_garbage_frame_closes() -> None:
    # Like the real gateway: an unknown kind is logged and ignored; a frame that is not a
    # ConnectMessage ends the connection (wsproto.Read: close 1007).
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await w.send_raw(pb.ConnectMessage(kind=99).SerializeToString())  # type: ignore[arg-type]
        await w.send(Kind.WORKER_HEARTBEAT)
        await w.expect(Kind.GATEWAY_HEARTBEAT)
        assert dev.connections[0].status is ConnStatus.READY
        await w.send_raw(b"\xff\xfe")
        assert await w.wait_closed() == (1007, "failed to unmarshal Protobuf")
        assert any("undecodable" in e for e in dev.errors)


async def test_undecodable_reply_closes_1011() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await w.send_raw(pb.ConnectMessage(kind=Kind.WORKER_REPLY,
                                           payload=b"\xff\xfe").SerializeToString())
        assert await w.wait_closed() == (1011, "connect_internal_error")


async def test_devserver_sends_garbage_to_worker() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        info = await dev.wait_for_connection()
        await dev.send_raw(info.conn_id, "text frame")
        await dev.send_message(info.conn_id, 42, b"")
        await w.expect(42)
        assert [t.kind for t in dev.timeline if t.kind == "RAW"] == ["RAW"]


async def test_capabilities_and_json_dump() -> None:
    import httpx

    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.wait_for_connection()
        async with httpx.AsyncClient() as http:
            res = await http.get(f"{dev.api_url}/v0/connect/conns")
        data = res.json()["data"]
        assert data[0]["conn_id"] == w.conn_id
        assert data[0]["status"] == "READY"
        assert json.loads(dev.connections[0].connect_request.capabilities) == {"connect": "v1"}


async def test_scripted_worker_type() -> None:
    # The helper is a plain dataclass; constructing one needs no server.
    w = ScriptedWorker("http://127.0.0.1:1")
    assert w.app == "test-app"
