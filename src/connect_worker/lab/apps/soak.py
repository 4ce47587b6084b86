"""The soak's load: reports of a few steps whose lengths the soak draws at random.

An event ``soak/report`` with ``{"steps": [seconds, ...]}`` starts one run of
``soak-report``: step ``part-i`` sleeps ``steps[i]`` seconds (cancellably, like an
awaited model call). Each step body records its start and, if it gets there, its end
(or its cancellation) in the execution log together with its request id and a copy id,
so the soak can tell a copy that was cancelled (a lost re-route race, a drain deadline)
or killed (a SIGKILL: no end, no cancellation) from one that ran to the end. The step's
result carries the copy id too: the gateway's own record of a reply says which copy's
result it is, without asking the worker.
"""

from __future__ import annotations

import asyncio
import os
import time

import inngest

import connect_worker
from connect_worker.lab.apps.execution_log import record

EVENT = "soak/report"
# The key of the copy id in a step's result (lab/soak_audit.py finds it in replies).
COPY_KEY = "soak_copy"
client = inngest.Inngest(app_id="soak", is_production=False)


# Generous retries: a step may be handed back by several drains and outages in a row
# during a soak, and a run failing for lack of attempts would hide what we measure.
@client.create_function(fn_id="soak-report", trigger=inngest.TriggerEvent(event=EVENT),
                        retries=10)
async def soak_report(ctx: inngest.Context) -> list[dict[str, object]]:
    steps = ctx.event.data.get("steps")
    lengths = [float(s) for s in steps if isinstance(s, int | float)] if isinstance(
        steps, list) else []

    async def part(index: int) -> dict[str, object]:
        request = connect_worker.current_request()
        request_id = request.request_id if request else None
        copy = copy_id()
        record(f"part-{index}", ctx.run_id, request_id=request_id, phase="start", copy=copy)
        try:
            await asyncio.sleep(lengths[index])
        except asyncio.CancelledError:
            record(f"part-{index}", ctx.run_id, request_id=request_id, phase="cancelled",
                   copy=copy)
            raise
        record(f"part-{index}", ctx.run_id, request_id=request_id, phase="end", copy=copy)
        return {"part": index, COPY_KEY: copy}

    return [await ctx.step.run(f"part-{i}", part, i) for i in range(len(lengths))]


def copy_id() -> str:
    """Which process ran this copy of a step body, and when it started: unique per copy."""
    return f"{os.getpid()}-{time.time_ns()}"


functions = [soak_report]
