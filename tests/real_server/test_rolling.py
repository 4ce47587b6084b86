"""A rolling deploy in the middle of reports on Inngest's own dev server: v1 gets SIGTERM
during a step, v2 takes over. connect_worker and, side by side in the same run and on
the same server, the official Python SDK's own Connect client (the baseline)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer, Run

from .harness import Counts, Scenario, scenario

pytestmark = pytest.mark.real_server

STEPS = 7
REPORTS = 3
SLOW = 12.0  # seconds: longer than starting v2 takes, far shorter than the drain budget


@dataclass
class Deploy:
    runs: list[str]
    finished: list[Run]
    running: dict[str, object]  # the execution record of the step v1 was running
    v1_pid: int
    v2_pid: int
    v1_exit: int
    drain_seconds: float
    counts: Counts


async def rolling_deploy(scn: Scenario, official: bool) -> Deploy:
    start = scn.official if official else scn.ours
    v1 = await start("v1", app_version="v1")
    await scn.ready("v1")
    # section-2 of the first report takes a few seconds more: v1 is still in it when
    # v2 is up and v1 gets SIGTERM (checked below).
    runs = [await scn.send_report(topic=f"topic {i}", step_seconds=1.0,
                                  slow={"section-2": SLOW} if i == 0 else {})
            for i in range(REPORTS)]
    running = await scn.wait_execution(run_id=runs[0], step="section-2", phase="start")
    v2 = await start("v2", app_version="v2")
    await scn.ready("v2")
    v1.send_signal(signal.SIGTERM)
    assert not scn.executions(run_id=runs[0], step="section-2", phase="end"), "too late"
    code = await v1.wait(60)
    assert v1.signalled_at is not None and v1.exited_at is not None
    finished = [await scn.wait_run(run_id) for run_id in runs]
    counts = scn.report("rolling deploy, official client" if official else "rolling deploy",
                        drain_s=round(v1.exited_at - v1.signalled_at, 2), v1_exit=code)
    await v2.stop()
    return Deploy(runs, finished, running, v1.pid, v2.pid, code,
                  v1.exited_at - v1.signalled_at, counts)


async def test_a_rolling_deploy_mid_step_side_by_side_with_the_official_client(
        inngest: InngestDevServer, tmp_path: Path) -> None:
    async with scenario(inngest, tmp_path, "rs-ours") as ours, \
            scenario(inngest, tmp_path, "rs-sdk") as sdk:
        mine, theirs = await asyncio.gather(rolling_deploy(ours, official=False),
                                            rolling_deploy(sdk, official=True))

    # connect_worker: the promise.
    assert [r.status for r in mine.finished] == ["Completed"] * REPORTS
    assert mine.v1_exit == 0
    # The step v1 was running when it got SIGTERM finished on v1 ...
    [end] = ours.executions(run_id=mine.runs[0], step="section-2", phase="end")
    assert end["pid"] == mine.running["pid"] == mine.v1_pid
    # ... the server acknowledged its reply before v1 closed, with the reason it expects ...
    v1 = ours.proxies["v1"]
    [ack] = v1.select("WORKER_REPLY_ACK", request_id=str(mine.running["request_id"]))
    [close] = v1.select("CLOSE", direction="worker")
    assert close.fields == {"code": 1000, "reason": "WORKER_SHUTDOWN"}
    assert ack.at < close.at
    # ... and the next step of that report ran on v2.
    [after] = ours.executions(run_id=mine.runs[0], step="section-3", phase="start")
    assert after["pid"] == mine.v2_pid
    # 0 interrupted, 0 duplicates, 0 failed runs; every reply acknowledged.
    counts = mine.counts
    assert counts.interrupted == counts.duplicate_bodies == counts.bodies_cancelled == 0
    assert counts.bodies_started == counts.bodies_ended == REPORTS * STEPS
    assert counts.model_requests == REPORTS * STEPS
    assert counts.replies == counts.replies_acked == counts.requests_acked
    assert counts.extensions_nacked == 0
    # A request the gateway wrote to v1 as v1 paused was not ACKed, and the gateway
    # re-routed it at once (same job, another dispatch): nothing else went unanswered.
    acked = {f.request_id for f in ours.frames("WORKER_REQUEST_ACK")}
    for job, dispatches in ours.dispatches_by_job().items():
        assert any(d.request_id in acked for d in dispatches), job
    # v1 became unroutable with WORKER_PAUSE (after READY: it asks for work explicitly).
    assert v1.select("WORKER_CONNECT")[0].fields["worker_manual_readiness_ack"] is True
    assert v1.select("WORKER_PAUSE")

    # The official client, same scenario: what it does, recorded. Its runs complete too
    # (a step shorter than its unbounded drain finishes on v1) ...
    assert [r.status for r in theirs.finished] == ["Completed"] * REPORTS
    sdk_v1 = sdk.proxies["v1"]
    # ... but it is READY the moment the gateway is (no readiness of its own), and it
    # closes with an empty reason, which the server records as an UNEXPECTED disconnect.
    assert "worker_manual_readiness_ack" not in sdk_v1.select("WORKER_CONNECT")[0].fields
    [sdk_close] = sdk_v1.select("CLOSE", direction="worker")
    assert sdk_close.fields["reason"] == ""
    # (Whether its last reply was acknowledged before it closed is timing: logged.)
    acks = sdk_v1.select("WORKER_REPLY_ACK")
    logging.getLogger("real_server").info(
        "official client v1: closed %.3f s after its last reply ACK; close %s",
        sdk_close.at - acks[-1].at if acks else float("nan"), sdk_close.fields)
    # Whatever it lost or repeated is in the log line above; it never paid less.
    assert theirs.counts.model_requests >= REPORTS * STEPS
