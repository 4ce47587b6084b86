"""The OpenTelemetry side of ``ops/tracing.py``: imported only when tracing is on.

Spans (see docs/observability.md for every attribute):

- ``step {function}``: one per executor request, from its ACK until its reply is
  delivered (acknowledged or flushed), it lost its lease, or the drain gave up on it.
  Its parent is the trace context the gateway sent with the request (``user_trace_ctx``,
  else ``system_trace_ctx``: W3C ``traceparent``/``tracestate`` as JSON), so the steps
  of one run share the run's trace, across replicas and deploys.
- ``drain``: SIGTERM to exit, linked to the spans of the steps it waited for.
- ``session``: one per gateway WebSocket, connect to close.
- ``chat {model}``: one per ``LLM.complete`` call (GenAI semantic conventions).

Step spans are on the engine's hot path, a few per no-op run, and the SDK's live spans
(a lock, and every attribute checked on every call) cost more than the rest of a step's
bookkeeping. So a step span is recorded in a ``StepSpan`` (plain values, events as
they happen) and handed to the batch processor as a finished ``ReadableSpan`` at its
end; the sampler, the id generator and the exporter are the provider's. The other spans
are the SDK's own. Step spans are kept per step object (the engine's callbacks write on
the engine loop; the user loop only reads ``by_request``, in ``enter_step``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, DEFAULT_ON, Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from .. import __version__
from ..config import Config
from ..errors import ConfigError
from ..protocol import ExecutorRequest
from . import logs
from ._otlp import StepAwareExporter, StepSpan, StepSpanEncoder
from .platform_resource import PLATFORM_RESOURCE

if TYPE_CHECKING:
    from .tracing import StepLike

SCOPE = "connect_worker"
CONTENT_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_ATTEMPT = re.compile(rb'"attempt"\s*:\s*(\d+)')
# W3C traceparent (version 00) and tracestate in a JSON carrier, read without parsing it.
_TRACEPARENT = re.compile(
    rb'"traceparent"\s*:\s*"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})"')
_TRACESTATE = re.compile(rb'"tracestate"\s*:\s*"([^"\\]+)"')
_OK = Status(StatusCode.OK)
_UNSET = Status(StatusCode.UNSET)

def build_resource(config: Config, environ: Mapping[str, str]) -> Resource:
    """Ours first, then what OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say (they win)."""
    ours: dict[str, Any] = {
        "service.name": environ.get("RAILWAY_SERVICE_NAME") or "connect-worker",
        "service.instance.id": config.instance_id,
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
        "connect_worker.version": __version__,
    }
    if config.app_version:
        ours["service.version"] = config.app_version
    for variable, key in PLATFORM_RESOURCE:
        value = environ.get(variable)
        if value:
            ours[key] = value
    configured = dict(OTELResourceDetector().detect().attributes)
    return _Resource(Resource.create({**ours, **configured}))


class _Resource(Resource):
    """The process's resource, with its hash computed once: the OTLP encoder groups every
    span by resource, and ``Resource.__hash__`` serialises all its attributes to JSON
    each time. A resource is immutable, so the hash cannot go stale."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource.attributes, resource.schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


def _exporter(environ: Mapping[str, str]) -> SpanExporter:
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console":
        return ConsoleSpanExporter()
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol == "http/protobuf":
        return StepAwareExporter()  # endpoint, headers, timeout...: the SDK reads them
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter as GRPCSpanExporter,
            )
        except ImportError:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs "
                              "opentelemetry-exporter-otlp-proto-grpc installed (or use "
                              "http/protobuf, the default)") from None
        exporter: SpanExporter = GRPCSpanExporter()
        return exporter
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: expected "
                      "http/protobuf (the default) or grpc")


def parent_of(request: ExecutorRequest) -> SpanContext | None:
    """The gateway's span for the request: from ``user_trace_ctx``, else from
    ``system_trace_ctx`` (W3C carriers as JSON), else None (a root span)."""
    for raw in (request.user_trace_ctx, request.system_trace_ctx):
        found = _TRACEPARENT.search(raw) if raw else None
        if found is None:
            continue
        trace_id, span_id = int(found.group(1), 16), int(found.group(2), 16)
        if not trace_id or not span_id:
            continue  # all zeros: invalid
        state = _TRACESTATE.search(raw)
        return SpanContext(
            trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(found.group(3), 16)),
            trace_state=(TraceState.from_header([state.group(1).decode()]) if state
                         else TraceState()))
    return None


def attempt_of(payload: bytes) -> int | None:
    """``ctx.attempt`` from the request body without parsing it all: ``ctx`` is the last
    object Inngest writes, so the last match is its field."""
    at = payload.rfind(b'"attempt"')
    found = _ATTEMPT.match(payload, at) if at >= 0 else None
    return int(found.group(1)) if found is not None else None


def step_name(body: bytes) -> str | None:
    """The name of the step the SDK reported in an opcode list (a NOT_COMPLETED reply)."""
    if not body.startswith(b"["):
        return None
    try:
        ops = json.loads(body)
    except ValueError:
        return None
    for op in ops if isinstance(ops, list) else ():
        if isinstance(op, dict):
            name = op.get("displayName") or op.get("name")
            if isinstance(name, str) and name:
                return name
    return None


def _error_name(body: bytes) -> str:
    try:
        error = json.loads(body)
    except ValueError:
        return "error"
    name = error.get("name") if isinstance(error, dict) else None
    return name if isinstance(name, str) and name else "error"


class Tracing:
    """The tracer provider and the spans that are open."""

    def __init__(self, provider: TracerProvider, processor: BatchSpanProcessor,
                 config: Config, *, capture_content: bool = False,
                 exporter: SpanExporter | None = None) -> None:
        self.provider = provider
        self.processor = processor
        self.tracer = provider.get_tracer(SCOPE, __version__)
        self.scope = InstrumentationScope(SCOPE, __version__)
        self.capture_content = capture_content
        # The sampler's answer without asking it, for the two samplers that need no more
        # than the parent's flag: parentbased_always_on (the default) and always_on, which
        # the SDK builds as these very objects.
        self.follow_parent = provider.sampler is DEFAULT_ON
        self.always = provider.sampler is ALWAYS_ON
        # Finished step spans go to the processor as they are, encoded by hand at export,
        # when the exporter is ours (http/protobuf); else as the SDK's ReadableSpans.
        self.raw_steps = isinstance(exporter, StepAwareExporter) and hasattr(exporter, "_client")
        if self.raw_steps:
            assert isinstance(exporter, StepAwareExporter)
            exporter.encoder = StepSpanEncoder(provider.resource, self.scope)
        self.steps: dict[StepLike, StepSpan] = {}
        # The newest step's span per request id, for user code and log lines.
        self.by_request: dict[str, StepSpan] = {}
        self.handed_back: set[StepLike] = set()
        self.sessions: dict[str, Span] = {}
        self.drain: Span | None = None
        logs.set_trace_lookup(self.log_ids)

    @classmethod
    def from_env(cls, config: Config, environ: Mapping[str, str], *,
                 set_global: bool) -> Tracing:
        # The sampler (OTEL_TRACES_SAMPLER[_ARG]), the exporter's endpoint, headers,
        # timeout and compression and the batch processor's limits come from the SDK's
        # own reading of the environment.
        provider = TracerProvider(resource=build_resource(config, environ))
        exporter = _exporter(environ)
        processor = BatchSpanProcessor(exporter)
        provider.add_span_processor(processor)
        if set_global:
            trace.set_tracer_provider(provider)
        capture = environ.get(CONTENT_VARIABLE, "").strip().lower() in ("true", "1")
        return cls(provider, processor, config, capture_content=capture, exporter=exporter)

    def shutdown(self) -> None:
        logs.set_trace_lookup(None)
        for step in list(self.steps.values()):
            self._end(step)
        for span in self.sessions.values():
            span.end()
        if self.drain is not None:
            self.drain.end()
        self.steps.clear()
        self.by_request.clear()
        self.sessions.clear()
        self.provider.shutdown()

    def force_flush(self) -> None:
        self.provider.force_flush()

    # ----- steps -------------------------------------------------------------------

    def step_started(self, step: StepLike) -> None:
        request = step.request
        attributes: dict[str, Any] = {
            "inngest.app.name": request.app_name,
            "inngest.function.slug": request.function_slug,
            "inngest.run.id": request.run_id,
            "inngest.request.id": request.request_id,
            "inngest.job.id": request.job_id,
            "inngest.step.id": request.step_id or "step",
        }
        attempt = attempt_of(request.request_payload)
        if attempt is not None:
            attributes["inngest.step.attempt"] = attempt
        parent = parent_of(request)
        provider = self.provider
        trace_id = parent.trace_id if parent is not None else (
            provider.id_generator.generate_trace_id())
        if self.always or (self.follow_parent and parent is None):
            sampled = True
        elif self.follow_parent:
            assert parent is not None
            sampled = parent.trace_flags.sampled
        else:
            parent_context = (otel_context.Context() if parent is None
                              else trace.set_span_in_context(NonRecordingSpan(parent)))
            sampled = provider.sampler.should_sample(
                parent_context, trace_id, "step", SpanKind.SERVER
            ).decision is Decision.RECORD_AND_SAMPLE
        context = SpanContext(
            trace_id, provider.id_generator.generate_span_id(), is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
            trace_state=parent.trace_state if parent is not None else TraceState())
        now = time.time_ns()
        span = StepSpan(context, parent, now, attributes, [("ack", now)])
        self.steps[step] = self.by_request[request.request_id] = span

    def step_outcome(self, step: StepLike, outcome: Any) -> None:
        span = self.steps.get(step)
        if span is None:
            return
        label = outcome.label
        span.attributes["connect_worker.step.outcome"] = label
        if label == "error":
            span.status = Status(StatusCode.ERROR, _error_name(outcome.body))
        else:
            span.status = _OK
            name = step_name(outcome.body)
            if name is not None:
                span.attributes["inngest.step.name"] = name

    def step_event(self, step: StepLike, name: str) -> None:
        span = self.steps.get(step)
        if span is None:
            return
        span.events.append((name, time.time_ns()))
        if name == "handed_back":
            self.handed_back.add(step)
            span.attributes["connect_worker.step.outcome"] = "handed_back"
            span.status = Status(StatusCode.ERROR, "handed back by the drain")

    def step_finished(self, step: StepLike, outcome: str | None) -> None:
        span = self.steps.pop(step, None)
        if span is None:
            return
        request_id = step.request.request_id
        if self.by_request.get(request_id) is span:
            del self.by_request[request_id]
        if outcome is not None:
            span.events.append((outcome, time.time_ns()))
            span.attributes["connect_worker.step.outcome"] = outcome
        self._end(span)

    def _end(self, span: StepSpan) -> None:
        """Hand the finished span to the exporter (when sampled)."""
        if not span.context.trace_flags.sampled:
            return
        span.end = time.time_ns()
        if self.raw_steps:
            # The processor reads .context and queues the span; our exporter encodes it.
            self.processor.on_end(cast(ReadableSpan, span))
            return
        self.processor.on_end(ReadableSpan(
            span.name, context=span.context, parent=span.parent, resource=self.provider.resource,
            attributes=span.attributes,
            events=[Event(name, timestamp=at) for name, at in span.events], kind=SpanKind.SERVER,
            status=span.status, start_time=span.start, end_time=span.end,
            instrumentation_scope=self.scope))

    def enter_step(self, request: ExecutorRequest) -> object:
        span = self.by_request.get(request.request_id)
        if span is None:
            return None
        return otel_context.attach(trace.set_span_in_context(NonRecordingSpan(span.context)))

    def exit_step(self, token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    # ----- drain and sessions ------------------------------------------------------

    def drain_started(self, steps: Sequence[StepLike]) -> None:
        now = time.time_ns()
        links = [Link(span.context) for s in steps if (span := self.steps.get(s)) is not None]
        for s in steps:
            span = self.steps.get(s)
            if span is not None:
                span.events.append(("drain.started", now))
        self.drain = self.tracer.start_span("drain", links=links, attributes={
            "connect_worker.drain.steps_in_flight": len(steps),
        })

    def drain_finished(self, exit_code: int) -> None:
        # One worker per process (the CLI's): its drain ends every step span still open.
        span, self.drain = self.drain, None
        # Steps still open: abandoned (not delivered by the deadline, not handed back).
        abandoned = 0
        now = time.time_ns()
        for step, open_span in list(self.steps.items()):
            if step not in self.handed_back:
                abandoned += 1
                open_span.attributes["connect_worker.step.outcome"] = "abandoned"
                open_span.status = Status(StatusCode.ERROR, "abandoned at the drain deadline")
            open_span.events.append(("worker.exit", now))
            self._end(open_span)
        self.steps.clear()
        self.by_request.clear()
        if span is None:
            return
        span.set_attributes({
            "connect_worker.drain.handed_back": len(self.handed_back),
            "connect_worker.drain.abandoned": abandoned,
            "connect_worker.drain.exit_code": exit_code,
        })
        if exit_code != 0:
            span.set_status(Status(StatusCode.ERROR, f"exit code {exit_code}"))
        else:
            span.set_status(Status(StatusCode.OK))
        span.end()

    def session_started(self, session: Any) -> None:
        start = getattr(session, "start", None)
        self.sessions[session.id] = self.tracer.start_span("session", attributes={
            "connect_worker.conn.id": session.id,
            "connect_worker.gateway.group": getattr(start, "gateway_group", "") or "",
        })

    def session_finished(self, session: Any) -> None:
        span = self.sessions.pop(session.id, None)
        if span is None:
            return
        ws = getattr(session, "_ws", None)  # the websockets connection: its close frame
        code = getattr(ws, "close_code", None)
        reason = getattr(ws, "close_reason", None)
        closing = getattr(session, "gateway_closing", None)
        if closing is not None and closing.is_set():
            span.add_event("gateway.closing")
        span.set_attribute("connect_worker.close.code", code if isinstance(code, int) else 1006)
        span.set_attribute("connect_worker.close.reason",
                           reason or ("" if code else "connection lost"))
        span.end()

    # ----- logs --------------------------------------------------------------------

    def log_ids(self, fields: Mapping[str, Any], name: str | None) -> tuple[str, str] | None:
        """The span a log line belongs to: the current one, else the step its
        request_id names, else the drain or session it is about."""
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            request_id = fields.get("request_id")
            step = self.by_request.get(request_id) if isinstance(request_id, str) else None
            if step is not None:
                context = step.context
            else:
                span: Span | None = None
                if name is not None and name.startswith("drain."):
                    span = self.drain
                conn_id = fields.get("conn_id")
                if span is None and isinstance(conn_id, str):
                    span = self.sessions.get(conn_id)
                if span is None:
                    return None
                context = span.get_span_context()
        return trace.format_trace_id(context.trace_id), trace.format_span_id(context.span_id)

    # ----- LLM calls ---------------------------------------------------------------

    @contextmanager
    def llm_span(self, call: Any) -> Iterator[None]:
        from . import _genai

        with _genai.llm_span(self, call):
            yield

    def llm_answered(self, result: Any, outcome: str) -> None:
        from . import _genai

        _genai.answered(self, result, outcome)
