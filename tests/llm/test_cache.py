"""No double billing: a retried step reuses every answer it already paid for."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from prometheus_client import CollectorRegistry

from connect_worker.llm import LLMFatalError, PostgresCache, Result, ResultCache, SqliteCache
from connect_worker.llm.types import Answer, Usage

from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .util import sample, serving

LABELS = {"provider": "openai", "model": "gpt-4.1"}


async def step_body(llm_make: MakeLLM, cache: ResultCache) -> list[str]:
    """A step that asks the same question twice (two samples), then a follow-up."""
    llm = llm_make(cache=cache)
    first = await llm.complete("Draft the intro.", temperature=1.0)
    second = await llm.complete("Draft the intro.", temperature=1.0)
    third = await llm.complete(f"Pick the better one:\n{first.text}\n{second.text}")
    return [first.text, second.text, third.text]


async def test_a_retried_step_reuses_every_answer(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache,
        registry: CollectorRegistry) -> None:
    openai_stub.script.extend([Reply(text="intro A"), Reply(text="intro B"),
                               Reply(text="A is better")])
    with serving(job_id="job-7", request_id="req-1"):
        before = await step_body(make_llm, cache)
    assert before == ["intro A", "intro B", "A is better"]
    assert len(openai_stub.requests) == 3

    # Same step (job id), new attempt (request id), maybe another worker: nothing is paid.
    with serving(job_id="job-7", request_id="req-2"):
        after = await step_body(make_llm, cache)
    assert after == before
    assert len(openai_stub.requests) == 3
    assert sample(registry, "cache_hits_total", **LABELS) == 3
    assert sample(registry, "requests_total", outcome="cached", **LABELS) == 3
    assert sample(registry, "saved_usd_total", **LABELS) == pytest.approx(
        sample(registry, "cost_usd_total", **LABELS))

    # Another step with the same prompts is a different job: it asks the model.
    with serving(job_id="job-8", request_id="req-3"):
        await step_body(make_llm, cache)
    assert len(openai_stub.requests) == 6


async def test_a_step_failing_on_its_third_call_pays_only_for_that_call_again(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache) -> None:
    openai_stub.script.extend([Reply(text="intro A"), Reply(text="intro B"),
                               Reply(status=400, error="bad request")])
    with serving(job_id="job-1", request_id="req-1"), pytest.raises(LLMFatalError):
        await step_body(make_llm, cache)
    with serving(job_id="job-1", request_id="req-2"):
        texts = await step_body(make_llm, cache)
    assert texts[:2] == ["intro A", "intro B"]
    assert len(openai_stub.requests) == 4  # 3 + only the call that never got an answer


async def test_explicit_key_outside_the_executor(make_llm: MakeLLM, openai_stub: StubProvider,
                                                 cache: ResultCache) -> None:
    llm = make_llm(cache=cache)

    async def attempt() -> Result:
        return await llm.complete("Summarise.", key="run-9:summary", run_id="run-9")

    # Each attempt in a fresh context, as each HTTP request is in an ASGI server.
    a = await asyncio.create_task(attempt(), context=contextvars.Context())
    b = await asyncio.create_task(attempt(), context=contextvars.Context())
    assert b.cached and b.text == a.text and len(openai_stub.requests) == 1
    # No identity at all: nothing to key on, so no caching.
    await llm.complete("Summarise.")
    await llm.complete("Summarise.")
    assert len(openai_stub.requests) == 3


async def test_run_cost_adds_up_across_workers(make_llm: MakeLLM, openai_stub: StubProvider,
                                               cache: ResultCache) -> None:
    openai_stub.script.extend([Reply(input_tokens=1000, output_tokens=100),
                               Reply(input_tokens=2000, output_tokens=300)])
    worker_a, worker_b = make_llm(cache=cache), make_llm(cache=cache)
    with serving(job_id="s1", request_id="r1", run_id="run-c"):
        one = await worker_a.complete("Step one.")
    with serving(job_id="s2", request_id="r2", run_id="run-c"):
        two = await worker_b.complete("Step two.")
    with serving(job_id="s2", request_id="r3", run_id="run-c"):  # s2 retried elsewhere
        again = await worker_a.complete("Step two.")
        total = await worker_a.run_cost()
    assert again.cached and again.cost_usd == two.cost_usd  # what the answer cost, once
    assert len(openai_stub.requests) == 2
    assert (total.calls, total.input_tokens, total.output_tokens) == (2, 3000, 400)
    assert total.cost_usd == pytest.approx(one.cost_usd + two.cost_usd)
    assert await worker_b.run_cost("run-c") == total
    assert (await worker_b.run_cost("another-run")).calls == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_entries_expire(backend: str, tmp_path: object, request: pytest.FixtureRequest
                              ) -> None:
    cache: ResultCache
    if backend == "sqlite":
        cache = SqliteCache(f"{tmp_path}/c.sqlite3", ttl=0.0)
    else:
        cache = PostgresCache(request.getfixturevalue("pg_dsn"), ttl=0.0)
    answer = Answer("x", Usage(1, 1), "req", "gpt-4.1")
    key = f"expiring-{backend}-{id(cache)}"
    await cache.put(key, answer, run_id=None, cost_usd=0.0)
    assert await cache.get(key) is None
    cache.ttl = 3600.0
    await cache.put(key + "-kept", answer, run_id=None, cost_usd=0.0)
    assert await cache.get(key + "-kept") == answer
    await cache.close()


async def test_a_broken_cache_never_fails_a_paid_call(
        make_llm: MakeLLM, openai_stub: StubProvider, tmp_path: object) -> None:
    broken = SqliteCache(f"{tmp_path}/no-such-dir/\0bad")  # every operation raises
    llm = make_llm(cache=broken)
    with serving(job_id="job-x", request_id="req-x"):
        result = await llm.complete("Go.")
    assert result.text and len(openai_stub.requests) == 1
