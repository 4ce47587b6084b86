"""A small multi-step report pipeline for the demo and the tests.

Each step stands in for a slow LLM call (``STEP_SECONDS``, default 0.2 s) and
counts its executions in a file named by ``CONNECT_WORKER_EXECUTION_LOG`` (one
line per step body run, see :mod:`connect_worker.lab.apps.execution_log`), so tests
can prove exactly-once execution across processes.
"""

from __future__ import annotations

import asyncio
import os
import time

import inngest

import connect_worker
from connect_worker.lab.apps.execution_log import record

client = inngest.Inngest(app_id="pipeline", is_production=False)


def _number(value: object, default: float) -> float:
    """A number from event data (JSON), or ``default``."""
    return float(value) if isinstance(value, int | float | str) else default


def _step_seconds() -> float:
    return float(os.environ.get("STEP_SECONDS", "0.2"))


async def _work() -> None:
    """A report step's work: ``STEP_SECONDS``, then, when ``STEP_GATE`` names a file, until
    that file exists (a test opens the gate when the moment it needs has come, instead of
    betting that a step outlasts something it does not control)."""
    await asyncio.sleep(_step_seconds())
    gate = os.environ.get("STEP_GATE")
    # Another process opens it: a stat every 10 ms is the whole cost.
    while gate and not os.path.exists(gate):  # noqa: ASYNC110, ASYNC240
        await asyncio.sleep(0.01)


@client.create_function(fn_id="report", trigger=inngest.TriggerEvent(event="report/requested"))
async def report(ctx: inngest.Context) -> dict[str, object]:
    topic = str(ctx.event.data.get("topic", "widgets"))

    async def research() -> str:
        record("research", ctx.run_id)
        await _work()
        return f"notes on {topic}"

    async def draft() -> str:
        record("draft", ctx.run_id)
        await _work()
        return f"draft about {topic}"

    async def review() -> str:
        record("review", ctx.run_id)
        await _work()
        return "approved"

    notes = await ctx.step.run("research", research)
    text = await ctx.step.run("draft", draft)
    verdict = await ctx.step.run("review", review)
    return {"topic": topic, "notes": notes, "draft": text, "verdict": verdict,
            "drained": connect_worker.draining().is_set()}


@client.create_function(fn_id="blocking", trigger=inngest.TriggerEvent(event="blocking/run"))
async def blocking(ctx: inngest.Context) -> str:
    """An async step that blocks its event loop (the mistake the engine must survive)."""

    async def block() -> str:
        record("block", ctx.run_id)
        time.sleep(_number(ctx.event.data.get("seconds"), 1.0))  # noqa: ASYNC251
        return "done"

    return await ctx.step.run("block", block)


@client.create_function(fn_id="sync-report", trigger=inngest.TriggerEvent(event="sync/run"))
def sync_report(ctx: inngest.ContextSync) -> str:
    """A plain `def` function: runs in a thread pool."""

    def work() -> str:
        record("sync-work", ctx.run_id)
        time.sleep(_number(ctx.event.data.get("seconds"), 0.2))
        request = connect_worker.current_request()
        return request.job_id if request else "no-request"

    return ctx.step.run("work", work)


@client.create_function(fn_id="long-report", trigger=inngest.TriggerEvent(event="report/long"))
async def long_report(ctx: inngest.Context) -> list[str]:
    """A report of ``sections`` LLM-like steps (default 7), as the team's real reports are."""
    sections = int(_number(ctx.event.data.get("sections"), 7))

    async def write(index: int) -> str:
        record(f"section-{index}", ctx.run_id)
        await asyncio.sleep(_step_seconds())
        return f"section {index}"

    return [await ctx.step.run(f"section-{i}", write, i) for i in range(sections)]


functions = [report, long_report, blocking, sync_report]
