"""LLM.complete calls as GenAI client spans, through the real OTLP/HTTP exporter."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from connect_worker.config import Config
from connect_worker.ops import tracing

from ..otlp_receiver import Receiver
from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .util import SECRET, serving


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    found = Receiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", found.endpoint)
    monkeypatch.delenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", raising=False)
    try:
        yield found
    finally:
        tracing.shutdown()
        found.stop()


def start_tracing() -> None:
    tracing.setup(Config(dev=True, instance_id="llm-test"), os.environ, set_global=False)


async def test_a_cached_answer_is_a_span_with_no_model_request_and_no_usage(
        receiver: Receiver, make_llm: MakeLLM, openai_stub: StubProvider) -> None:
    start_tracing()
    openai_stub.script.append(Reply(text="the intro"))
    llm = make_llm()
    with serving(job_id="job-1", request_id="req-1", run_id="run-9"):
        paid = await llm.complete("Draft the intro.", temperature=0.5, max_tokens=200)
    with serving(job_id="job-1", request_id="req-2", run_id="run-9"):  # the step's retry
        reused = await llm.complete("Draft the intro.", temperature=0.5, max_tokens=200)
    tracing.shutdown()
    assert reused.cached and reused.text == paid.text == "the intro"
    assert len(openai_stub.requests) == 1  # no new model request

    first, second = receiver.named("chat ")
    for span in (first, second):
        a = span.attributes
        assert span.name == "chat gpt-4.1" and span.kind == "CLIENT"
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "openai"
        assert a["gen_ai.request.model"] == "gpt-4.1"
        assert a["gen_ai.request.temperature"] == 0.5
        assert a["gen_ai.request.max_tokens"] == 200
        assert a["gen_ai.response.id"] == paid.request_id
        assert a["gen_ai.response.finish_reasons"] == ["stop"]
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a
    assert first.attributes["connect_worker.llm.cached"] is False
    assert first.attributes["gen_ai.usage.input_tokens"] == paid.usage.input_tokens
    assert first.attributes["gen_ai.usage.output_tokens"] == paid.usage.output_tokens
    assert first.attributes["connect_worker.llm.cost_usd"] == pytest.approx(paid.cost_usd)
    assert first.attributes["connect_worker.llm.attempts"] == 1
    # The cached one: nothing paid, so no usage that a backend would add up twice.
    assert second.attributes["connect_worker.llm.cached"] is True
    assert second.attributes["connect_worker.llm.outcome"] == "cached"
    assert second.attributes["connect_worker.llm.cost_usd"] == 0.0
    assert second.attributes["connect_worker.llm.saved_usd"] == pytest.approx(paid.cost_usd)
    assert "gen_ai.usage.input_tokens" not in second.attributes
    assert second.attributes["connect_worker.llm.attempts"] == 0
    # Never a key, anywhere in what was exported.
    assert SECRET not in json.dumps([s.attributes for s in receiver.spans], default=str)


async def test_message_content_only_when_opted_in(
        receiver: Receiver, make_llm: MakeLLM, openai_stub: StubProvider,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    start_tracing()
    openai_stub.script.append(Reply(text="42"))
    with serving(job_id="job-2", request_id="req-1"):
        await make_llm().complete(f"What is it? (my key is {SECRET})", system="Be brief.")
    tracing.shutdown()
    [span] = receiver.named("chat ")
    sent = json.loads(span.attributes["gen_ai.input.messages"])
    assert sent[0]["role"] == "user" and "What is it?" in sent[0]["parts"][0]["content"]
    assert SECRET not in span.attributes["gen_ai.input.messages"]  # key-shaped: masked
    assert json.loads(span.attributes["gen_ai.system_instructions"])[0]["content"] == "Be brief."
    answer = json.loads(span.attributes["gen_ai.output.messages"])
    assert answer[0]["parts"][0]["content"] == "42"


async def test_a_failed_call_is_an_error_span(
        receiver: Receiver, make_llm: MakeLLM, openai_stub: StubProvider) -> None:
    start_tracing()
    openai_stub.script.append(Reply(status=400, error="bad request"))
    with serving(job_id="job-3", request_id="req-1"), pytest.raises(Exception) as raised:
        await make_llm().complete("Hello")
    tracing.shutdown()
    [span] = receiver.named("chat ")
    assert span.status == "ERROR"
    assert span.attributes["error.type"] == type(raised.value).__qualname__


async def test_under_an_sdk_instrumentation_ours_is_the_parent_without_usage(
        receiver: Receiver, make_llm: MakeLLM, openai_stub: StubProvider) -> None:
    """What opentelemetry-instrumentation-openai-v2 does to the SDK (wrapt, as it does),
    with a wrapper that records its own GenAI span per HTTP request."""
    import openai.resources.chat.completions as completions
    from opentelemetry import trace

    original = vars(completions.AsyncCompletions)["create"]
    spans: list[str] = []

    class FunctionWrapper:  # the shape of wrapt's: the SDK call traced already
        _self_wrapper = True

        def __get__(self, instance: object, owner: type) -> object:
            bound = original.__get__(instance, owner)

            async def create(*args: object, **kwargs: object) -> object:
                parent = trace.get_current_span().get_span_context()
                spans.append(f"{parent.span_id:016x}")
                return await bound(*args, **kwargs)
            return create

    start_tracing()
    completions.AsyncCompletions.create = FunctionWrapper()  # type: ignore[assignment,method-assign]
    try:
        with serving(job_id="job-4", request_id="req-1"):
            await make_llm().complete("Hello")
    finally:
        completions.AsyncCompletions.create = original  # type: ignore[method-assign]
    tracing.shutdown()
    [span] = receiver.spans
    assert span.name == "connect_worker.llm gpt-4.1" and span.kind == "INTERNAL"
    assert "gen_ai.operation.name" not in span.attributes
    assert "gen_ai.usage.input_tokens" not in span.attributes
    assert span.attributes["connect_worker.llm.instrumented_sdk"] is True
    assert span.attributes["connect_worker.llm.cost_usd"] > 0
    assert spans == [span.span_id]  # the instrumentation's span would be our child
