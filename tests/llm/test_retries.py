"""Retries: transient failures are retried with backoff inside a budget; nothing multiplies."""

from __future__ import annotations

import time

import inngest
import pytest
from prometheus_client import CollectorRegistry

from connect_worker.llm import LLMUnavailableError

from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .util import sample

LABELS = {"provider": "openai", "model": "gpt-4.1"}


async def test_transient_failures_are_retried_until_answered(
        make_llm: MakeLLM, openai_stub: StubProvider, registry: CollectorRegistry) -> None:
    openai_stub.script.extend([
        Reply(status=500, error="internal"),
        Reply(status=503, error="overloaded"),
        Reply(body=b'{"id": "chatcmpl-1", "choices": [{"mess'),  # malformed 200
        Reply(delay=2.0),  # slower than the per-attempt timeout
        Reply(text="finally"),
    ])
    llm = make_llm(request_timeout=0.5)
    result = await llm.complete("Go.")

    assert result.text == "finally" and result.attempts == 5
    assert len(openai_stub.requests) == 5
    # The attempt we timed out may still be answered (and, by a real provider, billed):
    # the model ran up to five times, and the metrics say so instead of claiming one.
    assert 1 <= len(openai_stub.answered) <= 2
    assert sample(registry, "timed_out_attempts_total", **LABELS) == 1
    # The SDK's own retries are off: one HTTP request per attempt, retry count 0 every time.
    assert {seen.headers["x-stainless-retry-count"] for seen in openai_stub.requests} == {"0"}
    assert sample(registry, "retries_total", **LABELS) == 4
    assert sample(registry, "requests_total", outcome="ok", **LABELS) == 1


@pytest.mark.parametrize("header", ["retry-after", "retry-after-ms"])
async def test_rate_limit_waits_as_long_as_retry_after_says(
        header: str, make_llm: MakeLLM, openai_stub: StubProvider) -> None:
    value = "0.4" if header == "retry-after" else "400"
    openai_stub.script.append(Reply(status=429, error="slow down", headers={header: value}))
    llm = make_llm()  # backoff alone would wait <= 0.05 s
    started = time.monotonic()
    result = await llm.complete("Go.")

    assert time.monotonic() - started >= 0.4
    assert result.attempts == 2 and len(openai_stub.requests) == 2


async def test_gives_up_after_max_attempts(make_llm: MakeLLM, openai_stub: StubProvider,
                                           registry: CollectorRegistry) -> None:
    openai_stub.script.extend(Reply(status=502, error="bad gateway") for _ in range(10))
    llm = make_llm(max_attempts=3)
    with pytest.raises(LLMUnavailableError, match=r"after 3 attempts.*HTTP 502"):
        await llm.complete("Go.")

    assert len(openai_stub.requests) == 3
    assert sample(registry, "retries_total", **LABELS) == 2
    assert sample(registry, "requests_total", outcome="gave_up", **LABELS) == 1


async def test_gives_up_when_the_budget_is_spent(make_llm: MakeLLM,
                                                 anthropic_stub: StubProvider) -> None:
    anthropic_stub.script.extend(Reply(status=529, error="Overloaded",
                                       error_code="overloaded_error") for _ in range(50))
    llm = make_llm(provider="anthropic", model="claude-haiku-4-5", retry_budget=0.5,
                   max_attempts=100, backoff_initial=0.1, backoff_max=0.2)
    started = time.monotonic()
    with pytest.raises(LLMUnavailableError, match="HTTP 529"):
        await llm.complete("Go.")

    assert time.monotonic() - started < 0.5 + 1.0
    assert 2 <= len(anthropic_stub.requests) < 50


async def test_a_retry_after_beyond_the_budget_is_handed_to_inngest(
        make_llm: MakeLLM, openai_stub: StubProvider) -> None:
    openai_stub.script.append(Reply(status=429, error="quota", headers={"retry-after": "120"}))
    llm = make_llm(retry_budget=5.0)
    with pytest.raises(inngest.RetryAfterError):
        await llm.complete("Go.")

    assert len(openai_stub.requests) == 1  # no pointless attempt inside the budget


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_an_error_inside_a_stream_is_retried(
        provider: str, make_llm: MakeLLM, openai_stub: StubProvider,
        anthropic_stub: StubProvider) -> None:
    stub = openai_stub if provider == "openai" else anthropic_stub
    text = "one two three four five six"
    stub.script.extend([Reply(text=text, stream_error_after=4), Reply(text=text)])
    pieces: list[str] = []
    result = await make_llm(provider=provider).complete("Go.", stream=True,
                                                        on_text=pieces.append)
    assert result.text == text and result.attempts == 2 and len(stub.requests) == 2
    # The second attempt continued what the failed one streamed: nothing was repeated.
    assert "".join(pieces) == text
    assert stub.requests[1].body["messages"][-2]["role"] == "assistant"
