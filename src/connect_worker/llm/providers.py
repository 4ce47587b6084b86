"""Adapters over the official ``openai`` and ``anthropic`` SDK clients.

Each adapter turns a :class:`Call` into one HTTP request (JSON or SSE stream) and the
response into an :class:`Answer`; SDK exceptions are mapped here, once, to
:class:`Transient` (worth retrying) or :class:`LLMFatalError` (not). The SDKs' own
retries are off (``max_retries=0``): retries live in one place, the client's tenacity
loop, so they cannot multiply. SDK clients are created lazily, one per event loop
(an HTTP connection pool belongs to the loop that opened it), and read their API key
and base URL from the environment as usual (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from .errors import LLMFatalError, Transient, missing_extra
from .types import Answer, Call, ToolCall, Usage

OnText = Callable[[str], None]
ShouldStop = Callable[[], bool]


class Provider(Protocol):
    name: str

    async def send(
        self, call: Call, *, attempt_timeout: float, stream: bool, on_text: OnText | None,
        should_stop: ShouldStop | None,
    ) -> Answer: ...


# OpenAI (sk-..., sk-proj-...) and Anthropic (sk-ant-...) keys.
_KEY_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{8,}")


def scrub(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove API keys (the configured ones and anything shaped like one) from ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _KEY_PATTERN.sub("[redacted]", text)
    return text if len(text) <= 300 else text[:297] + "..."


def retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date)."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(float(ms) / 1000, 0.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(float(value), 0.0)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(when.timestamp() - time.time(), 0.0)
    except (TypeError, ValueError, AttributeError):
        return None


def _provider_message(body: object) -> tuple[str, str]:
    """(message, code) from an OpenAI- or Anthropic-shaped error body."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            code = str(err.get("code") or err.get("type") or "")
            return str(err.get("message") or ""), code
    return "", ""


_TOO_LONG = ("context_length_exceeded", "prompt is too long", "maximum context length",
             "too many tokens", "context window")
_POLICY = ("content_policy", "content_filter", "safety")
_TRANSIENT = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}


@contextmanager
def map_errors(sdk: Any, label: str, key_env: str, model: str, secrets: tuple[str, ...]
               ) -> Iterator[None]:
    """Translate ``sdk``'s exceptions (openai and anthropic share one shape) once, here."""
    try:
        yield
    except sdk.APITimeoutError:
        raise Transient(f"{label} timed out", maybe_billed=True) from None
    except sdk.APIConnectionError:
        raise Transient(f"could not connect to {label}") from None
    except sdk.APIResponseValidationError:
        raise Transient(f"{label} sent a malformed response") from None
    except sdk.APIStatusError as exc:
        status: int = exc.status_code
        message, code = _provider_message(exc.body)
        said = scrub(message, secrets)
        detail = f" ({label} said: {said})" if said else ""
        # status < 400: an error event inside a 200 stream (Anthropic maps it this way).
        if status in (408, 409, 429) or status >= 500 or status < 400 or code in _TRANSIENT:
            raise Transient(f"{label} answered HTTP {status}{detail}",
                            retry_after=retry_after(exc.response.headers)) from None
        if status == 401:
            # The body may echo part of the key, so it is not repeated here.
            raise LLMFatalError(f"{label} rejected the API key (HTTP 401): set {key_env} to a "
                                "valid key", provider=label, status=status) from None
        if status == 403:
            raise LLMFatalError(f"{label} refused access (HTTP 403): the key in {key_env} may "
                                f"not be allowed to use model {model!r}{detail}",
                                provider=label, status=status) from None
        if status == 404:
            raise LLMFatalError(f"{label} does not know model {model!r} (HTTP 404): check the "
                                f"model name{detail}", provider=label, status=status) from None
        lowered = f"{message} {code}".lower()
        if status == 413 or any(marker in lowered for marker in _TOO_LONG):
            raise LLMFatalError(f"the prompt is too long for {model!r} (HTTP {status}): shorten "
                                f"the input or lower max_tokens{detail}",
                                provider=label, status=status) from None
        if any(marker in lowered for marker in _POLICY):
            raise LLMFatalError(f"{label} refused the content (HTTP {status}): rephrase the "
                                f"prompt{detail}", provider=label, status=status) from None
        raise LLMFatalError(f"{label} rejected the request as invalid (HTTP {status}){detail}",
                            provider=label, status=status) from None
    except sdk.APIError as exc:
        # An error event inside an SSE stream (e.g. overloaded): no status, worth retrying.
        raise Transient(f"{label} stream failed: {scrub(str(exc), secrets)}") from None
    except json.JSONDecodeError:
        raise Transient(f"{label} sent a malformed response") from None


def _refused(label: str, model: str, reason: str) -> LLMFatalError:
    return LLMFatalError(f"{model!r} refused to answer ({reason}): rephrase the prompt or "
                         "use another model", provider=label)


class _PerLoop:
    """One SDK client per event loop; clients are dropped with their loop."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = self._factory()
        return client


def _check_credentials(label: str, client_kwargs: dict[str, Any], *env_vars: str) -> None:
    """Fail the step for good, naming the variable, when no credentials are configured
    (explicit client options, e.g. another auth method, are trusted as they are)."""
    if not client_kwargs.get("api_key") and not any(os.environ.get(v) for v in env_vars):
        raise LLMFatalError(f"no {label} API key: set {env_vars[0]}", provider=label)


def _import_openai() -> Any:
    try:
        import openai
    except ImportError:
        raise missing_extra("openai", "openai") from None
    return openai


def _import_anthropic() -> Any:
    try:
        import anthropic
    except ImportError:
        raise missing_extra("anthropic", "anthropic") from None
    return anthropic


class OpenAIProvider:
    name = "openai"
    label = "OpenAI"
    key_env = "OPENAI_API_KEY"

    def __init__(self, **client_kwargs: Any) -> None:
        def create() -> Any:
            openai = _import_openai()  # loaded on first use: it takes ~0.4 s to import

            if not {"workload_identity", "admin_api_key"} & client_kwargs.keys():
                _check_credentials(self.label, client_kwargs, self.key_env)
            return openai.AsyncOpenAI(max_retries=0, **client_kwargs)

        self._clients = _PerLoop(create)
        self._secrets = (str(client_kwargs.get("api_key") or os.environ.get(self.key_env, "")),)

    def _params(self, call: Call) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if call.system:
            messages.append({"role": "system", "content": call.system})
        messages += [{"role": m.role, "content": m.content} for m in call.messages]
        params: dict[str, Any] = {"model": call.model, "messages": messages,
                                  "max_completion_tokens": call.max_tokens}
        if call.temperature is not None:
            params["temperature"] = call.temperature
        if call.tools:
            params["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.parameters}}
                for t in call.tools]
        if call.json_output:
            params["response_format"] = {"type": "json_object"}
        return params

    async def send(
        self, call: Call, *, attempt_timeout: float, stream: bool, on_text: OnText | None,
        should_stop: ShouldStop | None,
    ) -> Answer:
        openai = _import_openai()
        client = self._clients.get()
        with map_errors(openai, self.label, self.key_env, call.model, self._secrets):
            if stream:
                return await self._stream(client, call, attempt_timeout, on_text, should_stop)
            completion = await client.chat.completions.create(**self._params(call),
                                                              timeout=attempt_timeout)
        if not completion.choices:
            raise Transient(f"{self.label} sent a response without choices")
        choice = completion.choices[0]
        if choice.message.refusal or choice.finish_reason == "content_filter":
            raise _refused(self.label, call.model, choice.message.refusal or "content filter")
        calls = tuple(
            ToolCall(tc.id, tc.function.name, _arguments(tc.function.arguments))
            for tc in choice.message.tool_calls or () if tc.type == "function"
        )
        return Answer(choice.message.content or "", _openai_usage(completion.usage),
                      completion._request_id, completion.model, choice.finish_reason, calls)

    async def _stream(self, client: Any, call: Call, limit: float, on_text: OnText | None,
                      should_stop: ShouldStop | None) -> Answer:
        events = await client.chat.completions.create(
            **self._params(call), stream=True, stream_options={"include_usage": True},
            timeout=limit)
        text: list[str] = []
        tools: dict[int, dict[str, str]] = {}
        usage, finish, model, partial = Usage(), None, call.model, False
        try:
            async for chunk in events:
                model = chunk.model or model
                if chunk.usage is not None:
                    usage = _openai_usage(chunk.usage)
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    if choice.delta.refusal:
                        raise _refused(self.label, call.model, choice.delta.refusal)
                    if choice.delta.content:
                        text.append(choice.delta.content)
                        if on_text is not None:
                            on_text(choice.delta.content)
                    for tc in choice.delta.tool_calls or ():
                        slot = tools.setdefault(tc.index, {"id": "", "name": "", "args": ""})
                        slot["id"] = tc.id or slot["id"]
                        if tc.function is not None:
                            slot["name"] += tc.function.name or ""
                            slot["args"] += tc.function.arguments or ""
                if should_stop is not None and should_stop() and finish is None:
                    partial = True
                    break
        finally:
            await events.close()
        if finish == "content_filter":
            raise _refused(self.label, call.model, "content filter")
        if partial:
            usage = _estimate(call, "".join(text))
        calls = tuple(ToolCall(t["id"], t["name"], _arguments(t["args"]))
                      for _, t in sorted(tools.items()))
        return Answer("".join(text), usage, events.response.headers.get("x-request-id"), model,
                      "drain" if partial else finish, calls, partial)


class AnthropicProvider:
    name = "anthropic"
    label = "Anthropic"
    key_env = "ANTHROPIC_API_KEY"

    def __init__(self, **client_kwargs: Any) -> None:
        def create() -> Any:
            anthropic = _import_anthropic()  # loaded on first use: it takes ~1 s to import

            if not {"auth_token", "credentials"} & client_kwargs.keys():
                _check_credentials(self.label, client_kwargs, self.key_env,
                                   "ANTHROPIC_AUTH_TOKEN")
            return anthropic.AsyncAnthropic(max_retries=0, **client_kwargs)

        self._clients = _PerLoop(create)
        self._secrets = (str(client_kwargs.get("api_key") or os.environ.get(self.key_env, "")),)

    def _params(self, call: Call) -> dict[str, Any]:
        system = call.system or ""
        if call.json_output:
            # The Messages API has no JSON mode; ask for it and validate the answer.
            system = (system + "\n\n" if system else "") + (
                "Answer with one JSON object and nothing else: no prose, no code fences.")
        params: dict[str, Any] = {
            "model": call.model, "max_tokens": call.max_tokens,
            "messages": [{"role": m.role, "content": m.content} for m in call.messages]}
        if system:
            params["system"] = system
        if call.temperature is not None:
            params["temperature"] = call.temperature
        if call.tools:
            params["tools"] = [{"name": t.name, "description": t.description,
                                "input_schema": t.parameters} for t in call.tools]
        return params

    async def send(
        self, call: Call, *, attempt_timeout: float, stream: bool, on_text: OnText | None,
        should_stop: ShouldStop | None,
    ) -> Answer:
        anthropic = _import_anthropic()
        client = self._clients.get()
        with map_errors(anthropic, self.label, self.key_env, call.model, self._secrets):
            if stream:
                return await self._stream(client, call, attempt_timeout, on_text, should_stop)
            message = await client.messages.create(**self._params(call),
                                                   timeout=attempt_timeout)
        if message.stop_reason == "refusal":
            raise _refused(self.label, call.model, "stop_reason refusal")
        text = "".join(b.text for b in message.content if b.type == "text")
        calls = tuple(ToolCall(b.id, b.name, dict(b.input))
                      for b in message.content if b.type == "tool_use")
        return Answer(text, _anthropic_usage(message.usage), message._request_id, message.model,
                      message.stop_reason, calls)

    async def _stream(self, client: Any, call: Call, limit: float, on_text: OnText | None,
                      should_stop: ShouldStop | None) -> Answer:
        events = await client.messages.create(**self._params(call), stream=True,
                                              timeout=limit)
        text: list[str] = []
        tools: dict[int, dict[str, str]] = {}
        usage_in: Any = None
        out_tokens, stop, model, partial = 0, None, call.model, False
        try:
            async for event in events:
                if event.type == "message_start":
                    usage_in, model = event.message.usage, event.message.model
                elif event.type == "content_block_start" and event.content_block.type == "tool_use":
                    tools[event.index] = {"id": event.content_block.id,
                                          "name": event.content_block.name, "args": ""}
                elif event.type == "content_block_delta":
                    if event.delta.type == "text_delta":
                        text.append(event.delta.text)
                        if on_text is not None:
                            on_text(event.delta.text)
                    elif event.delta.type == "input_json_delta":
                        tools[event.index]["args"] += event.delta.partial_json
                elif event.type == "message_delta":
                    stop = event.delta.stop_reason
                    out_tokens = event.usage.output_tokens
                if should_stop is not None and should_stop() and stop is None:
                    partial = True
                    break
        finally:
            await events.close()
        if stop == "refusal":
            raise _refused(self.label, call.model, "stop_reason refusal")
        usage = _anthropic_usage(usage_in, out_tokens) if usage_in is not None else Usage()
        if partial:
            usage = Usage(usage.input_tokens, _estimate(call, "".join(text)).output_tokens,
                          usage.cached_tokens, usage.cache_write_tokens)
        calls = tuple(ToolCall(t["id"], t["name"], _arguments(t["args"]))
                      for _, t in sorted(tools.items()))
        return Answer("".join(text), usage, events.response.headers.get("request-id"), model,
                      "drain" if partial else stop, calls, partial)


def _arguments(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError:
        raise Transient("the model sent malformed tool arguments") from None
    return value if isinstance(value, dict) else {"value": value}


def _openai_usage(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return Usage(usage.prompt_tokens, usage.completion_tokens, cached)


def _anthropic_usage(usage: Any, output_tokens: int | None = None) -> Usage:
    cached = usage.cache_read_input_tokens or 0
    written = usage.cache_creation_input_tokens or 0
    out = usage.output_tokens if output_tokens is None else output_tokens
    return Usage(usage.input_tokens + cached + written, out or 0, cached, written)


def _estimate(call: Call, text: str) -> Usage:
    """A rough count (4 characters a token) for a stream cut short before usage arrived."""
    prompt = sum(len(m.content) for m in call.messages) + len(call.system or "")
    return Usage(prompt // 4, len(text) // 4)
