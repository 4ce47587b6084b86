"""Drain awareness: refuse new calls fast, and stop streams early so a step can checkpoint."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from connect_worker.context import DrainSignal
from connect_worker.llm import LLMDrainingError

from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .util import sample, serving


async def test_new_calls_are_refused_once_draining(
        make_llm: MakeLLM, openai_stub: StubProvider, drain: DrainSignal,
        registry: CollectorRegistry) -> None:
    llm = make_llm(refuse_when_draining=True)
    with serving(job_id="job-1", request_id="req-1"):
        paid = await llm.complete("Outline.")
    drain.set()
    with serving(job_id="job-1", request_id="req-2"):
        # Already paid for: still answered (from the cache) while draining.
        assert (await llm.complete("Outline.")).text == paid.text
        with pytest.raises(LLMDrainingError):
            await llm.complete("Write section one.")
    assert len(openai_stub.requests) == 1
    assert sample(registry, "requests_total", provider="openai", model="gpt-4.1",
                  outcome="refused") == 1


async def test_without_the_setting_calls_go_on_while_draining(
        make_llm: MakeLLM, openai_stub: StubProvider, drain: DrainSignal) -> None:
    drain.set()
    assert (await make_llm().complete("Outline.")).text
    assert len(openai_stub.requests) == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stream_stops_early_when_the_drain_begins(
        provider: str, make_llm: MakeLLM, openai_stub: StubProvider,
        anthropic_stub: StubProvider, drain: DrainSignal, registry: CollectorRegistry) -> None:
    stub = openai_stub if provider == "openai" else anthropic_stub
    words = [f"word{i}" for i in range(200)]
    # The stub paces its events so the stream is still going when the drain begins.
    stub.script.append(Reply(text=" ".join(words), chunk_delay=0.005))
    received: list[str] = []

    def on_text(piece: str) -> None:
        received.append(piece)
        if len(received) == 5:
            drain.set()

    llm = make_llm(provider=provider)
    with serving(job_id="job-s", request_id="req-1"):
        result = await llm.complete("Write.", stream=True, on_text=on_text, stop_on_drain=True)
    assert result.stopped_early and result.stop_reason == "drain"
    assert result.text == "".join(received) and 5 <= len(received) < 200
    assert result.usage.output_tokens > 0  # estimated: the stream ended before usage came
    model = llm.config.model or ""
    assert sample(registry, "requests_total", provider=provider, model=model,
                  outcome="stopped") == 1
    run_cost = await llm.run_cost("run-1")
    assert run_cost.calls == 1 and run_cost.cost_usd == pytest.approx(result.cost_usd)

    # A partial answer is not "the answer": the step's retry asks again.
    drain.clear()
    with serving(job_id="job-s", request_id="req-2"):
        again = await llm.complete("Write.", stream=True, stop_on_drain=True)
    assert not again.stopped_early and len(stub.requests) == 2


async def test_drain_signal_wakes_waiters_on_this_loop(drain: DrainSignal) -> None:
    waiter = asyncio.ensure_future(drain.wait())
    drain.set()
    await asyncio.wait_for(waiter, 5)
