"""Calls through the real openai / anthropic clients against the local stub APIs."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from connect_worker.llm import LLM, LLMConfig, LLMFatalError, Message, Tool, Usage
from connect_worker.llm.pricing import DEFAULT_PRICES

from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .util import SECRET, sample


async def test_openai_answer_usage_and_cost(make_llm: MakeLLM, openai_stub: StubProvider,
                                            registry: CollectorRegistry) -> None:
    openai_stub.script.append(Reply(text="Three risks stand out.", input_tokens=1_000,
                                    output_tokens=500, cached_tokens=400))
    llm = make_llm()
    result = await llm.complete("List the risks.", system="You are an analyst.",
                                max_tokens=700, temperature=0.2)

    assert result.text == "Three risks stand out."
    assert result.request_id == "req_stub_1"
    assert result.usage == Usage(input_tokens=1_000, output_tokens=500, cached_tokens=400)
    # gpt-4.1: $2 in, $0.50 cached in, $8 out per million tokens.
    assert result.cost_usd == pytest.approx((600 * 2 + 400 * 0.5 + 500 * 8) / 1e6)
    assert result.cost_usd == pytest.approx(DEFAULT_PRICES["gpt-4.1"].cost(result.usage))
    assert not result.cached and result.attempts == 1

    (seen,) = openai_stub.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {SECRET}"
    assert seen.body["messages"][0] == {"role": "system", "content": "You are an analyst."}
    assert seen.body["max_completion_tokens"] == 700 and seen.body["temperature"] == 0.2

    labels = {"provider": "openai", "model": "gpt-4.1"}
    assert sample(registry, "requests_total", outcome="ok", **labels) == 1
    assert sample(registry, "input_tokens_total", **labels) == 1_000
    assert sample(registry, "cached_input_tokens_total", **labels) == 400
    assert sample(registry, "output_tokens_total", **labels) == 500
    assert sample(registry, "cost_usd_total", **labels) == pytest.approx(result.cost_usd)
    assert b"connect_worker_llm_request_duration_seconds_count" in generate_latest(registry)


async def test_anthropic_answer_and_cache_reads(make_llm: MakeLLM,
                                                anthropic_stub: StubProvider) -> None:
    anthropic_stub.script.append(Reply(text="A summary.", input_tokens=200, output_tokens=50,
                                       cached_tokens=800))
    llm = make_llm(provider="anthropic", model="claude-sonnet-4-6")
    result = await llm.complete(messages=[Message("user", "Summarise."),
                                          Message("assistant", "Sure."),
                                          Message("user", "Go on.")], system="Be brief.")

    assert result.text == "A summary." and result.request_id == "req_stub_1"
    # Anthropic reports cache reads beside input_tokens; Usage counts them in.
    assert result.usage == Usage(input_tokens=1_000, output_tokens=50, cached_tokens=800)
    assert result.cost_usd == pytest.approx((200 * 3 + 800 * 0.3 + 50 * 15) / 1e6)
    (seen,) = anthropic_stub.requests
    assert seen.path == "/v1/messages"
    assert SECRET in (seen.headers.get("x-api-key"), seen.headers.get("authorization", "")[7:])
    assert seen.body["system"] == "Be brief." and len(seen.body["messages"]) == 3


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_streaming(provider: str, make_llm: MakeLLM, openai_stub: StubProvider,
                         anthropic_stub: StubProvider) -> None:
    stub = openai_stub if provider == "openai" else anthropic_stub
    text = "The market is growing fast in three segments"
    stub.script.append(Reply(text=text, input_tokens=300, output_tokens=9))
    pieces: list[str] = []
    llm = make_llm(provider=provider, model="gpt-4.1-mini" if provider == "openai"
                   else "claude-haiku-4-5")
    result = await llm.complete("Describe the market.", stream=True, on_text=pieces.append)

    assert len(pieces) == len(text.split()) and "".join(pieces) == text == result.text
    assert result.usage.input_tokens == 300 and result.usage.output_tokens == 9
    assert result.request_id == "req_stub_1" and result.cost_usd > 0
    assert stub.requests[0].body["stream"] is True


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_tool_calls(provider: str, stream: bool, make_llm: MakeLLM,
                          openai_stub: StubProvider, anthropic_stub: StubProvider) -> None:
    stub = openai_stub if provider == "openai" else anthropic_stub
    stub.script.append(Reply(text="", tool_call=("search", {"query": "pricing", "limit": 3})))
    tool = Tool("search", "Search the web.", {"type": "object", "properties": {
        "query": {"type": "string"}, "limit": {"type": "integer"}}})
    llm = make_llm(provider=provider)
    result = await llm.complete("Find pricing pages.", tools=[tool], stream=stream)

    (call,) = result.tool_calls
    assert call.name == "search" and call.arguments == {"query": "pricing", "limit": 3}
    sent = stub.requests[0].body["tools"][0]
    assert (sent["function"]["name"] if provider == "openai" else sent["name"]) == "search"


async def test_json_output_retries_an_unparsable_answer(
        make_llm: MakeLLM, openai_stub: StubProvider, registry: CollectorRegistry) -> None:
    openai_stub.script.extend([Reply(text="Sure! Here it is: {oops", output_tokens=40),
                               Reply(text='```json\n{"sections": ["a", "b"]}\n```',
                                     output_tokens=40)])
    llm = make_llm()
    result = await llm.complete('Plan as {"sections": ["string"]}', json=True)

    assert result.json() == {"sections": ["a", "b"]}
    assert len(openai_stub.requests) == 2 and result.attempts == 2
    # Both answers were paid for, though only the second was usable.
    assert sample(registry, "cost_usd_total", provider="openai", model="gpt-4.1") == \
        pytest.approx(2 * result.cost_usd)
    assert openai_stub.requests[0].body["response_format"] == {"type": "json_object"}


async def test_configuration_errors_fail_the_step_for_good(make_llm: MakeLLM) -> None:
    with pytest.raises(LLMFatalError, match="unknown LLM provider 'gemini'"):
        await make_llm().complete("Go.", provider="gemini")
    llm = LLM(LLMConfig(cache="off"), registry=CollectorRegistry(), environ={})
    with pytest.raises(LLMFatalError, match="CONNECT_WORKER_LLM_PROVIDER"):
        await llm.complete("Go.")
