"""examples.reports: three report functions of 7-10 LLM steps, run offline."""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from connect_worker.context import DrainSignal
from connect_worker.devserver import DevServer
from connect_worker.devserver.state import RunStatus
from connect_worker.llm import LLM, LLMConfig, SimulatedProvider, SqliteCache
from examples.reports import client, functions
from examples.reports.pipelines import MAX_PARTS, PIPELINES, Pipeline, Writer, run_pipeline

from .util import log_file, sample

ROOT = Path(__file__).resolve().parents[2]
INPUT = {"topic": "Observability for LLM applications", "audience": "CTOs",
         "problem": "Teams cannot tell why LLM answers got worse",
         "interview_notes": "8 interviews: no eval suite (6/8), prompt changes untracked (5/8)"}


def test_the_app_exposes_three_report_functions() -> None:
    assert client.app_id == "reports"
    assert sorted(f.id for f in functions) == [
        "reports-generate-discovery-report", "reports-generate-hybrid-report",
        "reports-generate-report"]


async def run_offline(pipeline: Pipeline, llm: LLM, run_id: str) -> dict[str, object]:
    # A fresh context, as each request to a worker has: identical calls are numbered per
    # context, so this is a new attempt of every step rather than more calls in the same one.
    return await asyncio.create_task(_run(pipeline, llm, run_id), context=contextvars.Context())


async def _run(pipeline: Pipeline, llm: LLM, run_id: str) -> dict[str, object]:
    async def direct(step_id: str, step: Callable[..., Awaitable[object]], *args: object
                     ) -> object:
        return await step(*args)

    final = await run_pipeline(pipeline, INPUT, direct,
                               lambda step_id: Writer(llm, key=f"{run_id}:{step_id}",
                                                      run_id=run_id))
    assert isinstance(final, dict)
    return final


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.fn_id for p in PIPELINES])
async def test_each_report_runs_offline_and_a_rerun_pays_nothing(
        pipeline: Pipeline, tmp_path: Path) -> None:
    simulated = SimulatedProvider(speedup=5_000)
    registry = CollectorRegistry()
    llm = LLM(LLMConfig(provider="simulated"), cache=SqliteCache(tmp_path / "c.sqlite3"),
              registry=registry, providers={"simulated": simulated})

    final = await run_offline(pipeline, llm, "run-a")
    calls = simulated.requests
    assert 7 <= calls <= 10
    cost = final["cost"]
    assert isinstance(cost, dict) and cost["calls"] == calls and cost["cost_usd"] > 0
    assert len(str(final["markdown"])) > 5_000

    again = await run_offline(pipeline, llm, "run-a")  # every step retried, in effect
    assert simulated.requests == calls
    assert again["markdown"] == final["markdown"]
    hits = sum(sample(registry, "cache_hits_total", provider="simulated", model=m)
               for m in ("claude-sonnet-4-6", "claude-haiku-4-5"))
    assert hits == calls


async def test_a_report_runs_on_a_worker_with_the_simulated_provider(
        devserver: DevServer, tmp_path: Path) -> None:
    env = {**os.environ, "INNGEST_DEV": "1", "INNGEST_API_BASE_URL": devserver.api_url,
           "CONNECT_WORKER_HTTP_PORT": "off", "CONNECT_WORKER_LLM_PROVIDER": "simulated",
           "CONNECT_WORKER_LLM_SIM_SPEEDUP": "200",
           "CONNECT_WORKER_LLM_CACHE": str(tmp_path / "c.sqlite3")}
    with log_file(tmp_path / "worker.log") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connect_worker", "run", "examples.reports", cwd=ROOT,
            env=env, stdout=log, stderr=log)
        try:
            await devserver.wait_for_connection(timeout=30)
            (run_id,) = await devserver.send_event("reports/hybrid.requested", INPUT)
            run = await devserver.wait_for_run(run_id, timeout=60)
        finally:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output["cost"]["calls"] == 9 and run.output["cost"]["cost_usd"] > 0
    assert run.output["markdown"].startswith("# ")


async def test_continuations_end_even_if_every_worker_is_draining(tmp_path: Path) -> None:
    drain = DrainSignal()
    drain.set()
    simulated = SimulatedProvider(speedup=5_000)
    llm = LLM(LLMConfig(provider="simulated"), cache=SqliteCache(tmp_path / "c.sqlite3"),
              registry=CollectorRegistry(), providers={"simulated": simulated}, drain=drain)
    final = await run_offline(PIPELINES[0], llm, "run-d")
    # Each of the 5 streamed sections: the draft and MAX_PARTS - 1 stopped continuations,
    # then one that runs to the end.
    assert simulated.requests == 10 + 5 * MAX_PARTS
    assert "## " in str(final["markdown"])
