"""The tier's footing: Inngest's dev server starts on free ports, hands out its own
gateway, and runs one of our workers' functions (through the test proxy) to the end."""

from __future__ import annotations

import pytest

from connect_worker.lab.fleet import WorkerProcess
from connect_worker.lab.inngest_dev import InngestDevServer
from connect_worker.lab.wsproxy import WsProxy

pytestmark = pytest.mark.real_server


async def test_a_worker_runs_a_three_step_report_on_inngest_dev(
        inngest: InngestDevServer) -> None:
    async with WsProxy(inngest.gateway_url) as proxy, WorkerProcess(
            "connect_worker.lab.apps.pipeline", api_url=inngest.api_url, instance_id="w1",
            env={"INNGEST_CONNECT_GATEWAY_URL": proxy.url, "STEP_SECONDS": "0.1"}) as worker:
        await worker.wait_log("connection.ready", timeout=30)
        event_id = await inngest.send_event("report/requested", {"topic": "gears"})
        run_id = await inngest.wait_for_event_run(event_id)
        run = await inngest.wait_for_run(run_id)
        await worker.stop()
    assert run.status == "Completed", run.raw
    assert run.output["verdict"] == "approved"
    # research, draft, review and the final call: four requests, each ACKed, replied
    # once and the reply acknowledged by the gateway.
    requests = proxy.select("GATEWAY_EXECUTOR_REQUEST")
    assert len(requests) == 4
    for request in requests:
        request_id = request.request_id
        assert len(proxy.select("WORKER_REQUEST_ACK", request_id=request_id)) == 1
        assert len(proxy.select("WORKER_REPLY", request_id=request_id)) == 1
        assert len(proxy.select("WORKER_REPLY_ACK", request_id=request_id)) == 1
    assert worker.returncode == 0
