"""The function both workers serve in ``scripts/bench``: one no-op step.

A run is two executor requests: the first runs the step (StepRun), the second
sees it memoized and returns (DONE). Kept in its own module so that both worker
processes import exactly the same, minimal code.
"""

from __future__ import annotations

import inngest

EVENT = "bench/noop"
APP_ID = "bench"
FUNCTION_SLUG = "bench-noop"

client = inngest.Inngest(app_id=APP_ID, is_production=False)


async def _noop() -> str:
    return "ok"


@client.create_function(fn_id="noop", trigger=inngest.TriggerEvent(event=EVENT), retries=0)
async def noop(ctx: inngest.Context) -> str:
    return await ctx.step.run("noop", _noop)


functions = [noop]
