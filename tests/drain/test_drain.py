"""Drain with real subprocesses and real signals against the local gateway.

Workers run ``python -m connect_worker run examples.pipeline``; each step body
appends one line to an execution log, so "exactly once" is counted in the body
itself, across processes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.devserver.testing import realistic_races
from connect_worker.lab.fleet import WorkerProcess, read_executions

TARGET = "examples.pipeline"


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    config = DevServerConfig.fast(
        gateway_groups=("gw-a", "gw-b"), lease_duration=2.0, extend_lease_interval=0.4,
        lease_check_interval=0.2, lease_grace=0.2, drain_window=5.0,
    )
    async with DevServer(config) as server:
        # The real gateway's reply/close race: a reply read just before its socket
        # closes is lost, so a worker that exits before its last ACK loses it.
        yield realistic_races(server)


@pytest.fixture
def exec_log(tmp_path: Path) -> str:
    return str(tmp_path / "executions.jsonl")


def worker(dev: DevServer, name: str, exec_log: str, *, step_seconds: float = 1.0,
           drain_timeout: float = 20.0, autostart: bool = True, **env: str) -> WorkerProcess:
    return WorkerProcess(
        TARGET, api_url=dev.api_url, instance_id=name, drain_timeout=drain_timeout,
        autostart=autostart,
        env={"STEP_SECONDS": str(step_seconds), "CONNECT_WORKER_EXECUTION_LOG": exec_log, **env},
    )


def executions(exec_log: str) -> Counter[tuple[str, str]]:
    return Counter((e["run_id"], e["step"]) for e in read_executions(exec_log))


def conns_of(dev: DevServer, instance_id: str) -> list:  # type: ignore[type-arg]
    return [c for c in dev.connections if c.instance_id == instance_id]


async def first_step_acked_on(dev: DevServer, conn_id: str) -> None:
    await dev.wait_for(lambda: any(d.acked_at and d.conn_id == conn_id for d in dev.dispatches),
                       10)


async def test_sigterm_mid_step_finishes_on_old_worker_rest_on_new(
    dev: DevServer, exec_log: str, tmp_path: Path
) -> None:
    # The first step holds until the gate opens: after the replacement is READY and the
    # old worker has paused (no bet on how fast a subprocess starts under load).
    gate = tmp_path / "gate"
    new = worker(dev, "new", exec_log, autostart=False, STEP_GATE=str(gate))
    async with worker(dev, "old", exec_log, STEP_GATE=str(gate)) as old, new:
        old_conn = await old.wait_ready(dev)
        [run_id] = await dev.send_event("report/requested", {"topic": "deploys"})
        await first_step_acked_on(dev, old_conn.conn_id)
        await new.start()  # the replacement comes up while the old one works
        await new.wait_ready(dev)
        old.send_signal(signal.SIGTERM)
        await old.wait_log("drain.pause")
        gate.touch()
        assert await old.wait(30) == 0
        run = await dev.wait_for_run(run_id, timeout=30)
        await new.stop()
    assert run.status is RunStatus.COMPLETED
    counts = executions(exec_log)
    assert set(counts.values()) == {1} and len(counts) == 3
    by_pid = {e["step"]: e["pid"] for e in read_executions(exec_log)}
    assert by_pid["research"] == old.pid
    assert by_pid["draft"] == new.pid and by_pid["review"] == new.pid
    pause_at = next(e.ts for e in dev.timeline
                    if e.kind == "WORKER_PAUSE" and e.conn_id == old_conn.conn_id)
    assert not [d for d in dev.dispatches
                if d.conn_id == old_conn.conn_id and d.sent_at > pause_at]
    assert (old_conn.close_code, old_conn.close_reason) == (1000, "WORKER_SHUTDOWN")
    assert old.events("drain.end")[0]["abandoned"] == 0


async def test_sigterm_with_withheld_reply_ack_flushes_before_exit(
    dev: DevServer, exec_log: str
) -> None:
    dev.faults.withhold_reply_ack = True
    async with worker(dev, "old", exec_log) as old:
        old_conn = await old.wait_ready(dev)
        [run_id] = await dev.send_event("report/requested", {})
        await first_step_acked_on(dev, old_conn.conn_id)
        old.send_signal(signal.SIGTERM)
        assert await old.wait(30) == 0
    [step_request] = [d.request_id for d in dev.dispatches if d.conn_id == old_conn.conn_id]
    flushed = [f for f in dev.flushes if f.request_id == step_request]
    assert flushed and flushed[0].ts <= (old.exited_at or time.time())
    assert old.events("reply.flushed")
    # The run goes on elsewhere without repeating the flushed step.
    dev.faults.withhold_reply_ack = False
    async with worker(dev, "new", exec_log) as new:
        await new.wait_ready(dev)
        run = await dev.wait_for_run(run_id, timeout=30)
        await new.stop()
    assert run.status is RunStatus.COMPLETED
    assert set(executions(exec_log).values()) == {1}


@pytest.mark.parametrize("disruption", ["gateway_closing", "socket_drop"])
async def test_disruption_during_drain_keeps_new_connection_paused(
    dev: DevServer, exec_log: str, disruption: str, tmp_path: Path
) -> None:
    """The old worker's socket is replaced (GATEWAY_CLOSING) or lost (a drop, with the
    gateway down and the flush failing) while its step runs: the step's reply goes out on
    the draining worker's next session, which is PAUSEd, never READY, never routed to."""
    gate = tmp_path / "gate"
    new = worker(dev, "new", exec_log, autostart=False)
    async with worker(dev, "old", exec_log, STEP_GATE=str(gate)) as old, new:
        old_conn = await old.wait_ready(dev)
        [run_id] = await dev.send_event("report/requested", {})
        await first_step_acked_on(dev, old_conn.conn_id)
        await new.start()
        await new.wait_ready(dev)
        old.send_signal(signal.SIGTERM)
        await dev.wait_for(lambda: old_conn.paused, 10)
        if disruption == "gateway_closing":
            closing = asyncio.create_task(dev.gateway_closing(old_conn.conn_id))
            await old.wait_log("drain.pause_on_reconnect")
        else:
            # No socket at all when the step ends, and the flush failing: the reply can
            # only get out on the next session, once the gateway is back.
            dev.faults.gateway_down_until = time.monotonic() + 60
            dev.faults.flush_failing_until = time.monotonic() + 60
            await dev.drop_socket(old_conn.conn_id)
            await old.wait_log("connection.retry")
        gate.touch()
        if disruption == "socket_drop":
            await old.wait_log("reply.flush_failed")
            dev.faults.gateway_down_until = 0.0
        assert await old.wait(30) == 0
        if disruption == "gateway_closing":
            await asyncio.wait_for(closing, 10)
        run = await dev.wait_for_run(run_id, timeout=30)
        await new.stop()
    assert run.status is RunStatus.COMPLETED
    counts = executions(exec_log)
    assert set(counts.values()) == {1} and len(counts) == 3
    [step_request] = [d.request_id for d in dev.dispatches if d.conn_id == old_conn.conn_id]
    later = [c for c in conns_of(dev, "old") if c.conn_id != old_conn.conn_id]
    assert later, "the draining worker never reconnected: nothing was checked"
    later_ids = {c.conn_id for c in later}
    # The reply went out on a later (paused) session of the draining worker.
    assert [r for r in dev.replies if r.request_id == step_request and r.conn_id in later_ids]
    for conn in later:  # any reconnect of the draining worker never became routable
        assert conn.paused
        readies = [e for e in dev.timeline if e.kind == "WORKER_READY"]
        assert not [e for e in readies if e.conn_id == conn.conn_id]
        assert not [d for d in dev.dispatches if d.conn_id == conn.conn_id]


async def test_step_longer_than_drain_budget_is_abandoned_then_retried_elsewhere(
    dev: DevServer, exec_log: str
) -> None:
    new = worker(dev, "new", exec_log, step_seconds=0.2, autostart=False)
    # A step far longer than anything the drain may wait for: the old worker exiting at
    # all proves it gave up at the deadline (no bound on the clock to be lucky with).
    async with worker(dev, "old", exec_log, step_seconds=60.0, drain_timeout=1.0) as old, new:
        old_conn = await old.wait_ready(dev)
        [run_id] = await dev.send_event("report/requested", {})
        await first_step_acked_on(dev, old_conn.conn_id)
        await new.start()
        await new.wait_ready(dev)
        old.send_signal(signal.SIGTERM)
        assert await old.wait(30) == 3
        run = await dev.wait_for_run(run_id, timeout=30)
        await new.stop()
    assert run.status is RunStatus.COMPLETED
    [abandoned] = old.events("drain.step_abandoned")
    assert abandoned["function"] == "pipeline-report"
    assert abandoned["run_id"] == run_id
    assert abandoned["job_id"] and abandoned["step_id"]
    assert 0 < abandoned["running_for"] < 60.0
    assert old.events("drain.end")[0]["abandoned"] == 1
    counts = executions(exec_log)
    assert counts[(run_id, "research")] == 2  # once abandoned, once completed
    assert counts[(run_id, "draft")] == 1 and counts[(run_id, "review")] == 1


async def test_second_signal_ends_the_drain_at_once(dev: DevServer, exec_log: str) -> None:
    async with worker(dev, "old", exec_log, step_seconds=30.0, drain_timeout=60.0) as old:
        old_conn = await old.wait_ready(dev)
        await dev.send_event("report/requested", {})
        await first_step_acked_on(dev, old_conn.conn_id)
        old.send_signal(signal.SIGTERM)
        await old.wait_log("drain.start")
        old.send_signal(signal.SIGINT)
        assert await old.wait(10) == 3
    [abandoned] = old.events("drain.step_abandoned")
    assert abandoned["step_id"] == "research" and abandoned["handed_back"] is True
    assert (old.exited_at or 0) - (old.signalled_at or 0) < 5.0
    errors = [h for r in dev.runs.values() for h in r.history if h["type"] == "function_error"]
    assert "second stop signal" in json.dumps(errors)


async def test_signal_before_ready_exits_within_a_second(dev: DevServer, exec_log: str) -> None:
    dev.faults.start_delay = 10.0
    async with worker(dev, "early", exec_log) as early:
        await early.wait_log("worker.start")
        early.send_signal(signal.SIGTERM)
        assert await early.wait(10) == 0
    assert (early.exited_at or 0) - (early.signalled_at or 0) < 1.0


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_signal_with_nothing_in_flight_exits_within_a_second(
    dev: DevServer, exec_log: str, event_loop: str
) -> None:
    async with worker(dev, "idle", exec_log, CONNECT_WORKER_EVENT_LOOP=event_loop) as idle:
        conn = await idle.wait_ready(dev)
        # The loop the worker runs on (uvloop by default, the drain the same on either).
        assert (await idle.wait_log("worker.start"))["event_loop"] == event_loop
        idle.send_signal(signal.SIGTERM)
        assert await idle.wait(10) == 0
    assert (idle.exited_at or 0) - (idle.signalled_at or 0) < 1.0
    assert (conn.close_code, conn.close_reason) == (1000, "WORKER_SHUTDOWN")
