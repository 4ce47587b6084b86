"""Run one report in-process, step by step, without Inngest (a quick offline look).

    CONNECT_WORKER_LLM_PROVIDER=simulated CONNECT_WORKER_LLM_SIM_SPEEDUP=50 \\
        python -m connect_worker.lab.apps.reports generate-report --topic "..."

Running it again with the same ``--run-id`` replays every answer from the result cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from connect_worker.llm import LLM

from .pipelines import PIPELINES, Writer, run_pipeline

SAMPLE_INPUT = {
    "topic": "AI coding assistants for mid-size engineering teams",
    "audience": "VP Engineering deciding on a 2026 tooling budget",
    "problem": "Code review is the bottleneck once AI assistants speed up writing code",
    "interview_notes": "12 interviews: reviewers overloaded (9/12), larger PRs (7/12), "
                       "security teams wary of generated code (5/12), no metrics (10/12)",
}


async def main() -> tuple[str | None, str]:
    parser = argparse.ArgumentParser(prog="python -m connect_worker.lab.apps.reports")
    parser.add_argument("report", choices=[p.fn_id for p in PIPELINES])
    parser.add_argument("--topic", default=SAMPLE_INPUT["topic"])
    parser.add_argument("--run-id", default=None, help="reuse to replay from the cache")
    parser.add_argument("--out", default=None, help="write the report markdown here")
    args = parser.parse_args()
    pipeline = next(p for p in PIPELINES if p.fn_id == args.report)
    run_id = args.run_id or f"offline-{uuid.uuid4().hex[:12]}"
    llm = LLM.from_env()
    started = time.monotonic()

    async def run(step_id: str, step: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        step_started = time.monotonic()
        out = await step(*args)
        print(f"  {step_id:<22} {time.monotonic() - step_started:6.2f} s")
        return out

    final = await run_pipeline(pipeline, {**SAMPLE_INPUT, "topic": args.topic}, run,
                               lambda step_id: Writer(llm, key=f"{run_id}:{step_id}",
                                                      run_id=run_id))
    print(f"{pipeline.fn_id} run {run_id}: {len(pipeline.steps)} steps in "
          f"{time.monotonic() - started:.1f} s, {len(final['markdown'])} characters")
    print("cost:", json.dumps(final["cost"]))
    await llm.aclose()
    return args.out, str(final["markdown"])


if __name__ == "__main__":
    out, markdown = asyncio.run(main())
    if out:
        Path(out).write_text(markdown)
