"""A small OTLP/HTTP trace receiver on 127.0.0.1 for the tracing tests.

It decodes what the real OTLP exporter POSTs to ``/v1/traces`` (protobuf
``ExportTraceServiceRequest``, from opentelemetry-proto) into plain records, and can
print them as a span tree (docs/observability.md shows one).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER",
         5: "CONSUMER"}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]  # (trace_id, span_id)
    status: str
    status_message: str
    resource: dict[str, Any]
    scope: str

    @property
    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]


@dataclass
class Receiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request)
                payload = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _add(self, request: ExportTraceServiceRequest) -> None:
        found: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                found.extend(ReceivedSpan(
                        name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(), kind=KINDS[s.kind],
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes=_attributes(s.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in s.events],
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        status=STATUS[s.status.code], status_message=s.status.message,
                        resource=resource, scope=scope_spans.scope.name,
                    ) for s in scope_spans.spans)
        with self._lock:
            self.requests += 1
            self.spans.extend(found)

    def named(self, prefix: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.name.startswith(prefix)]

    def tree(self, keys: tuple[str, ...] = ()) -> str:
        """The spans as an indented tree per trace (children by start time)."""
        with self._lock:
            spans = sorted(self.spans, key=lambda s: s.start_ns)
        ids = {s.span_id for s in spans}
        children: dict[str, list[ReceivedSpan]] = {}
        for s in spans:
            children.setdefault(s.parent_span_id, []).append(s)
        lines: list[str] = []

        def walk(span: ReceivedSpan, depth: int) -> Iterator[None]:
            ms = (span.end_ns - span.start_ns) / 1e6
            shown = {k: span.attributes[k] for k in keys if k in span.attributes}
            shown.update({k: span.resource[k] for k in ("service.instance.id",)
                          if k in span.resource and "connect_worker.instance.id" not in shown})
            extra = " ".join(f"{k}={v}" for k, v in shown.items())
            lines.append(f"{'  ' * depth}{span.name} [{span.kind} {span.status} {ms:.0f} ms]"
                         f" {extra}".rstrip())
            if span.events:
                lines.append(f"{'  ' * depth}  events: {', '.join(span.event_names)}")
            for trace_id, span_id in span.links:
                lines.append(f"{'  ' * depth}  link -> {trace_id[:8]}…/{span_id}")
            for child in children.get(span.span_id, []):
                yield from walk(child, depth + 1)
            yield None

        roots = [s for s in spans if s.parent_span_id not in ids]
        for trace_id in dict.fromkeys(s.trace_id for s in roots):
            lines.append(f"trace {trace_id}")
            for root in (s for s in roots if s.trace_id == trace_id):
                if root.parent_span_id:
                    lines.append(f"  (parent {root.parent_span_id}: the gateway's span)")
                for _ in walk(root, 1):
                    pass
        return "\n".join(lines)
