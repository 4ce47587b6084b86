"""A step whose lease lapses unconfirmed stops on the worker's own clock
(engine/lease_clock.py), before the gateway can retry it elsewhere."""

from __future__ import annotations

import time
from pathlib import Path

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.devserver.ulid import new_ulid
from connect_worker.engine.lease_clock import lease_seconds, ulid_seconds
from connect_worker.lab.fleet import WorkerProcess, read_executions
from connect_worker.lab.wsproxy import WsProxy


def test_a_lease_lasts_four_extend_intervals_or_what_its_id_says_if_longer() -> None:
    now = time.time()
    decoded = ulid_seconds(new_ulid(now + 90))
    assert decoded is not None and abs(decoded - (now + 90)) < 0.002
    assert ulid_seconds("not-a-ulid") is None
    assert lease_seconds("not-a-ulid", 30.0) == 120.0
    # A lease id expiring in 8 s with 1 s extensions (a gateway whose lease is 8
    # intervals): the id wins. One expiring sooner than 4 intervals (a fast local
    # clock): the rule wins, so the copy never stops before its lease ended.
    assert 7.9 < lease_seconds(new_ulid(now + 8), 1.0) <= 8.0
    assert lease_seconds(new_ulid(now + 1), 1.0) == 4.0


async def test_a_stalled_copy_stops_at_its_lease_deadline_and_never_replies(
        tmp_path: Path) -> None:
    exec_log = str(tmp_path / "executions.jsonl")
    config = DevServerConfig.fast(lease_duration=4.0, extend_lease_interval=1.0,
                                  heartbeat_interval=1.0)
    async with DevServer(config) as dev, WsProxy(dev.gateway_url) as proxy:
        def worker(name: str, seconds: float) -> WorkerProcess:
            return WorkerProcess(
                "examples.pipeline", api_url=dev.api_url, instance_id=name,
                env={"STEP_SECONDS": str(seconds), "CONNECT_WORKER_EXECUTION_LOG": exec_log,
                     "INNGEST_CONNECT_GATEWAY_URL": proxy.url if name == "w1" else ""})

        async with worker("w1", 60.0) as w1:
            await w1.wait_ready(dev)
            [run_id] = await dev.send_event("report/requested", {})
            await dev.wait_for(lambda: bool(read_executions(exec_log)), 15)
            async with worker("w2", 0.1) as w2:
                await w2.wait_ready(dev)
                proxy.stall()  # everything w1 sends is held: its extensions too
                expired = await w1.wait_log("step.lease_expired", timeout=30)
                run = await dev.wait_for_run(run_id, timeout=60)
                proxy.release()
                await w2.stop()
            await w1.stop()

    assert run.status is RunStatus.COMPLETED
    assert expired["step_id"] == "research"
    research = [e for e in read_executions(exec_log) if e["step"] == "research"]
    assert [e["pid"] for e in research] == [w1.pid, w2.pid]
    assert expired["received_at"] < research[1]["ts"]  # stopped before the retry began
    # The stalled copy sent no reply, not even one the stall held.
    assert proxy.select("WORKER_REPLY") == []
