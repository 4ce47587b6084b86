"""``LLM.complete`` calls as OpenTelemetry GenAI client spans (imported only when on).

Follows the GenAI semantic conventions (``gen_ai.*``, v1.37 and later): span name
``{gen_ai.operation.name} {gen_ai.request.model}``, kind CLIENT. An answer that cost
nothing this time (``cached``: from the result cache; ``waited``: another copy's claim
answered it) carries no ``gen_ai.usage.*``, so that tools which add up usage do not count
the same tokens twice; what it saved is in ``connect_worker.llm.saved_*``.

When an OpenTelemetry instrumentation of the provider's SDK is active (the official
``opentelemetry-instrumentation-openai-v2``, OpenLLMetry's OpenAI/Anthropic ones), it
records each HTTP request as a GenAI span already: ours is then an INTERNAL span named
``connect_worker.llm {model}`` without ``gen_ai.operation.name`` or usage, the parent of
theirs (one per attempt), so no model call is counted twice.

Prompts and answers are recorded only with
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (the conventions' opt-in),
with key-shaped strings masked; keys themselves are never read here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .logs import redact

if TYPE_CHECKING:
    from ._otel import Tracing

# The call's span, and whether an SDK instrumentation records its HTTP requests.
_current: ContextVar[tuple[Span, bool] | None] = ContextVar("connect_worker_llm_span",
                                                           default=None)
# Our Call's finish reasons as the conventions spell them.
_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
           "tool_use": "tool_calls"}


# The official OpenAI / Anthropic instrumentations (and OpenLLMetry's) wrap these
# methods with wrapt (``wrap_function_wrapper``), whose wrappers carry ``_self_wrapper``
# (``__wrapped__`` would not do: the SDKs' own decorators set it too).
_INSTRUMENTED_METHODS = {
    "openai": ("openai.resources.chat.completions", "AsyncCompletions", "create"),
    "anthropic": ("anthropic.resources.messages", "AsyncMessages", "create"),
}


def instrumented(provider: str) -> bool:
    """Whether an OpenTelemetry instrumentation wraps the provider SDK's call already."""
    import sys

    where = _INSTRUMENTED_METHODS.get(provider)
    if where is None:
        return False
    module = sys.modules.get(where[0])
    cls = getattr(module, where[1], None)
    method = vars(cls).get(where[2]) if cls is not None else None
    return hasattr(method, "_self_wrapper")


def _messages(call: Any) -> str:
    return json.dumps([{"role": m.role, "parts": [{"type": "text", "content": redact(m.content)}]}
                       for m in call.messages])


@contextmanager
def llm_span(tracing: Tracing, call: Any) -> Iterator[None]:
    theirs = instrumented(call.provider)
    attributes: dict[str, Any] = {
        "gen_ai.provider.name": call.provider,
        "gen_ai.request.model": call.model,
        "gen_ai.request.max_tokens": call.max_tokens,
        "gen_ai.output.type": "json" if call.json_output else "text",
    }
    if call.temperature is not None:
        attributes["gen_ai.request.temperature"] = call.temperature
    if not theirs:
        attributes["gen_ai.operation.name"] = "chat"
    if tracing.capture_content:
        attributes["gen_ai.input.messages"] = _messages(call)
        if call.system:
            attributes["gen_ai.system_instructions"] = json.dumps(
                [{"type": "text", "content": redact(call.system)}])
    name = f"connect_worker.llm {call.model}" if theirs else f"chat {call.model}"
    kind = SpanKind.INTERNAL if theirs else SpanKind.CLIENT
    with tracing.tracer.start_as_current_span(name, kind=kind, attributes=attributes,
                                              record_exception=False,
                                              set_status_on_exception=False) as span:
        span.set_attribute("connect_worker.llm.instrumented_sdk", theirs)
        token = _current.set((span, theirs))
        try:
            yield
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            _current.reset(token)


def answered(tracing: Tracing, result: Any, outcome: str) -> None:
    current = _current.get()
    if current is None or not current[0].is_recording():
        return
    span, theirs = current
    reused = outcome in ("cached", "waited")
    usage = result.usage
    attributes: dict[str, Any] = {
        "connect_worker.llm.outcome": outcome,
        "connect_worker.llm.cached": outcome == "cached",
        "connect_worker.llm.waited_for_claim": outcome == "waited",
        "connect_worker.llm.resumed": outcome == "resumed",
        "connect_worker.llm.stopped_early": bool(result.stopped_early),
        "connect_worker.llm.attempts": result.attempts,
        "gen_ai.response.model": result.model,
    }
    if result.request_id:
        attributes["gen_ai.response.id"] = result.request_id
    if result.stop_reason:
        attributes["gen_ai.response.finish_reasons"] = [
            _FINISH.get(result.stop_reason, result.stop_reason)]
    if reused:
        attributes["connect_worker.llm.saved_usd"] = result.cost_usd
        attributes["connect_worker.llm.saved_input_tokens"] = usage.input_tokens
        attributes["connect_worker.llm.saved_output_tokens"] = usage.output_tokens
        attributes["connect_worker.llm.cost_usd"] = 0.0
    else:
        attributes["connect_worker.llm.cost_usd"] = result.cost_usd
        if not theirs:
            attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
            if usage.cached_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.cache_write_tokens:
                attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
    if tracing.capture_content:
        attributes["gen_ai.output.messages"] = json.dumps([{
            "role": "assistant", "parts": [{"type": "text", "content": redact(result.text)}],
            "finish_reason": _FINISH.get(result.stop_reason or "", result.stop_reason or "stop"),
        }])
    span.set_attributes(attributes)
