"""A report of LLM steps on Inngest's own dev server, to completion."""

from __future__ import annotations

from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer

from .harness import scenario

pytestmark = pytest.mark.real_server

STEPS = 7


async def test_a_seven_step_llm_report_runs_to_completion(
        inngest: InngestDevServer, tmp_path: Path) -> None:
    async with scenario(inngest, tmp_path, "rs-report") as scn:
        await scn.ours("w1")
        await scn.ready("w1")
        run_id = await scn.send_report(topic="usage-based pricing")
        run = await scn.wait_run(run_id)
        counts = scn.report("7-step report")
        await scn.workers["w1"].stop()

    assert run.status == "Completed", run.raw
    assert run.output["steps"] == STEPS and len(run.output["sections"]) == STEPS
    # Every step body ran once, to its end, and asked the model once.
    assert counts.bodies_started == counts.bodies_ended == STEPS
    assert counts.duplicate_bodies == counts.interrupted == 0
    assert counts.model_requests == STEPS
    prompts = [seen.prompt for seen in scn.stub.requests]
    assert [f"Write section {i} " in p for i, p in enumerate(prompts, 1)] == [True] * STEPS
    # 7 steps + the call that returns the function's result: 8 dispatches, each acked
    # by the worker, replied once and the reply acknowledged by the server.
    assert counts.dispatches == counts.replies == counts.replies_acked == STEPS + 1
    assert counts.extensions_nacked == 0
    for request in scn.frames("GATEWAY_EXECUTOR_REQUEST"):
        assert len(scn.frames("WORKER_REQUEST_ACK", request_id=request.request_id)) == 1
        assert len(scn.frames("WORKER_REPLY", request_id=request.request_id)) == 1
    # Each step is its own queue item: 8 distinct job ids, the one each body saw.
    jobs = scn.dispatches_by_job()
    assert len(jobs) == STEPS + 1
    assert {e["job_id"] for e in scn.executions(phase="start")} <= set(jobs)
    assert scn.workers["w1"].returncode == 0
