"""The drain deadline on Inngest's own dev server: a step longer than the drain budget
is handed back, and its retry starts on the new worker within seconds, not after the
lease (2 min) nor Inngest's retry backoff (15 s + up to 30 s of jitter)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer

from .harness import scenario

pytestmark = pytest.mark.real_server
log = logging.getLogger("real_server")

DRAIN = 2.0
FIRST_BACKOFF = 15.0  # pkg/backoff: the shortest first retry delay without retry_after


async def test_a_step_past_the_drain_deadline_is_handed_back_and_retried_in_seconds(
        inngest: InngestDevServer, tmp_path: Path) -> None:
    async with scenario(inngest, tmp_path, "rs-handback") as scn:
        v1 = await scn.ours("v1", drain_timeout=DRAIN)
        await scn.ready("v1")
        # section-2 takes 10 minutes on its first attempt: far past any drain budget.
        run_id = await scn.send_report(steps=3, slow={"section-2": 600})
        first = await scn.wait_execution(run_id=run_id, step="section-2", phase="start")
        v2 = await scn.ours("v2", app_version="v2")
        await scn.ready("v2")
        v1.send_signal(signal.SIGTERM)
        assert await v1.wait(30) == 3  # EXIT_ABANDONED: the deadline passed mid-step
        retry = await scn.wait_execution(run_id=run_id, step="section-2", phase="start",
                                         attempt=1, timeout=90)
        run = await scn.wait_run(run_id)
        counts = scn.report("drain deadline hand-back")
        await v2.stop()

    assert v1.signalled_at is not None
    signal_to_retry = retry["ts"] - v1.signalled_at
    log.info("drain deadline: SIGTERM -> retry started %.2f s (drain budget %g s)",
             signal_to_retry, DRAIN)
    assert run.status == "Completed", run.raw
    assert retry["pid"] == v2.pid
    assert retry["job_id"] == first["job_id"]  # the same step (queue item), retried
    assert signal_to_retry < FIRST_BACKOFF, signal_to_retry
    # v1 gave the step back explicitly and the server acknowledged that reply.
    [abandoned] = v1.events("drain.step_abandoned")
    assert abandoned["handed_back"] is True and abandoned["step_id"] == "section-2"
    [handed] = v1.events("drain.handed_back")
    assert handed["steps"] == handed["acknowledged"] == 1
    request_id = str(first["request_id"])
    assert scn.proxies["v1"].select("WORKER_REPLY_ACK", request_id=request_id)
    # The abandoned copy was stopped, not left running; every other body ran once.
    assert scn.executions(run_id=run_id, step="section-2", phase="cancelled", attempt=0)
    assert counts.bodies_ended == 3 and counts.duplicate_bodies == counts.interrupted == 0
    # The abandoned attempt never reached the model; the retry asked once.
    assert counts.model_requests == 3
