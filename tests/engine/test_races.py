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

import pytest

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus

from .apps import probe
from .harness import running_worker


@pytest.fixture(autouse=True)
def _clean_probe() -> None:
    probe.reset()


def lease_lost_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [r.__dict__["fields"] for r in caplog.records
            if getattr(r, "event", None) == "step.lease_lost"]


@pytest.mark.parametrize("seconds", [0.6, 3.0])
@pytest.mark.parametrize("disruption", ["gateway_closing", "drop_socket"])
async def test_lost_reroute_race_is_cancelled_early(
    caplog: pytest.LogCaptureFixture, disruption: str, seconds: float
) -> None:
    caplog.set_level(logging.INFO, logger="connect_worker")
    config = DevServerConfig.fast(
        gateway_groups=("gw-a", "gw-b"), lease_duration=20.0, extend_lease_interval=5.0,
        lease_check_interval=5.0,
    )
    async with DevServer(config) as dev, \
            running_worker(dev, instance_id="a"), running_worker(dev, instance_id="b"):
        conn_a = await dev.wait_for_connection(lambda c: c.instance_id == "a")
        conn_b = await dev.wait_for_connection(lambda c: c.instance_id == "b")
        # First forward to A; once A's connection has left READY, to B (not A's new one).
        dev.faults.route = lambda ids: conn_a.conn_id if conn_a.conn_id in ids else conn_b.conn_id
        dev.faults.delay_request_ack = 0.5  # A's ACK is still "on the wire" ...
        [run_id] = await dev.send_event("t/slow", {"seconds": seconds})
        await probe.wait_started("slow")
        # ... when A's connection stops being READY.
        closing = asyncio.create_task(getattr(dev, disruption)(conn_a.conn_id))
        dev.faults.delay_request_ack = 0.0
        run = await dev.wait_for_run(run_id, timeout=20)
        await closing

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
