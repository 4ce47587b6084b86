"""From ``drain.end`` to the process's exit: nothing may hold a drained worker.

Real worker subprocesses and SIGTERM. What used to hold the exit was user code the drain
had already given up on: Python joins thread-pool threads at exit, so a handed-back
``def`` step kept the process alive until its body returned, and a user loop blocked by
an ``async`` step held it for the user loop's join timeout. The worker now says at exit
(``worker.exit``) what user code was still running, and does not wait for it.

The tests assert on that cause (what ``worker.exit`` reports, the exit code, the process
gone while the step body still sleeps); the drain.end -> exit time is logged as a figure
(pytest tests/drain/test_exit.py -o log_cli=true), not asserted. A loop blocked by an
``async`` step holds the exit for at most ``USER_LOOP_STOP_TIMEOUT`` (engine/executor.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.lab.fleet import WorkerProcess

log = logging.getLogger(__name__)
TARGET = "examples.pipeline"


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with DevServer(DevServerConfig.fast()) as server:
        yield server


def _ts(record: dict[str, object]) -> float:
    return datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00")).timestamp()


def _figure(worker: WorkerProcess, what: str) -> float:
    assert worker.exited_at is not None
    took = worker.exited_at - _ts(worker.events("drain.end")[0])
    log.info("%s: drain.end -> exit %.3f s", what, took)
    return took


async def test_an_idle_worker_after_a_fault_and_a_flush_leaves_nothing_running(
        dev: DevServer) -> None:
    async with WorkerProcess(TARGET, api_url=dev.api_url, instance_id="idle",
                             env={"STEP_SECONDS": "0.05"}) as worker:
        first = await worker.wait_ready(dev)
        # A withheld ACK: the reply goes through /v0/connect/flush.
        dev.faults.withhold_reply_ack = True
        (run_id,) = await dev.send_event("report/requested", {"topic": "exit"})
        assert (await dev.wait_for_run(run_id, timeout=30)).status is RunStatus.COMPLETED
        dev.faults.withhold_reply_ack = False
        await worker.wait_log("reply.flushed", 20)
        # A network cut: the worker reconnects.
        await dev.gateway.drop_socket(first.conn_id)
        await dev.wait_for_connection(
            lambda c: c.instance_id == "idle" and c.conn_id != first.conn_id, 15)
        assert await worker.stop() == 0
    (exit_event,) = worker.events("worker.exit")
    assert exit_event["user_code_running"] == 0 and exit_event["lingering_threads"] == []
    _figure(worker, "idle after withhold-ack + flush + drop")


async def test_a_def_step_the_drain_gave_up_on_does_not_hold_the_exit(
        dev: DevServer) -> None:
    async with WorkerProcess(TARGET, api_url=dev.api_url, instance_id="stuck",
                             drain_timeout=1.0) as worker:
        await worker.wait_ready(dev)
        await dev.send_event("sync/run", {"seconds": 60})
        await dev.wait_for(lambda: any(d.acked_at for d in dev.dispatches), 10)
        worker.send_signal()
        # The body sleeps 60 s in a thread Python would join at exit: before, the
        # process lived until it returned (this bound is only the test's safety net).
        assert await worker.wait(timeout=20) == 3
    (abandoned,) = worker.events("drain.step_abandoned")
    assert abandoned["handed_back"] is True
    (exit_event,) = worker.events("worker.exit")
    assert exit_event["user_code_running"] == 1  # left running, not waited for
    _figure(worker, "a handed-back def step still sleeping")
