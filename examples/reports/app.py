"""The Inngest app: three report functions, each a pipeline of LLM steps.

Run it on connect_worker (``connect-worker run examples.reports``) with real keys
(``OPENAI_API_KEY`` or ``ANTHROPIC_API_KEY``) or offline with
``CONNECT_WORKER_LLM_PROVIDER=simulated`` (``CONNECT_WORKER_LLM_SIM_SPEEDUP=50`` for a
fast demo).
"""

from __future__ import annotations

from typing import Any

import inngest

from connect_worker.llm import LLM

from .pipelines import PIPELINES, Pipeline, Writer, run_pipeline

client = inngest.Inngest(app_id="reports")
# One LLM per process: its metrics go on the registry the worker serves on /metrics.
llm = LLM.from_env()


def _function(pipeline: Pipeline) -> inngest.Function[Any]:
    @client.create_function(fn_id=pipeline.fn_id,
                            trigger=inngest.TriggerEvent(event=pipeline.event), retries=4)
    async def run(ctx: inngest.Context) -> Any:
        writer = Writer(llm)  # inside the worker the step's job id keys the cache
        return await run_pipeline(pipeline, dict(ctx.event.data), ctx.step.run,
                                  lambda _step_id: writer)

    return run


functions = [_function(pipeline) for pipeline in PIPELINES]
