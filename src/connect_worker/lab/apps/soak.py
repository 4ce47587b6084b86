"""The soak's load: reports of a few steps whose lengths the soak draws at random.

An event ``soak/report`` with ``{"steps": [seconds, ...]}`` starts one run of
``soak-report``: step ``part-i`` sleeps ``steps[i]`` seconds (cancellably, like an
awaited model call). Each step body records its start and, if it gets there, its end
in the execution log together with its request id, so the soak can tell a copy that
was cancelled (a lost re-route race, a SIGKILL) from one that ran to the end.
"""

from __future__ import annotations

import asyncio

import inngest

import connect_worker
from connect_worker.lab.apps.execution_log import record

EVENT = "soak/report"
client = inngest.Inngest(app_id="soak", is_production=False)


# Generous retries: a step may be handed back by several drains and outages in a row
# during a soak, and a run failing for lack of attempts would hide what we measure.
@client.create_function(fn_id="soak-report", trigger=inngest.TriggerEvent(event=EVENT),
                        retries=10)
async def soak_report(ctx: inngest.Context) -> list[int]:
    steps = ctx.event.data.get("steps")
    lengths = [float(s) for s in steps if isinstance(s, int | float)] if isinstance(
        steps, list) else []

    async def part(index: int) -> int:
        request = connect_worker.current_request()
        request_id = request.request_id if request else None
        record(f"part-{index}", ctx.run_id, request_id=request_id, phase="start")
        await asyncio.sleep(lengths[index])
        record(f"part-{index}", ctx.run_id, request_id=request_id, phase="end")
        return index

    return [await ctx.step.run(f"part-{i}", part, i) for i in range(len(lengths))]


functions = [soak_report]
