"""Socket drops and a stall between a worker and Inngest's own gateway, made by the test
proxy (the real server cannot be told to drop a socket): every reply still lands once."""

from __future__ import annotations

from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer

from .harness import scenario

pytestmark = pytest.mark.real_server

STEPS = 4
STALL = 10.0  # > 6 reply-ACK timeouts (REPLY_ACK_PATIENCE), < a lease (2 min)


async def test_drops_and_a_stall_mid_report_land_every_reply_once(
        inngest: InngestDevServer, tmp_path: Path) -> None:
    async with scenario(inngest, tmp_path, "rs-faults") as scn:
        worker = await scn.ours("w1")
        await scn.ready("w1")
        proxy = scn.proxies["w1"]
        run_id = await scn.send_report(steps=STEPS, step_seconds=1.5)

        # 1. The socket is cut while section-1 runs: the step keeps running, the worker
        #    reconnects and replies on the new socket.
        s1 = await scn.wait_execution(run_id=run_id, step="section-1", phase="start")
        assert proxy.drop() == 1
        # 2. The socket is cut as section-2's reply goes out: that frame never arrives.
        s2 = await scn.wait_execution(run_id=run_id, step="section-2", phase="start")
        proxy.drop_on("WORKER_REPLY")
        # 3. Everything the worker sends is held for a while during section-3 (its
        #    reply, its ACKs, heartbeats): the reply goes through /v0/connect/flush.
        s3 = await scn.wait_execution(run_id=run_id, step="section-3", phase="start")
        proxy.stall(STALL)
        run = await scn.wait_run(run_id, timeout=90)
        counts = scn.report("drops and a stall")
        await worker.stop()

    assert run.status == "Completed", run.raw
    # Every body ran once, to its end; nothing was cancelled or asked twice.
    assert counts.bodies_started == counts.bodies_ended == STEPS
    assert counts.duplicate_bodies == counts.bodies_cancelled == counts.interrupted == 0
    assert counts.model_requests == STEPS
    assert counts.extensions_nacked == 0
    # Each step was dispatched once: its reply landed, it was never given up and retried.
    jobs = scn.dispatches_by_job()
    assert sorted(len(frames) for frames in jobs.values()) == [1] * (STEPS + 1)
    dropped = [f for f in proxy.select(direction="proxy") if f.kind == "DROP"]
    assert len(dropped) == 2 and dropped[1].fields == {"on": "WORKER_REPLY"}
    flushed = {e["request_id"] for e in worker.events("reply.flushed")}
    # 1: section-1's reply went out on a later connection than its request came in on
    #    (or over HTTP, had the step ended before the worker reconnected).
    [request1] = proxy.select("GATEWAY_EXECUTOR_REQUEST", request_id=s1["request_id"])
    replies1 = proxy.select("WORKER_REPLY", request_id=s1["request_id"])
    assert all(r.conn > request1.conn for r in replies1)
    assert replies1 or s1["request_id"] in flushed
    # 2: section-2's first reply was cut (never forwarded); it was delivered again.
    replies2 = proxy.select("WORKER_REPLY", request_id=s2["request_id"])
    assert replies2[0].forwarded_at is None
    assert len(replies2) > 1 or s2["request_id"] in flushed
    # 3: section-3's reply was held by the stall; the flush delivered it meanwhile.
    assert s3["request_id"] in flushed
