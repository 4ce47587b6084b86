"""The engine's two observation/measurement hooks the lab uses instead of patching it:
the ``heartbeat.sent`` debug event and ``Worker(user_loop=...)`` (``InlineUserLoop``)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import inngest

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.engine.userloop import InlineUserLoop, UserLoop
from connect_worker.engine.worker import Worker

from .harness import worker_config

client = inngest.Inngest(app_id="hooks", is_production=False)
threads: list[int] = []


@client.create_function(fn_id="where", trigger=inngest.TriggerEvent(event="t/where"))
async def where(ctx: inngest.Context) -> str:
    async def body() -> str:
        threads.append(threading.get_ident())
        return "here"

    return await ctx.step.run("body", body)


@asynccontextmanager
async def serving(dev: DevServer, user_loop: UserLoop | None = None) -> AsyncIterator[Worker]:
    worker = Worker(worker_config(dev), [(client, [where])], user_loop=user_loop)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.wait_ready(), 10)
        yield worker
    finally:
        worker.request_shutdown()
        await asyncio.wait_for(task, 20)


@contextmanager
def heartbeats_sent() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "heartbeat.sent":
                records.append(record)

    logger = logging.getLogger("connect_worker")
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_every_heartbeat_sent_is_a_debug_event() -> None:
    async with DevServer(DevServerConfig.fast()) as dev:
        with heartbeats_sent() as sent:
            async with serving(dev):
                seen = lambda: [e for e in dev.timeline  # noqa: E731
                                if e.kind == "WORKER_HEARTBEAT" and e.direction == "in"]
                await dev.wait_for(lambda: len(seen()) >= 2, timeout=10)
                conn_ids = {e.conn_id for e in seen()}
            # Each heartbeat the gateway read was announced when it was sent, not after.
            assert len(sent) >= len(seen()) >= 2
            assert {r.fields["conn_id"] for r in sent} == conn_ids  # type: ignore[attr-defined]
            first: Any = seen()[0]
            assert sent[0].created <= first.ts


async def test_inline_user_loop_runs_user_code_on_the_engine_thread() -> None:
    threads.clear()
    async with DevServer(DevServerConfig.fast()) as dev:
        async with serving(dev, InlineUserLoop()):
            [run_id] = await dev.send_event("t/where", {})
            run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED and run.output == "here"
    assert threads == [threading.get_ident()]


async def test_default_user_loop_runs_user_code_on_its_own_thread() -> None:
    threads.clear()
    async with DevServer(DevServerConfig.fast()) as dev:
        async with serving(dev):
            [run_id] = await dev.send_event("t/where", {})
            run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert len(threads) == 1 and threads[0] != threading.get_ident()
