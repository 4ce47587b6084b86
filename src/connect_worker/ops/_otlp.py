"""Step spans encoded as OTLP protobuf by hand, and the OTLP/HTTP exporter that sends them.

Step spans are a few per no-op run, and the SDK's encoder builds a protobuf object per
span, attribute and event, then serialises them: about half of a step span's whole cost.
A step span's message has a fixed shape (ids, times, a few string or int attributes,
named events, a status), so its bytes are written here directly, like the Connect frames
(``protocol``); the resource and instrumentation scope are encoded once, by the SDK's own
encoder. tests/engine/test_tracing.py checks that the bytes decode to the same message
the SDK's encoder builds. Other spans (session, drain, LLM calls) still go through the
SDK's encoder; both halves travel in one request (concatenated protobuf messages merge,
their repeated fields appended).

The exporter is the SDK's ``OTLPSpanExporter`` (it reads OTEL_EXPORTER_OTLP_* endpoint,
headers, timeout, compression, certificates), with ``export`` replaced to encode the two
kinds of span, then send through the SDK's own HTTP client.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from ..protocol.codec import varint

_UNSET = Status(StatusCode.UNSET)
_Q = struct.Struct("<Q").pack
_D = struct.Struct("<d").pack
# Span.flags (fixed32, field 16): the SDK's SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, with
# SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK when the parent is remote (a step's parent always is).
_FLAGS_ROOT = b"\x85\x01" + struct.pack("<I", 0x100)
_FLAGS_REMOTE = b"\x85\x01" + struct.pack("<I", 0x300)
_KIND_SERVER = b"\x30\x02"


@dataclass(eq=False, slots=True)
class StepSpan:
    """A step's span: open while ``end`` is 0 (see ``_otel``'s module docstring)."""

    context: SpanContext
    parent: SpanContext | None
    start: int
    attributes: dict[str, Any]
    events: list[tuple[str, int]] = field(default_factory=list)  # (name, time in ns)
    status: Status = _UNSET
    end: int = 0

    @property
    def name(self) -> str:
        return f"step {self.attributes['inngest.function.slug']}"


def _len(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else varint(n)) + payload


def _string(tag: bytes, text: str) -> bytes:
    return _len(tag, text.encode())


def _any_value(value: Any) -> bytes:
    """An AnyValue (string, bool, int or double; what step attributes hold)."""
    if isinstance(value, str):
        return _string(b"\x0a", value)
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement
    if isinstance(value, float):
        return b"\x21" + _D(value)
    return _string(b"\x0a", str(value))


_keys: dict[str, bytes] = {}  # attribute key -> its KeyValue.key field
_events: dict[str, bytes] = {}  # event name -> its Event.name field


_BYTE = [bytes((i,)) for i in range(0x80)]  # one-byte lengths, without building bytes


def _attributes(parts: list[bytes], attributes: dict[str, Any]) -> None:
    """Append each attribute's KeyValue field (9) to ``parts``, joined once per span: a
    short string value, most of them, as eight pieces without intermediate bytes."""
    for key, value in attributes.items():
        encoded = _keys.get(key)
        if encoded is None:
            encoded = _keys[key] = _string(b"\x0a", key)
        if type(value) is str:
            text = value.encode()
            n = len(text)
            size = len(encoded) + n + 4
            if size < 0x80:
                parts += (b"\x4a", _BYTE[size], encoded, b"\x12", _BYTE[n + 2], b"\x0a",
                          _BYTE[n], text)
                continue
        parts.append(_len(b"\x4a", encoded + _len(b"\x12", _any_value(value))))


def _event(name: str, at: int) -> bytes:
    encoded = _events.get(name)
    if encoded is None:
        encoded = _events[name] = _string(b"\x12", name)
    size = len(encoded) + 9
    if size < 0x80:
        return b"".join((b"\x5a", _BYTE[size], b"\x09", _Q(at), encoded))
    return _len(b"\x5a", b"\x09" + _Q(at) + encoded)


def _status(status: Status) -> bytes:
    body = b""
    if status.description:
        body += _string(b"\x12", status.description)
    code = status.status_code.value
    if code:
        body += b"\x18" + bytes((code,))
    return _len(b"\x7a", body)


def encode_step(span: StepSpan) -> bytes:
    """One step span as an OTLP ``Span`` message, field 2 of its ``ScopeSpans``."""
    context = span.context
    parent = span.parent
    parts = [
        b"\x0a\x10", context.trace_id.to_bytes(16, "big"),
        b"\x12\x08", context.span_id.to_bytes(8, "big"),
    ]
    if context.trace_state:
        parts.append(_string(b"\x1a", context.trace_state.to_header()))
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts += (_string(b"\x2a", span.name), _KIND_SERVER, b"\x39", _Q(span.start),
              b"\x41", _Q(span.end))
    _attributes(parts, span.attributes)
    parts += [_event(name, at) for name, at in span.events]
    parts += (_status(span.status), _FLAGS_REMOTE if parent is not None and parent.is_remote
              else _FLAGS_ROOT)
    return _len(b"\x12", b"".join(parts))


def _resource_and_scope(resource: Resource, scope: InstrumentationScope) -> tuple[bytes, bytes]:
    """The parts of a ResourceSpans around its spans, encoded once by the SDK's encoder:
    (ResourceSpans' resource field, ScopeSpans' scope field), schema URLs included."""
    probe = ReadableSpan("probe", context=SpanContext(1, 1, False, TraceFlags(1)),
                         resource=resource, instrumentation_scope=scope, kind=SpanKind.SERVER)
    resource_spans = encode_spans([probe]).resource_spans[0]
    scope_spans = resource_spans.scope_spans[0]
    head = _len(b"\x0a", resource_spans.resource.SerializeToString())
    if resource_spans.schema_url:
        head += _string(b"\x1a", resource_spans.schema_url)
    scope_head = _len(b"\x0a", scope_spans.scope.SerializeToString())
    if scope_spans.schema_url:
        scope_head += _string(b"\x1a", scope_spans.schema_url)
    return head, scope_head


class StepSpanEncoder:
    """Step spans of one resource and scope as an ExportTraceServiceRequest."""

    def __init__(self, resource: Resource, scope: InstrumentationScope) -> None:
        self.head, self.scope_head = _resource_and_scope(resource, scope)

    def encode(self, spans: Sequence[StepSpan]) -> bytes:
        scope_spans = _len(b"\x12", self.scope_head + b"".join(map(encode_step, spans)))
        return _len(b"\x0a", self.head + scope_spans)


class StepAwareExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter, also taking ``StepSpan`` s (see the docstring)."""

    # Set by Tracing, once it has the resource; it hands over StepSpans only then, and
    # only when the SDK's exporter has the HTTP client this sends through (``_client``).
    encoder: StepSpanEncoder | None = None

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        encoder = self.encoder
        steps = [s for s in spans if type(s) is StepSpan]
        if not steps or encoder is None:
            return super().export(spans)
        if getattr(self, "_shutdown", False):
            return SpanExportResult.FAILURE
        others = [s for s in spans if type(s) is not StepSpan]
        try:
            data = encoder.encode(steps)
            if others:
                data = encode_spans(others).SerializePartialToString() + data
        except Exception:  # as the SDK's exporter does: a batch that fails to encode is dropped
            return SpanExportResult.FAILURE
        result = self._client.export(data)  # the SDK's client: retries, compression
        return SpanExportResult.SUCCESS if result.success else SpanExportResult.FAILURE
