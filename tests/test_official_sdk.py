"""THE contract test: the official Python SDK's own Connect client (inngest 0.5.19)
runs a 3-step function against our devserver, so the devserver speaks the real
protocol. Each step body must run exactly once."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import inngest
from inngest.connect import connect

from connect_worker.devserver import ConnStatus, DevServer, DevServerConfig, RunStatus


async def test_official_sdk_completes_three_step_run() -> None:
    cfg = DevServerConfig.fast(interval_format="seconds")
    async with DevServer(cfg) as dev:
        client = inngest.Inngest(
            app_id="contract-app", is_production=False, api_base_url=dev.api_url,
            event_api_base_url=dev.api_url,
        )
        executions: Counter[str] = Counter()

        @client.create_function(
            fn_id="three-steps", trigger=inngest.TriggerEvent(event="contract/go")
        )
        async def three_steps(ctx: inngest.Context) -> dict[str, object]:
            async def step(name: str) -> str:
                executions[name] += 1
                return f"{name}-ok"

            a = await ctx.step.run("a", step, "a")
            b = await ctx.step.run("b", step, "b")
            c = await ctx.step.run("c", step, "c")
            return {"a": a, "b": b, "c": c, "n": ctx.event.data["n"]}

        conn = connect([(client, [three_steps])], instance_id="contract-1", shutdown_signals=[])
        task = asyncio.create_task(conn.start())
        try:
            info = await dev.wait_for_connection(timeout=15)
            assert info.instance_id == "contract-1"
            assert info.connect_request.sdk_language == "py"
            assert "contract-app-three-steps" in info.functions["contract-app"]

            run_ids = await dev.send_event("contract/go", {"n": 7})
            assert len(run_ids) == 1
            run = await dev.wait_for_run(run_ids[0], timeout=30)
            assert run.status is RunStatus.COMPLETED, dev.dump()
            assert run.output == {"a": "a-ok", "b": "b-ok", "c": "c-ok", "n": 7}
            assert executions == {"a": 1, "b": 1, "c": 1}
            # 3 StepRun discoveries + the final DONE call, each dispatched once.
            assert len(dev.dispatches) == 4
            assert all(n == 1 for n in dev.dispatch_counts_by_job().values())
            assert all(n == 1 for n in dev.step_executions().values())
            await dev.wait_for(lambda: all(r.acked for r in dev.replies), timeout=5)

            await conn.close(wait=True)
            await asyncio.wait_for(task, 15)
            await dev.wait_for(lambda: dev.connections[0].status is ConnStatus.DISCONNECTED)
            assert dev.connections[0].close_code == 1000
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
