"""A three-step LLM pipeline in two versions, for rehearsing a deploy that changes code.

v2 renames the middle step (``write`` -> ``write-draft``) and keeps its prompt, the kind
of tidy-up a team ships on a Friday. A run that finished ``write`` on v1 and continues on
v2 meets a step with no memo: under ``CONNECT_WORKER_ON_DRIFT=warn`` it asks the model the
same question again (paid twice), under ``fail`` it stops first. ``v2_compatible``
changes the same step's prompt under its old id and appends a step: no drift. Targets:
``connect_worker.lab.apps.brief:v1``, ``:v2`` and ``:v2_compatible``. Model calls go wherever
``CONNECT_WORKER_LLM_PROVIDER`` says (``simulated`` in the rehearsal); each step body
appends a line to ``CONNECT_WORKER_EXECUTION_LOG``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import inngest

from connect_worker.lab.apps.execution_log import record
from connect_worker.llm import LLM

client = inngest.Inngest(app_id="brief", is_production=False)
_llm: LLM | None = None


def llm() -> LLM:
    global _llm  # one LLM per process, made on first use
    if _llm is None:
        _llm = LLM.from_env()
    return _llm


def make(version: str) -> list[inngest.Function[Any]]:
    write_id = "write-draft" if version == "v2" else "write"

    @client.create_function(fn_id="brief", trigger=inngest.TriggerEvent(event="brief/requested"))
    async def brief(ctx: inngest.Context) -> dict[str, str]:
        topic = str(ctx.event.data.get("topic", "widgets"))

        async def ask(step_id: str, prompt: str) -> str:
            record(step_id, ctx.run_id)
            await asyncio.sleep(float(os.environ.get("STEP_SECONDS", "0.2")))
            result = await llm().complete(prompt, system="You write short briefs.",
                                          max_tokens=60)
            return result.text

        outline = await ctx.step.run("outline", ask, "outline", f"Outline a brief on {topic}.")
        wording = "Write a crisp brief" if version == "v2_compatible" else "Write the brief"
        draft = await ctx.step.run(write_id, ask, write_id, f"{wording}: {outline[:80]}")
        final = await ctx.step.run("polish", ask, "polish", f"Polish: {draft[:80]}")
        if version == "v2_compatible":
            title = await ctx.step.run("title", ask, "title", f"Title: {final[:80]}")
            return {"topic": topic, "brief": final, "title": title}
        return {"topic": topic, "brief": final}

    return [brief]


v1 = [(client, make("v1"))]
v2 = [(client, make("v2"))]
v2_compatible = [(client, make("v2_compatible"))]
