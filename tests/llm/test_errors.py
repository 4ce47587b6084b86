"""Errors retrying cannot fix become inngest.NonRetriableError; keys never leak."""

from __future__ import annotations

import logging
import sys

import inngest
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from connect_worker.llm import (
    LLM,
    AnthropicProvider,
    LLMConfig,
    LLMFatalError,
    OpenAIProvider,
    Provider,
)

from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .util import SECRET, sample

CASES = [
    ("openai", Reply(status=401, error=f"Incorrect API key provided: {SECRET}.",
                     error_code="invalid_api_key"), "rejected the API key.*OPENAI_API_KEY"),
    ("anthropic", Reply(status=401, error="invalid x-api-key",
                        error_code="authentication_error"), "ANTHROPIC_API_KEY"),
    ("openai", Reply(status=400, error="This model's maximum context length is 128000 tokens.",
                     error_code="context_length_exceeded"), "too long.*shorten the input"),
    ("anthropic", Reply(status=400, error="prompt is too long: 210000 tokens > 200000 maximum",
                        error_code="invalid_request_error"), "too long"),
    ("openai", Reply(status=400, error="Invalid value for 'temperature'.",
                     error_code="invalid_value"), "invalid.*temperature"),
    ("openai", Reply(status=404, error="The model does not exist"), "does not know model"),
    ("openai", Reply(refusal="I can't help with that."), "refused to answer"),
    ("openai", Reply(stop_reason="content_filter"), "refused to answer"),
    ("anthropic", Reply(stop_reason="refusal"), "refused to answer"),
]


@pytest.mark.parametrize(("provider", "reply", "message"), CASES)
@pytest.mark.parametrize("stream", [False, True])
async def test_fatal_errors_are_not_retried(
        provider: str, reply: Reply, message: str, stream: bool, make_llm: MakeLLM,
        openai_stub: StubProvider, anthropic_stub: StubProvider,
        registry: CollectorRegistry) -> None:
    stub = openai_stub if provider == "openai" else anthropic_stub
    stub.script.append(reply)
    llm = make_llm(provider=provider)
    with pytest.raises(LLMFatalError, match=message) as caught:
        await llm.complete("Go.", stream=stream)

    assert isinstance(caught.value, inngest.NonRetriableError)
    assert len(stub.requests) == 1
    model = llm.config.model or ""
    assert sample(registry, "requests_total", provider=provider, model=model,
                  outcome="fatal") == 1
    assert sample(registry, "retries_total", provider=provider, model=model) == 0


async def test_api_keys_never_reach_errors_logs_or_metrics(
        make_llm: MakeLLM, openai_stub: StubProvider, registry: CollectorRegistry,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"key {SECRET} (also sk-proj-AbCdEf123456789) is not allowed"
    openai_stub.script.extend([Reply(status=500, error=echo), Reply(status=400, error=echo),
                               Reply(status=401, error=echo), Reply(status=403, error=echo)])
    llm = make_llm()
    errors: list[str] = []
    for _ in range(3):
        with pytest.raises(LLMFatalError) as caught:
            await llm.complete("Go.")
        errors.append(str(caught.value))

    logged = "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    exported = generate_latest(registry).decode()
    for text in (*errors, logged, exported):
        assert SECRET not in text and "AbCdEf123456789" not in text
    assert "[redacted]" in errors[0]  # the provider's words are kept, the key is not


@pytest.mark.parametrize(("provider", "env"), [("openai", "OPENAI_API_KEY"),
                                               ("anthropic", "ANTHROPIC_API_KEY")])
async def test_a_missing_api_key_names_the_variable(
        provider: str, env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object,
        openai_stub: StubProvider, anthropic_stub: StubProvider) -> None:
    for var in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    providers: dict[str, Provider] = {
        "openai": OpenAIProvider(base_url=openai_stub.base_url),
        "anthropic": AnthropicProvider(base_url=anthropic_stub.base_url)}
    llm = LLM(LLMConfig(provider=provider, cache="off"), registry=CollectorRegistry(),
              providers=providers)
    with pytest.raises(LLMFatalError, match=f"set {env}"):
        await llm.complete("Go.")
    assert not openai_stub.requests and not anthropic_stub.requests


@pytest.mark.parametrize(("module", "extra", "load"), [
    ("openai", "openai", "connect_worker.llm.providers:_import_openai"),
    ("anthropic", "anthropic", "connect_worker.llm.providers:_import_anthropic"),
    ("psycopg", "postgres", "connect_worker.llm.cache:_import_psycopg"),
])
def test_a_missing_optional_client_is_one_line_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str, load: str
) -> None:
    import importlib

    from connect_worker.llm.errors import LLMFatalError

    path, _, name = load.partition(":")
    importer = getattr(importlib.import_module(path), name)
    assert importer().__name__ == module  # installed here (the dev group has them)
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like
    with pytest.raises(LLMFatalError) as raised:
        importer()
    message = str(raised.value)
    assert "\n" not in message and f"pip install 'connect-worker[{extra}]'" in message
