"""A renamed LLM step across a deploy, with the real LLM toolkit against a local model
stub: under warn the question is paid twice, under fail once."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import inngest
import pytest
from prometheus_client import CollectorRegistry

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.llm import LLM, LLMConfig, OpenAIProvider, SqliteCache

from ..engine.harness import running_worker
from ..llm.stubs import StubProvider
from ..llm.util import SECRET
from .test_gateway import _parked

PROMPT = "Write the brief on edge databases."


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with DevServer(DevServerConfig.fast()) as server:
        yield server


def make(version: str, llm: LLM) -> tuple[inngest.Inngest, list[inngest.Function[Any]]]:
    client = inngest.Inngest(app_id="drift-llm", is_production=False)
    write_id = "write" if version == "v1" else "write-draft"

    @client.create_function(fn_id="brief", trigger=inngest.TriggerEvent(event="brief/go"),
                            retries=0)
    async def brief(ctx: inngest.Context) -> str:
        async def write() -> str:
            return (await llm.complete(PROMPT, max_tokens=50)).text

        text = await ctx.step.run(write_id, write)
        await ctx.step.wait_for_event("gate", event="brief/continue", timeout=60_000)
        return text

    return client, [brief]


@pytest.mark.parametrize(("on_drift", "paid"), [("warn", 2), ("fail", 1)])
async def test_renamed_llm_step_is_paid_twice_only_under_warn(
        dev: DevServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        on_drift: str, paid: int) -> None:
    async with StubProvider("openai") as stub:
        llm = LLM(LLMConfig(provider="openai", model="gpt-4.1", backoff_initial=0.01,
                            backoff_max=0.05),
                  cache=SqliteCache(tmp_path / "llm.sqlite3"), registry=CollectorRegistry(),
                  providers={"openai": OpenAIProvider(api_key=SECRET,
                                                      base_url=stub.base_url)})
        async with running_worker(dev, serve=[make("v1", llm)], instance_id="v1"):
            [run_id] = await dev.send_event("brief/go", {})
            await dev.wait_for(lambda: _parked(dev, run_id), 15)
        assert len(stub.answered) == 1
        with caplog.at_level(logging.WARNING, "connect_worker.engine.drift"):
            async with running_worker(dev, serve=[make("v2", llm)], instance_id="v2",
                                      on_drift=on_drift):
                await dev.send_event("brief/continue", {})
                run = await dev.wait_for_run(run_id, 15)
    assert len(stub.answered) == paid  # what the provider would have billed
    assert all(PROMPT in seen.prompt for seen in stub.answered)
    assert run.status is (RunStatus.FAILED if on_drift == "fail" else RunStatus.COMPLETED)
    [line] = [r for r in caplog.records if getattr(r, "event", "") == "run.version_drift"]
    assert line.fields["new_step"] == "write-draft"  # type: ignore[attr-defined]
