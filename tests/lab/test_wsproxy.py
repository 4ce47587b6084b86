"""The test proxy between a worker and a gateway (connect_worker.lab.wsproxy), on the
local dev gateway: it records decoded frames both ways, cuts sockets, and holds frames."""

from __future__ import annotations

import pytest

from connect_worker.devserver import DevServer
from connect_worker.devserver.state import RunStatus
from connect_worker.lab.fleet import WorkerProcess
from connect_worker.lab.wsproxy import WsProxy, describe
from connect_worker.protocol import pb


def test_describe_decodes_kind_and_payload() -> None:
    payload = pb.WorkerReplyAckData(request_id="r1").SerializeToString()
    frame = pb.ConnectMessage(kind=pb.GatewayMessageType.WORKER_REPLY_ACK, payload=payload)
    assert describe(frame.SerializeToString()) == ("WORKER_REPLY_ACK", {"request_id": "r1"})
    assert describe(b"\xff\xff") == ("UNDECODABLE", {})
    assert describe(pb.ConnectMessage(kind=99).SerializeToString())[0] == "UNKNOWN_99"


def test_the_proxy_refuses_a_non_loopback_upstream() -> None:
    with pytest.raises(ValueError, match="loopback"):
        WsProxy("ws://192.0.2.1:8289/v0/connect")


async def test_records_drops_and_stalls_a_worker_connection(devserver: DevServer) -> None:
    async with WsProxy(devserver.gateway_url) as proxy, WorkerProcess(
            "connect_worker.lab.apps.pipeline", api_url=devserver.api_url, instance_id="w1",
            env={"INNGEST_CONNECT_GATEWAY_URL": proxy.url, "STEP_SECONDS": "0.3"}) as worker:
        await worker.wait_ready(devserver)
        hello = await proxy.wait_kind("WORKER_CONNECT", direction="worker")
        assert hello.fields["instance_id"] == "w1"
        assert hello.fields["apps"][0]["app_name"] == "pipeline"

        # A dropped socket mid-run: the worker reconnects through the proxy again.
        (run_id,) = await devserver.send_event("report/requested", {})
        await proxy.wait_kind("WORKER_REPLY_ACK", direction="gateway")
        assert proxy.drop() == 1
        run = await devserver.wait_for_run(run_id, timeout=30)
        assert run.status is RunStatus.COMPLETED
        assert {f.conn for f in proxy.select("WORKER_CONNECT")} == {1, 2}
        assert [f.fields["code"] for f in proxy.select("CLOSE", direction="gateway")
                if f.conn == 1] == [1006]

        # A stall holds the worker's frames (in order) until released.
        stall_at = proxy.now()
        proxy.stall()
        (run_id,) = await devserver.send_event("report/requested", {})
        ack = await proxy.wait_kind("WORKER_REQUEST_ACK", after=stall_at)
        assert ack.forwarded_at is None  # held
        assert devserver.dispatches[-1].acked_at is None
        proxy.release()
        run = await devserver.wait_for_run(run_id, timeout=30)
        assert run.status is RunStatus.COMPLETED
        assert ack.forwarded_at is not None and ack.forwarded_at >= ack.at
        assert [f.kind for f in proxy.select(direction="proxy")] == ["DROP", "STALL", "RELEASE"]
        await worker.stop()
