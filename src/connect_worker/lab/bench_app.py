"""The functions both workers serve in ``scripts/bench``.

``noop``: one no-op step. A run is two executor requests: the first runs the step
(StepRun), the second sees it memoized and returns (DONE). ``wait`` (``--scale``): one
step that awaits ``asyncio.sleep(seconds)``, to hold many steps in flight. Kept in its
own module so that both worker processes import exactly the same, minimal code.
"""

from __future__ import annotations

import asyncio

import inngest

EVENT = "bench/noop"
WAIT_EVENT = "bench/wait"
APP_ID = "bench"
FUNCTION_SLUG = "bench-noop"

client = inngest.Inngest(app_id=APP_ID, is_production=False)


async def _noop() -> str:
    return "ok"


@client.create_function(fn_id="noop", trigger=inngest.TriggerEvent(event=EVENT), retries=0)
async def noop(ctx: inngest.Context) -> str:
    return await ctx.step.run("noop", _noop)


@client.create_function(fn_id="wait", trigger=inngest.TriggerEvent(event=WAIT_EVENT), retries=0)
async def wait(ctx: inngest.Context) -> str:
    seconds = float(ctx.event.data.get("seconds", 60.0))  # type: ignore[arg-type]

    async def _wait() -> str:
        await asyncio.sleep(seconds)
        return "ok"

    return await ctx.step.run("wait", _wait)


functions = [noop, wait]
