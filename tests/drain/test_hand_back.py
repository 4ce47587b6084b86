"""A step abandoned at the drain deadline is handed back, so its retry starts at once.

Production lease timings (2 min lease, 30 s extensions): without the hand-back the
retry would wait for the lease to lapse, minutes after the worker exited.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.lab.fleet import WorkerProcess, read_executions
from connect_worker.protocol import pb

LEASE = 120.0


async def test_abandoned_step_is_retried_at_once_not_after_its_lease(tmp_path: Path) -> None:
    config = DevServerConfig.fast(
        gateway_groups=("gw-a", "gw-b"), lease_duration=LEASE, extend_lease_interval=30.0,
        lease_check_interval=30.0, drain_window=5.0,
    )
    exec_log = str(tmp_path / "executions.jsonl")

    def worker(name: str, step_seconds: float, **kw: object) -> WorkerProcess:
        return WorkerProcess(
            "examples.pipeline", api_url=dev.api_url, instance_id=name,
            env={"STEP_SECONDS": str(step_seconds), "CONNECT_WORKER_EXECUTION_LOG": exec_log},
            **kw,  # type: ignore[arg-type]
        )

    async with DevServer(config) as dev:
        new = worker("new", 0.1, autostart=False)
        async with worker("old", 60.0, drain_timeout=3.0) as old, new:
            old_conn = await old.wait_ready(dev)
            [run_id] = await dev.send_event("report/requested", {"topic": "hand-back"})
            await dev.wait_for(lambda: any(d.acked_at and d.conn_id == old_conn.conn_id
                                           for d in dev.dispatches), 10)
            await new.start()
            new_conn = await new.wait_ready(dev)
            old.send_signal(signal.SIGTERM)
            assert await old.wait(15) == 3
            await dev.wait_for(lambda: any(d.conn_id == new_conn.conn_id and d.acked_at
                                           for d in dev.dispatches), 15)
            retried_at = min(d.sent_at for d in dev.dispatches if d.conn_id == new_conn.conn_id)
            run = await dev.wait_for_run(run_id, timeout=30)
            await new.stop()

    assert run.status is RunStatus.COMPLETED
    assert old.signalled_at is not None
    signal_to_retry = retried_at - old.signalled_at
    logging.getLogger(__name__).info("SIGTERM -> retry dispatched: %.2f s (drain budget 3 s)",
                                     signal_to_retry)
    assert signal_to_retry < LEASE / 4, signal_to_retry  # the lease alone: >= 120 s
    [abandoned] = old.events("drain.step_abandoned")
    assert abandoned["step_id"] == "research"  # the step's own name, not "step"
    assert abandoned["handed_back"] is True and abandoned["state"] == "running"
    [handed] = old.events("drain.handed_back")
    assert handed == {**handed, "steps": 1, "acknowledged": 1}
    # The run's history says who gave the step up, why and after how long.
    errors = [h for h in run.history if h.get("type") == "function_error"]
    assert len(errors) == 1, run.history
    text = json.dumps(errors[0])
    assert "instance old gave up step 'research'" in text and "drain deadline (3 s)" in text
    # Inngest's queue would otherwise wait its backoff (15-45 s) before the retry.
    [hand_back] = [r.response for r in [*dev.replies, *dev.flushes]
                   if r.response.status == pb.SDKResponseStatus.ERROR]
    assert hand_back.retry_after == "1"
    runs_of = [e["step"] for e in read_executions(exec_log)]
    assert runs_of.count("research") == 2 and runs_of.count("draft") == 1
