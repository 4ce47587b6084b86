"""The app the claim tests serve on real workers: one LLM step (``llm/ask``), and a step
whose validator rejects drafts (``llm/validated``)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import inngest

from connect_worker.llm import LLM

client = inngest.Inngest(app_id="llm-claims")
llm = LLM.from_env()


@client.create_function(fn_id="ask", trigger=inngest.TriggerEvent(event="llm/ask"), retries=4)
async def ask(ctx: inngest.Context) -> Any:
    data = ctx.event.data

    async def answer() -> dict[str, Any]:
        result = await llm.complete(str(data["prompt"]), stream=bool(data.get("stream")),
                                    max_tokens=int(str(data.get("max_tokens", 1024))))
        return {"text": result.text, "cached": result.cached, "usage": asdict(result.usage)}

    out = await ctx.step.run("answer", answer)
    return {**out, "cost": asdict(await llm.run_cost(ctx.run_id))}


@client.create_function(fn_id="validated", trigger=inngest.TriggerEvent(event="llm/validated"),
                        retries=4)
async def validated(ctx: inngest.Context) -> Any:
    async def draft() -> str:
        facts = await llm.complete("List the facts about edge databases.")
        result = await llm.complete(f"Write a one-line pitch from these facts: {facts.text}")
        if not result.text.startswith("good"):
            raise await result.reject("the pitch must start with 'good'")
        return result.text

    return await ctx.step.run("draft", draft)


functions = [ask, validated]
