"""A copy of a step that lost a gateway re-route race stops a fraction of a second in.

The race (docs/protocol.md: un-ACKed forwards fail the moment a connection leaves
READY): the gateway sends GATEWAY_CLOSING (or the socket drops) while worker A's ACK is
on the wire, re-routes the request to worker B with the same lease id, and ignores A's
late ACK. Both copies run. Extensions here come every 5 s and the step is shorter, so
only the early ownership check (an extension 0.2 s after the ACK, at once on
GATEWAY_CLOSING and on A's new session) can tell the copies apart before both run to
the end. The soak found a 1 s check too late for sub-second steps: 0.6 s is here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from connect_worker.devserver import DevServer, DevServerConfig, Run, RunStatus
from connect_worker.engine import confirm as confirm_registry
from connect_worker.engine.confirm import confirm_before_run
from connect_worker.protocol import pb

from .apps import probe, slow
from .harness import running_worker


@pytest.fixture(autouse=True)
def _clean_probe() -> Iterator[None]:
    probe.reset()
    yield
    confirm_registry.clear()


def lease_lost_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.__dict__["fields"] for r in caplog.records
            if getattr(r, "event", None) == "step.lease_lost"]


# Extensions every 5 s: only the early ownership check can stop a copy in time.
RACE_CONFIG = DevServerConfig.fast(
    gateway_groups=("gw-a", "gw-b"), lease_duration=20.0, extend_lease_interval=5.0,
    lease_check_interval=5.0,
)


async def race_a_reroute(dev: DevServer, disruption: str,
                         seconds: float) -> tuple[str, Run, str]:
    """Run one ``slow`` step of ``seconds`` into the re-route race between workers "a"
    and "b": (the run id, the run once ended, b's connection id)."""
    conn_a = await dev.wait_for_connection(lambda c: c.instance_id == "a")
    conn_b = await dev.wait_for_connection(lambda c: c.instance_id == "b")
    # First forward to A; once A's connection has left READY, to B (not A's new one).
    dev.faults.route = lambda ids: conn_a.conn_id if conn_a.conn_id in ids else conn_b.conn_id
    dev.faults.delay_request_ack = 0.5  # A's ACK is still "on the wire" ...
    [run_id] = await dev.send_event("t/slow", {"seconds": seconds})
    await probe.wait_started("slow")
    # ... when A's connection stops being READY: the gateway re-routes to B.
    closing = asyncio.create_task(getattr(dev, disruption)(conn_a.conn_id))
    dev.faults.delay_request_ack = 0.0
    run = await dev.wait_for_run(run_id, timeout=20)
    await closing
    return run_id, run, conn_b.conn_id


@pytest.mark.parametrize("seconds", [0.6, 3.0])
@pytest.mark.parametrize("disruption", ["gateway_closing", "drop_socket"])
async def test_lost_reroute_race_is_cancelled_early(
    caplog: pytest.LogCaptureFixture, disruption: str, seconds: float
) -> None:
    caplog.set_level(logging.INFO, logger="connect_worker")
    async with DevServer(RACE_CONFIG) as dev, \
            running_worker(dev, instance_id="a"), running_worker(dev, instance_id="b"):
        run_id, run, _ = await race_a_reroute(dev, disruption, seconds)

    assert run.status is RunStatus.COMPLETED
    assert [d.outcome for d in dev.dispatches][:2] == ["forward_failed", "replied"], dev.dispatches
    assert probe.counts["slow"] == 2, "the race did not happen: both copies must have started"
    assert probe.finished["slow"] == 1, "both copies ran to the end"
    [lost] = lease_lost_records(caplog)
    assert lost["run_id"] == run_id and lost["step_id"] == "nap"
    logging.getLogger(__name__).info("losing copy ran %s s of a %s s step", lost["ran_for"],
                                     seconds)


async def test_leases_survive_a_reconnect_that_outlasts_an_extend_tick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every lease is extended as soon as a new socket is up, not at the next tick.

    Lease 4 s, extensions every 3 s, a 6 s step. The socket drops 1 s in and the
    gateway takes 2 s to answer the reconnect's start call, so the extend tick at about
    3 s finds no socket; the next would come 3 s after the reconnect, past the lease.
    (The soak saw four steps run twice this way across a gateway restart.)
    """
    caplog.set_level(logging.INFO, logger="connect_worker")
    config = DevServerConfig.fast(lease_duration=4.0, extend_lease_interval=3.0,
                                  lease_check_interval=0.2, lease_grace=0.2)
    async with DevServer(config) as dev, running_worker(dev, instance_id="a"):
        conn = await dev.wait_for_connection()
        [run_id] = await dev.send_event("t/slow", {"seconds": 6.0})
        await probe.wait_started("slow")
        await asyncio.sleep(1.0)  # the fault's timing, not a synchronisation
        dev.faults.start_delay = 2.0
        await dev.drop_socket(conn.conn_id)
        await dev.wait_for(lambda: len(dev.start_calls) >= 2, 10)
        dev.faults.start_delay = 0.0
        run = await dev.wait_for_run(run_id, timeout=20)

    assert run.status is RunStatus.COMPLETED
    assert probe.counts["slow"] == 1, "the lease lapsed during the reconnect: the step ran twice"
    assert not lease_lost_records(caplog)


async def test_reconnect_backoff_stays_inside_the_leases_of_steps_in_flight(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With steps in flight, retries come at least every quarter extend interval.

    Eight refused start calls after a drop would back off ~0.25+0.5+...+30 s: far past
    the 4 s lease of the step in flight, which only a socket can extend.
    """
    caplog.set_level(logging.INFO, logger="connect_worker")
    async with DevServer(DevServerConfig.fast(lease_check_interval=0.2, lease_grace=0.2)) as dev, \
            running_worker(dev, instance_id="a", reconnect_min_backoff=0.25,
                           reconnect_max_backoff=30.0):
        conn = await dev.wait_for_connection()
        [run_id] = await dev.send_event("t/slow", {"seconds": 5.0})
        await probe.wait_started("slow")
        dev.faults.start_failures = [503] * 8
        await dev.drop_socket(conn.conn_id)
        run = await dev.wait_for_run(run_id, timeout=30)

    assert run.status is RunStatus.COMPLETED
    assert len(dev.start_calls) >= 10  # the first, eight refused, the one that worked
    assert probe.counts["slow"] == 1, "a lease lapsed during the backoff: the step ran twice"
    assert not lease_lost_records(caplog)


async def test_a_request_forwarded_again_after_delivery_is_answered_not_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway forwards a request again after the worker delivered its reply (it
    never counted the worker's ACK, and the worker came back routable): the worker
    answers with the reply it kept and does not run the step body again."""
    caplog.set_level(logging.INFO, logger="connect_worker")
    async with DevServer(DevServerConfig.fast()) as dev, running_worker(dev, instance_id="a"):
        conn = await dev.wait_for_connection()
        [run_id] = await dev.send_event("t/slow", {"seconds": 0.05})
        run = await dev.wait_for_run(run_id, timeout=10)
        step = next(d for d in dev.dispatches if d.run_id == run_id)
        replies_before = [r for r in dev.replies if r.request_id == step.request_id]
        again = pb.GatewayExecutorRequestData(
            request_id=step.request_id, run_id=run_id, app_name="engine",
            function_slug=step.function_slug, step_id=step.step_id, job_id=step.job_id,
            lease_id="01J0000000000000000000000", request_payload=b"{}",
        )
        assert await dev.send_message(conn.conn_id, pb.GatewayMessageType.GATEWAY_EXECUTOR_REQUEST,
                                      again.SerializeToString())
        await dev.wait_for(lambda: len([r for r in dev.replies
                                        if r.request_id == step.request_id])
                           > len(replies_before), 5)

    assert run.status is RunStatus.COMPLETED
    assert probe.counts["slow"] == 1
    assert [r.__dict__["fields"]["request_id"] for r in caplog.records
            if getattr(r, "event", None) == "request.redelivered"] == [step.request_id]


async def test_pause_waits_for_the_newest_ack_to_settle() -> None:
    """The gateway reads our ACK and our PAUSE on different goroutines (spec §5.2): a PAUSE
    written right after an ACK can be processed first, and the gateway then fails the
    forward and re-routes it while we run it. The drain therefore waits until the newest
    ACK is PAUSE_SETTLE old. Here the gateway processes ACKs 50 ms late and the drain
    starts the moment the step's body starts (just after its ACK was written): the ACK
    must still count. Without the settle, the PAUSE wins (outcome forward_failed)."""
    async with DevServer(DevServerConfig.fast()) as dev:
        async with running_worker(dev) as worker:
            dev.faults.delay_request_ack = 0.05
            await dev.send_event("t/gated", {})
            await probe.wait_started("gated")
            worker.request_shutdown()
            await dev.wait_for(lambda: any(e.kind == "WORKER_PAUSE" for e in dev.timeline), 10)
            probe.gates["gated"].set()
            [dispatch] = dev.dispatches
            await dev.wait_for(lambda: dispatch.outcome is not None, 10)
    assert dispatch.outcome in ("acked", "replied")  # not forward_failed
    assert [d.conn_id for d in dev.dispatches if d.request_id == dispatch.request_id] == [
        dispatch.conn_id]  # never re-routed
    assert probe.counts == {"gated": 1}


@pytest.mark.parametrize("mode", ["early_check", "confirm_before_run", "per_function"])
@pytest.mark.parametrize("disruption", ["gateway_closing", "drop_socket"])
async def test_reroute_race_on_a_step_shorter_than_the_early_check(
    caplog: pytest.LogCaptureFixture, disruption: str, mode: str
) -> None:
    """The soak's 3 unexplained duplicates: the same race on an instant step. Both copies
    hold the same lease id (the gateway re-routes the same request, lease id included)
    and the early check 0.2 s in comes after the body's end: the body runs twice. With
    confirm-before-run each copy extends right after its ACK and only the one granted
    the lease (the first to extend) runs its body: once."""
    caplog.set_level(logging.INFO, logger="connect_worker")
    confirm = mode != "early_check"
    everywhere = mode == "confirm_before_run"  # CONNECT_WORKER_CONFIRM_BEFORE_RUN=1
    if mode == "per_function":
        confirm_before_run(slow)  # the worker-wide setting stays off
    async with DevServer(RACE_CONFIG) as dev, \
            running_worker(dev, instance_id="a", confirm_before_run=everywhere), \
            running_worker(dev, instance_id="b", confirm_before_run=everywhere):
        run_id, run, conn_b = await race_a_reroute(dev, disruption, 0)
    # B ACKed before the run could complete; leaving the block drained both workers, so
    # B's copy has run to its end or been stopped.

    assert run.status is RunStatus.COMPLETED
    first = dev.dispatches[0].request_id  # the step's (the run's last request follows)
    race = [d for d in dev.dispatches if d.request_id == first]
    assert race[0].outcome == "forward_failed" and len(race) == 2, race
    assert race[1].acked_at and race[1].conn_id == conn_b, race
    if confirm:
        assert probe.counts["slow"] == 1 and probe.finished["slow"] == 1
        [lost] = lease_lost_records(caplog)  # B, NACKed before its body started
        assert lost["run_id"] == run_id
    else:
        assert probe.counts["slow"] == 2 and probe.finished["slow"] == 2, \
            "the race the soak found: both copies ran the body to its end"
