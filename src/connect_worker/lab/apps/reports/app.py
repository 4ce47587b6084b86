"""The Inngest app: three report functions, each a pipeline of LLM steps.

Run it on connect_worker (``connect-worker run connect_worker.lab.apps.reports``) with
real keys (``OPENAI_API_KEY`` or ``ANTHROPIC_API_KEY``) or offline with
``CONNECT_WORKER_LLM_PROVIDER=simulated`` (``CONNECT_WORKER_LLM_SIM_SPEEDUP=50`` for a
fast demo). Each step body run appends one line to the file named by
``CONNECT_WORKER_EXECUTION_LOG`` when it is set (see
:mod:`connect_worker.lab.apps.execution_log`), so the demo and tests can prove that no
step ran twice.
"""

from __future__ import annotations

from typing import Any

import inngest

from connect_worker.lab.apps.execution_log import record
from connect_worker.llm import LLM

from .pipelines import PIPELINES, Pipeline, Step, Writer, run_pipeline

client = inngest.Inngest(app_id="reports")
# One LLM per process: its metrics go on the registry the worker serves on /metrics.
llm = LLM.from_env()


def _function(pipeline: Pipeline) -> inngest.Function[Any]:
    @client.create_function(fn_id=pipeline.fn_id,
                            trigger=inngest.TriggerEvent(event=pipeline.event), retries=4)
    async def run(ctx: inngest.Context) -> Any:
        writer = Writer(llm)  # inside the worker the step's job id keys the cache

        async def step_run(step_id: str, step: Step, *args: Any) -> Any:
            async def body(*step_args: Any) -> Any:
                record(step_id, ctx.run_id)
                return await step(*step_args)

            return await ctx.step.run(step_id, body, *args)

        return await run_pipeline(pipeline, dict(ctx.event.data), step_run,
                                  lambda _step_id: writer)

    return run


functions = [_function(pipeline) for pipeline in PIPELINES]
