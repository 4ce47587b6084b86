"""Confirm-before-run against Inngest's own gateway: a re-route race on one step runs its
body once.

The race of docs/reliability.md#confirm-before-run, made by the test proxy: w1's frames
to the gateway are held (its ACK and its first extension never arrive), then its socket
is cut. Inngest fails the forward and re-routes the same request, lease id included, to
w2 (w1's reconnection is held too, so it is not routable). w2's extension is the first
the gateway sees and is granted; once w1's frames flow again, its extension with the
same lease id is refused, and its copy ends without running the body.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer

from .harness import pids_of, scenario

pytestmark = pytest.mark.real_server

CONFIRM = {"CONNECT_WORKER_CONFIRM_BEFORE_RUN": "1"}


async def test_a_rerouted_step_runs_its_body_once_with_confirm_before_run(
        inngest: InngestDevServer, tmp_path: Path) -> None:
    async with scenario(inngest, tmp_path, "rs-confirm") as scn:
        await scn.ours("w1", **CONFIRM)
        await scn.ready("w1")
        w1 = scn.proxies["w1"]
        w1.stall()  # until released: w1's ACK and extension are held
        run_id = await scn.send_report(steps=1)
        request = await w1.wait_kind("GATEWAY_EXECUTOR_REQUEST", direction="gateway")
        await w1.wait_kind("WORKER_REQUEST_EXTEND_LEASE", direction="worker",
                           request_id=request.request_id)
        await scn.ours("w2", **CONFIRM)
        await scn.ready("w2")
        w2 = scn.proxies["w2"]
        # Routable once the gateway has recorded a heartbeat of w2's connection.
        await w2.wait_kind("GATEWAY_HEARTBEAT", direction="gateway")
        assert w1.drop() == 1  # the held ACK and extension are lost with the socket
        rerouted = await w2.wait_kind("GATEWAY_EXECUTOR_REQUEST", direction="gateway",
                                      request_id=request.request_id)
        granted = await w2.wait_kind("WORKER_REQUEST_EXTEND_LEASE_ACK", direction="gateway",
                                     request_id=request.request_id)
        w1.release()
        refused = await w1.wait_for(
            lambda f: f.kind == "WORKER_REQUEST_EXTEND_LEASE_ACK"
            and f.request_id == request.request_id and f.conn > request.conn,
            timeout=60, what="w1's extension answered on its new socket")
        run = await scn.wait_run(run_id, timeout=90)
        counts = scn.report("re-route race with confirm-before-run")
        w2_pids = pids_of(scn, "w2")

    assert run.status == "Completed", run.raw
    assert rerouted.fields.get("lease_id") == request.fields.get("lease_id")
    assert granted.fields.get("new_lease_id")
    assert not refused.fields.get("new_lease_id"), "w1's late extension was granted"
    # One body for the one step, on w2; w1's copy never started it.
    section = scn.executions(run_id=run_id, step="section-1", phase="start")
    assert len(section) == 1 and section[0]["pid"] in w2_pids
    assert counts.bodies_started == counts.bodies_ended == 1
    assert counts.duplicate_bodies == counts.bodies_cancelled == 0
    assert counts.model_requests == 1
