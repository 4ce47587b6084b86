"""The real-server scenarios' app: a report of N LLM steps, served by connect_worker
(``connect-worker run tests.real_server.app``) or by the official SDK's Connect client
(``python -m tests.real_server.official_worker``), from the same code.

Environment: ``RS_APP_ID`` names the app (each scenario has its own, so the server routes
its steps only to that scenario's workers); ``CONNECT_WORKER_EXECUTION_LOG`` gets one line
per step-body phase (``start``, ``answered``, ``end``, ``cancelled``) with the attempt, the
job id the step saw and the process id; the model is the local stub behind
``OPENAI_BASE_URL``.

Event data (all optional): ``steps`` (default 7); ``step_seconds`` before each model call;
``slow`` = ``{"section-2": 30}``, that step's extra seconds, on its first attempt only;
``hold_after_answer`` = a step that, on its first attempt, blocks after its answer was
stored (the window in which a deploy SIGKILLs a worker).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import inngest

import connect_worker
from connect_worker.lab.apps.execution_log import record

APP_ID = os.environ.get("RS_APP_ID", "rs")
client = inngest.Inngest(app_id=APP_ID, is_production=False)

# prompt -> answer text; set by whoever serves the app (connect_worker's LLM toolkit with
# its result cache, or the plain OpenAI client for the official SDK).
Model = Callable[[str], Awaitable[str]]
_model: Model | None = None


def use_model(model: Model) -> None:
    global _model
    _model = model


def _seconds(value: object) -> float:
    return float(value) if isinstance(value, int | float | str) else 0.0


@client.create_function(fn_id="report", trigger=inngest.TriggerEvent(event=f"{APP_ID}/report"),
                        retries=4)
async def report(ctx: inngest.Context) -> dict[str, Any]:
    data = dict(ctx.event.data)
    steps = int(_seconds(data.get("steps", 7)))
    slow = data.get("slow") if isinstance(data.get("slow"), dict) else {}
    assert isinstance(slow, dict)

    async def section(index: int) -> str:
        name = f"section-{index}"
        current = connect_worker.current_request()
        seen = {"attempt": ctx.attempt, "job_id": current.job_id if current else None,
                "request_id": current.request_id if current else None}
        record(name, ctx.run_id, phase="start", **seen)
        try:
            delay = _seconds(data.get("step_seconds", 0))
            if ctx.attempt == 0:
                delay += _seconds(slow.get(name, 0))
            await asyncio.sleep(delay)
            assert _model is not None, "no model configured"
            text = await _model(f"Write section {index} of the report on "
                                f"{data.get('topic', 'gears')} (run {ctx.run_id}).")
            record(name, ctx.run_id, phase="answered", **seen)
            if data.get("hold_after_answer") == name and ctx.attempt == 0:
                await asyncio.Event().wait()  # until the test kills this process
        except asyncio.CancelledError:
            record(name, ctx.run_id, phase="cancelled", **seen)
            raise
        record(name, ctx.run_id, phase="end", **seen)
        return text

    sections = [await ctx.step.run(f"section-{i}", section, i) for i in range(1, steps + 1)]
    return {"sections": sections, "steps": steps}


functions = [report]


def _toolkit_model() -> Model:
    """connect_worker's LLM toolkit: inside the worker, the step's job id keys its cache."""
    from connect_worker.llm import LLM

    llm = LLM.from_env()

    async def complete(prompt: str) -> str:
        result = await llm.complete(prompt, model="gpt-4.1-mini", max_tokens=200)
        return result.text

    return complete


if os.environ.get("CONNECT_WORKER_LLM_PROVIDER"):
    use_model(_toolkit_model())
