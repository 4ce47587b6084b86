"""Leases on Inngest's own dev server, where a lease lasts 2 minutes (extended every 30 s)
and cannot be shortened: a step longer than the lease, a worker SIGKILLed after its
model answer was stored, a stall longer than the lease, and a deploy whose grace period
ends inside a step (connect_worker and the official client side by side). They take
minutes each, so
they run side by side, each with its own app and workers, on one server whose retry
backoff is 1 s (``--retry-interval 1``; the lease, not the backoff, is what they test).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer

from .background import Background
from .harness import Scenario, scenario

pytestmark = [pytest.mark.real_server, pytest.mark.timeout(480)]
log = logging.getLogger("real_server")

LEASE = 120.0  # consts.ConnectWorkerRequestLeaseDuration
EXTEND_INTERVAL = 30.0
# Lease lapse -> the executor notices (checks every 30 s, then a 5 s grace) -> retry.
GIVE_UP = LEASE + EXTEND_INTERVAL + 5 + 60


async def longer_than_the_lease(server: InngestDevServer, tmp: Path) -> None:
    """A 135 s step is kept alive by extensions: one dispatch, one body, no NACK."""
    async with scenario(server, tmp, "rs-long") as scn:
        await scn.ours("w1")
        await scn.ready("w1")
        run_id = await scn.send_report(steps=2, slow={"section-1": LEASE + 15})
        run = await scn.wait_run(run_id, timeout=LEASE + 90)
        counts = scn.report("step longer than the lease")
        [start] = scn.executions(step="section-1", phase="start")
        proxy = scn.proxies["w1"]
        extensions = proxy.select("WORKER_REQUEST_EXTEND_LEASE", request_id=start["request_id"])
        acks = proxy.select("WORKER_REQUEST_EXTEND_LEASE_ACK", request_id=start["request_id"])
        gaps = [round(b.at - a.at, 1) for a, b in itertools.pairwise(extensions)]
        log.info("step longer than the lease: %d extensions, gaps %s s", len(extensions), gaps)

    assert run.status == "Completed", run.raw
    assert counts.bodies_started == counts.bodies_ended == 2
    assert counts.duplicate_bodies == counts.interrupted == 0
    assert len(scn.dispatches_by_job()[start["job_id"]]) == 1  # never given up, no copy
    # The first extension is the early ownership check, then one per 30 s interval.
    assert len(extensions) >= 1 + int((LEASE + 15) // EXTEND_INTERVAL)
    assert len(acks) == len(extensions) and all(a.fields.get("new_lease_id") for a in acks)
    assert all(gap <= EXTEND_INTERVAL + 2 for gap in gaps[1:])
    assert counts.replies == counts.replies_acked == counts.dispatches


async def killed_after_the_answer(server: InngestDevServer, tmp: Path) -> None:
    """SIGKILL right after section-3's model answer was stored: the retry, on another
    worker once the lease lapsed, reads it from the cache (0 new model requests),
    because the step's job id is the same in every attempt."""
    async with scenario(server, tmp, "rs-kill") as scn:
        w1 = await scn.ours("w1")
        await scn.ready("w1")
        run_id = await scn.send_report(steps=4, hold_after_answer="section-3")
        answered = await scn.wait_execution(run_id=run_id, step="section-3", phase="answered")
        assert len(scn.stub.requests) == 3
        w2 = await scn.ours("w2")
        await scn.ready("w2")
        w1.crash()  # SIGKILL: no drain, no reply
        assert await w1.wait(10) == -9
        retry = await scn.wait_execution(run_id=run_id, step="section-3", phase="end",
                                         timeout=GIVE_UP)
        run = await scn.wait_run(run_id, timeout=60)
        counts = scn.report("SIGKILL after the answer was stored")
        assert w1.killed_at is not None
        log.info("SIGKILL -> retry of section-3 started after %.1f s",
                 scn.executions(step="section-3", attempt=1)[0]["ts"] - w1.killed_at)

    assert run.status == "Completed", run.raw
    assert retry["pid"] == w2.pid and retry["attempt"] == 1
    # The cache identity: the job id each attempt saw is the same on the real server.
    attempts = scn.executions(step="section-3", phase="start")
    assert [a["attempt"] for a in attempts] == [0, 1]
    assert {a["job_id"] for a in attempts} == {answered["job_id"]}
    assert len({a["request_id"] for a in attempts}) == 2  # a new dispatch, same job
    # Section 3 asked the model once (attempt 0); the retry paid nothing.
    assert sum("Write section 3 " in seen.prompt for seen in scn.stub.requests) == 1
    assert counts.model_requests == 4
    assert counts.interrupted == 1  # the killed attempt, nothing else
    assert counts.bodies_ended == 4 and counts.duplicate_bodies == 0


async def stalled_past_the_lease(server: InngestDevServer, tmp: Path) -> None:
    """Everything w1 sends is held (a partition) while it runs a long step: the gateway
    gives the step up and retries it on w2; w1's copy stops at its own lease deadline,
    before the retry starts, and never replies. The body runs to its end once."""
    async with scenario(server, tmp, "rs-stall") as scn:
        w1 = await scn.ours("w1")
        await scn.ready("w1")
        run_id = await scn.send_report(steps=2, slow={"section-1": 600})
        first = await scn.wait_execution(run_id=run_id, step="section-1", phase="start")
        await scn.ours("w2")
        await scn.ready("w2")
        proxy = scn.proxies["w1"]
        proxy.stall()
        expired = await w1.wait_log("step.lease_expired", timeout=GIVE_UP)
        retry = await scn.wait_execution(run_id=run_id, step="section-1", phase="start",
                                         attempt=1, timeout=GIVE_UP)
        proxy.release()
        run = await scn.wait_run(run_id, timeout=60)
        counts = scn.report("stall longer than the lease")
        log.info("stall: w1's copy stopped %.1f s before the retry started",
                 retry["ts"] - expired["received_at"])

    assert run.status == "Completed", run.raw
    assert retry["pid"] == scn.workers["w2"].pid
    assert expired["received_at"] < retry["ts"]  # never two copies at once
    # The stalled copy was cancelled, never ended, never replied (not even held).
    assert scn.executions(step="section-1", attempt=0, phase="cancelled")
    assert not scn.executions(step="section-1", attempt=0, phase="end")
    assert not scn.frames("WORKER_REPLY", request_id=first["request_id"])
    assert counts.bodies_ended == 2 and counts.duplicate_bodies == 0
    assert {a["job_id"] for a in scn.executions(step="section-1")} == {first["job_id"]}


GRACE = 10.0  # the platform's SIGTERM -> SIGKILL grace period (Kubernetes: 30 s)
DRAIN = 4.0  # connect_worker's drain budget, inside the grace period
FIRST_BACKOFF = 15.0


async def deploy_with_a_grace_period(scn: Scenario, official: bool) -> float:
    """A rolling deploy whose platform SIGKILLs the old worker ``GRACE`` s after SIGTERM,
    during a step longer than that. Returns SIGTERM -> the step's retry starting."""
    start = scn.official if official else scn.ours
    v1 = await start("v1", drain_timeout=DRAIN)
    await scn.ready("v1")
    run_id = await scn.send_report(steps=3, slow={"section-2": 600})
    await scn.wait_execution(run_id=run_id, step="section-2", phase="start")
    await start("v2", app_version="v2")
    await scn.ready("v2")
    v1.send_signal(signal.SIGTERM)
    try:
        await v1.wait(GRACE)
    except TimeoutError:  # wait() SIGKILLs it: what the platform does at the deadline
        pass
    retry = await scn.wait_execution(run_id=run_id, step="section-2", phase="start",
                                     attempt=1, timeout=GIVE_UP)
    run = await scn.wait_run(run_id, timeout=60)
    assert run.status == "Completed", run.raw
    assert v1.signalled_at is not None
    took = retry["ts"] - v1.signalled_at
    scn.report("grace period, official client" if official else "grace period",
               sigterm_to_retry_s=round(took, 1), v1_exit=v1.returncode)
    return took


async def grace_period_side_by_side(server: InngestDevServer, tmp: Path) -> None:
    """The same deploy for connect_worker and the official client: ours hands the step
    back at its drain deadline and the retry starts in seconds; the official client runs
    it until the platform kills it, and the retry waits for the lease to lapse."""
    async with scenario(server, tmp, "rs-grace") as ours, \
            scenario(server, tmp, "rs-grace-sdk") as sdk:
        mine, theirs = await asyncio.gather(deploy_with_a_grace_period(ours, False),
                                            deploy_with_a_grace_period(sdk, True))
        log.info("grace period %g s: SIGTERM -> retry %.1f s (connect_worker) vs %.1f s "
                 "(official client)", GRACE, mine, theirs)
        assert ours.workers["v1"].returncode == 3  # exited in time, step handed back
        assert sdk.workers["v1"].returncode == -9  # still in the step at the deadline
        mine_counts, theirs_counts = ours.counts(), sdk.counts()

    assert mine < FIRST_BACKOFF
    assert theirs > LEASE - EXTEND_INTERVAL  # nothing tells the server before the lease
    # Ours stopped its copy (cancelled, handed back); theirs was killed inside the body.
    assert mine_counts.interrupted == 0 and mine_counts.bodies_cancelled == 1
    assert theirs_counts.interrupted == 1
    assert mine_counts.duplicate_bodies == theirs_counts.duplicate_bodies == 0


async def lease_scenarios(binary: str, tmp: Path, servers: list[InngestDevServer]) -> None:
    server = InngestDevServer(binary, tmp / "inngest-dev-leases.log", retry_interval=1)
    servers.append(server)
    async with server:
        results = await asyncio.gather(
            longer_than_the_lease(server, tmp),
            killed_after_the_answer(server, tmp),
            stalled_past_the_lease(server, tmp),
            grace_period_side_by_side(server, tmp),
            return_exceptions=True)
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise ExceptionGroup("lease scenarios failed", failures)


# Started with the tier (conftest.py), in a thread of its own: see background.py.
BACKGROUND = Background(lease_scenarios)


def test_leases_beyond_two_minutes() -> None:
    BACKGROUND.join(timeout=420)
