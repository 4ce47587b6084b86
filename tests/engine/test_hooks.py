"""The engine's two observation/measurement hooks the lab uses instead of patching it:
the ``heartbeat.sent`` debug event and ``Worker(user_loop=...)`` (``InlineUserLoop``)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import inngest

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.engine.userloop import InlineUserLoop

from .harness import running_worker

client = inngest.Inngest(app_id="hooks", is_production=False)
threads: list[int] = []


@client.create_function(fn_id="where", trigger=inngest.TriggerEvent(event="t/where"))
async def where(ctx: inngest.Context) -> str:
    async def body() -> str:
        threads.append(threading.get_ident())
        return "here"

    return await ctx.step.run("body", body)


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
            async with running_worker(dev, serve=[(client, [where])]):
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
        async with running_worker(dev, serve=[(client, [where])],
                                  user_loop=InlineUserLoop()):
            [run_id] = await dev.send_event("t/where", {})
            run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED and run.output == "here"
    assert threads == [threading.get_ident()]


async def test_default_user_loop_runs_user_code_on_its_own_thread() -> None:
    threads.clear()
    async with DevServer(DevServerConfig.fast()) as dev:
        async with running_worker(dev, serve=[(client, [where])]):
            [run_id] = await dev.send_event("t/where", {})
            run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert len(threads) == 1 and threads[0] != threading.get_ident()
