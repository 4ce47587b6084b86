"""Claims, in one process: two copies of one step pay once, a cancelled owner's call
still lands, a dead owner's stream is continued, a rejected answer is asked again."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from prometheus_client import CollectorRegistry

from connect_worker.context import DrainSignal
from connect_worker.llm import (
    CONTINUE,
    Claims,
    LLMDrainingError,
    LLMRejectedError,
    LLMUnavailableError,
    Message,
    Partial,
    Result,
    ResultCache,
    Usage,
)
from connect_worker.llm.cache import cache_key
from connect_worker.llm.types import Answer, Call

from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .util import sample, serving

LABELS = {"provider": "openai", "model": "gpt-4.1"}
WORDS = " ".join(f"w{i}" for i in range(80))


def requested(stub: StubProvider) -> asyncio.Event:
    """Set once the stub has received a request."""
    seen = asyncio.Event()
    stub.on_request = lambda _seen: seen.set()
    return seen


JOB = f"job-{uuid.uuid4()}"  # calls are numbered per request id, process-wide


def waits(cache: ResultCache) -> asyncio.Event:
    """Set once a copy starts waiting on another copy's claim."""
    assert isinstance(cache, Claims)
    started, inner = asyncio.Event(), cache.wait

    async def wait(key: str, timeout: float) -> Answer | None:  # noqa: ASYNC109
        started.set()
        return await inner(key, timeout)

    cache.wait = wait  # type: ignore[method-assign]
    return started


async def copy(make_llm: MakeLLM, cache: ResultCache, request_id: str, **kwargs: object
               ) -> Result:
    """One copy of the step ``JOB`` (attempt ``request_id``) asking one question."""
    with serving(job_id=JOB, request_id=f"{request_id}-{uuid.uuid4()}"):
        return await make_llm(cache=cache, **kwargs).complete("Summarise the memo.")


async def test_two_copies_of_a_step_at_once_make_one_request(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache,
        registry: CollectorRegistry) -> None:
    hold = asyncio.Event()
    openai_stub.script.append(Reply(text="the summary", hold=hold))
    seen, waiting = requested(openai_stub), waits(cache)
    first = asyncio.create_task(copy(make_llm, cache, "req-a"))
    await asyncio.wait_for(seen.wait(), 10)
    second = asyncio.create_task(copy(make_llm, cache, "req-b"))  # finds the live claim
    await asyncio.wait_for(waiting.wait(), 10)
    hold.set()
    a, b = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert len(openai_stub.requests) == 1
    assert (a.text, a.cached, b.text, b.cached) == ("the summary", False, "the summary", True)
    assert sample(registry, "requests_total", outcome="waited", **LABELS) == 1
    assert sample(registry, "saved_tokens_total", via="waited", **LABELS) > 0


async def test_a_cancelled_owner_finishes_its_call_for_the_copy_waiting_on_it(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache,
        registry: CollectorRegistry) -> None:
    hold = asyncio.Event()
    openai_stub.script.append(Reply(text="paid once", hold=hold))
    seen, waiting = requested(openai_stub), waits(cache)
    owner = asyncio.create_task(copy(make_llm, cache, "req-a"))
    await asyncio.wait_for(seen.wait(), 10)
    waiter = asyncio.create_task(copy(make_llm, cache, "req-b"))
    await asyncio.wait_for(waiting.wait(), 10)
    owner.cancel()  # its lease went to the other copy: the engine cancels it
    with pytest.raises(asyncio.CancelledError):
        await owner
    hold.set()  # the request in flight was not thrown away
    result = await asyncio.wait_for(waiter, 10)
    assert (result.text, result.cached) == ("paid once", True)
    assert len(openai_stub.requests) == len(openai_stub.answered) == 1
    assert sample(registry, "finished_in_background_total", **LABELS) == 1


async def test_a_draining_worker_does_not_wait_for_another_copy(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache,
        drain: DrainSignal) -> None:
    hold = asyncio.Event()
    openai_stub.script.append(Reply(hold=hold))
    seen, waiting = requested(openai_stub), waits(cache)
    owner = asyncio.create_task(copy(make_llm, cache, "req-a"))
    await asyncio.wait_for(seen.wait(), 10)
    waiter = asyncio.create_task(copy(make_llm, cache, "req-b"))
    await asyncio.wait_for(waiting.wait(), 10)
    drain.set()  # a wait in progress ends at once...
    with pytest.raises(LLMDrainingError):
        await asyncio.wait_for(waiter, 5)
    with pytest.raises(LLMDrainingError):  # ...and a new one does not start
        await asyncio.wait_for(copy(make_llm, cache, "req-c"), 5)
    hold.set()
    await owner
    assert len(openai_stub.requests) == 1


async def test_a_wait_is_bounded_by_the_calls_budget(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache) -> None:
    hold = asyncio.Event()
    openai_stub.script.append(Reply(hold=hold))
    seen = requested(openai_stub)
    owner = asyncio.create_task(copy(make_llm, cache, "req-a"))
    await asyncio.wait_for(seen.wait(), 10)
    with pytest.raises(LLMUnavailableError, match="held the model call"):
        await asyncio.wait_for(copy(make_llm, cache, "req-b", retry_budget=0.5), 5)
    hold.set()
    await owner


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_dead_owners_stream_is_continued_not_asked_again(
        make_llm: MakeLLM, openai_stub: StubProvider, anthropic_stub: StubProvider,
        cache: ResultCache, registry: CollectorRegistry, kind: str) -> None:
    stub = openai_stub if kind == "openai" else anthropic_stub
    model = "gpt-4.1" if kind == "openai" else "claude-sonnet-4-6"
    prompt, half = "Write the section.", " ".join(WORDS.split()[:40]) + " "
    # What a worker killed 40 words into its stream left: a claim it no longer refreshes.
    job = f"job-{uuid.uuid4()}"
    entry = cache_key(f"job:{job}", Call(kind, model, (Message("user", prompt),),
                                        max_tokens=200).digest(), 0)
    assert isinstance(cache, Claims)
    assert (await cache.claim(entry, "dead-owner", 0)).won
    assert await cache.refresh(entry, "dead-owner", 0, Partial(half, Usage(5, 40)))
    stub.script.append(Reply(text=WORDS))
    streamed: list[str] = []
    with serving(job_id=job, request_id="req-2"):
        result = await make_llm(cache=cache).complete(
            prompt, provider=kind, model=model, max_tokens=200, stream=True,
            on_text=streamed.append)
    assert result.text == "".join(streamed) == WORDS
    (seen,) = stub.requests
    assert seen.body["messages"][-2:] == [{"role": "assistant", "content": half},
                                          {"role": "user", "content": CONTINUE}]
    limit = "max_completion_tokens" if kind == "openai" else "max_tokens"
    assert seen.body[limit] == 160
    assert stub.generated == [40]  # only the remainder was generated
    assert result.usage.output_tokens == 80 and result.usage.input_tokens == 5 + 120
    labels = {"provider": kind, "model": model}
    assert sample(registry, "requests_total", outcome="resumed", **labels) == 1
    assert sample(registry, "saved_tokens_total", via="resumed", **labels) == 40
    assert sample(registry, "claim_takeovers_total", **labels) == 1


async def test_a_rejected_answer_is_asked_again_and_the_others_stay_reused(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache,
        registry: CollectorRegistry) -> None:
    openai_stub.script.extend([Reply(text="the facts"), Reply(text="draft one"),
                               Reply(text="draft two"), Reply(text="good draft")])
    job, run = f"job-{uuid.uuid4()}", f"run-{uuid.uuid4()}"

    async def step(request_id: str) -> str:
        llm = make_llm(cache=cache)
        with serving(job_id=job, request_id=f"{job}-{request_id}", run_id=run):
            facts = await llm.complete("List the facts.")
            draft = await llm.complete(f"Write a draft from: {facts.text}")
            if not draft.text.startswith("good"):
                raise await draft.reject(f"{draft.text!r} does not start with 'good'")
            return draft.text

    for attempt in (1, 2):
        with pytest.raises(LLMRejectedError, match="does not start with"):
            await step(f"req-{attempt}")
    assert await step("req-3") == "good draft"
    assert await step("req-4") == "good draft"  # accepted answers are reused again
    facts, *drafts = openai_stub.requests
    assert "List the facts" in facts.prompt and len(drafts) == 3
    assert len({d.prompt for d in drafts}) == 3  # a different request each time
    assert "draft two" in drafts[2].prompt and "2 rejected so far" in drafts[2].prompt
    assert sample(registry, "rejected_total", **LABELS) == 2
    cost = await make_llm(cache=cache).run_cost(run)
    assert cost.calls == 4  # the rejected answers were paid for, and count


async def test_reuse_false_always_asks(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache) -> None:
    llm = make_llm(cache=cache)
    job, run = f"job-{uuid.uuid4()}", f"run-{uuid.uuid4()}"
    for attempt in (1, 2):
        with serving(job_id=job, request_id=f"{job}-{attempt}", run_id=run):
            assert not (await llm.complete("Roll a die.", reuse=False)).cached
    assert len(openai_stub.requests) == 2
    assert (await llm.run_cost(run)).calls == 2


async def test_a_stream_that_failed_midway_is_continued_by_the_steps_retry(
        make_llm: MakeLLM, openai_stub: StubProvider, cache: ResultCache,
        registry: CollectorRegistry) -> None:
    # 20 words, then an error event; the call gives up (one attempt), the step fails.
    openai_stub.script.extend([Reply(text=WORDS, stream_error_after=21), Reply(text=WORDS)])
    job = f"job-{uuid.uuid4()}"
    llm = make_llm(cache=cache, max_attempts=1)
    with serving(job_id=job, request_id=f"{job}-1"), pytest.raises(LLMUnavailableError):
        await llm.complete("Write the section.", stream=True)
    with serving(job_id=job, request_id=f"{job}-2"):
        result = await llm.complete("Write the section.", stream=True)
    assert result.text == WORDS
    assert openai_stub.requests[1].body["messages"][-2]["content"].split() == WORDS.split()[:20]
    assert openai_stub.generated == [60]  # the failed stream was never billed as answered
    assert sample(registry, "requests_total", outcome="resumed", **LABELS) == 1
    assert sample(registry, "claim_takeovers_total", **LABELS) == 0  # released, not lapsed


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_stream_error_midway_is_continued_by_the_next_attempt(
        make_llm: MakeLLM, openai_stub: StubProvider, anthropic_stub: StubProvider,
        registry: CollectorRegistry, kind: str) -> None:
    stub = openai_stub if kind == "openai" else anthropic_stub
    model = "gpt-4.1" if kind == "openai" else "claude-sonnet-4-6"
    first_piece = 1 if kind == "openai" else 2
    # 30 words, then an overloaded error event inside the stream; the retry continues.
    stub.script.extend([Reply(text=WORDS, stream_error_after=first_piece + 30),
                        Reply(text=WORDS)])
    streamed: list[str] = []
    result = await make_llm().complete("Write the section.", provider=kind, model=model,
                                       stream=True, max_tokens=200, on_text=streamed.append)
    assert result.text == "".join(streamed) == WORDS  # nothing repeated to on_text
    assert result.attempts == 2
    assert stub.requests[1].body["messages"][-2]["content"].split() == WORDS.split()[:30]
    assert stub.generated == [50]
    labels = {"provider": kind, "model": model}
    assert sample(registry, "requests_total", outcome="resumed", **labels) == 1
    assert sample(registry, "saved_tokens_total", via="resumed", **labels) == 30
