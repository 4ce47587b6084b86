"""Step spans through the real OTLP/HTTP exporter to a receiver on 127.0.0.1.

Tracing is turned on in-process for each test (without setting OpenTelemetry's global
provider); the exporter reads its endpoint from the environment, as in production.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import inngest
import pytest

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.ops import tracing
from connect_worker.ops.logs import configure_logging

from ..otlp_receiver import Receiver
from .apps import probe
from .harness import running_worker, worker_config

client = inngest.Inngest(app_id="traced", is_production=False)
seen_in_user_code: list[tuple[str, str]] = []


@client.create_function(fn_id="two-steps", trigger=inngest.TriggerEvent(event="t/two"))
async def two_steps(ctx: inngest.Context) -> str:
    async def first() -> str:
        from opentelemetry import trace

        span = trace.get_current_span().get_span_context()
        seen_in_user_code.append((f"{span.trace_id:032x}", f"{span.span_id:016x}"))
        logging.getLogger("user.code").info("inside the first step")
        return "one"

    async def second() -> str:
        return "two"

    return await ctx.step.run("first", first) + await ctx.step.run("second", second)


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    found = Receiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", found.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    try:
        yield found
    finally:
        tracing.shutdown()
        found.stop()


def run_trace_id(run_id: str) -> str:
    """The dev gateway's trace id for a run (as Inngest, one trace per run)."""
    return hashlib.sha256(run_id.encode()).hexdigest()[:32]


async def test_a_step_span_joins_the_runs_trace_with_its_events(receiver: Receiver) -> None:
    seen_in_user_code.clear()
    logs = io.StringIO()
    handler = configure_logging("json", "debug", {}, stream=logs)
    try:
        async with DevServer(DevServerConfig.fast()) as dev:
            import os

            tracing.setup(worker_config(dev, instance_id="traced-1", app_version="v7"),
                          os.environ, set_global=False)
            async with running_worker(dev, serve=[(client, [two_steps])],
                                      instance_id="traced-1", app_version="v7"):
                [run_id] = await dev.send_event("t/two", {})
                run = await dev.wait_for_run(run_id, timeout=20)
            tracing.shutdown()  # exports everything
    finally:
        logging.getLogger().removeHandler(handler)
    assert run.status is RunStatus.COMPLETED

    steps = [s for s in receiver.named("step ") if s.attributes["inngest.run.id"] == run_id]
    # Three requests: "first", "second", then the one that returns.
    assert len(steps) == 3, receiver.tree()
    assert {s.trace_id for s in steps} == {run_trace_id(run_id)}
    requests = {d.request_id: d for d in dev.dispatches}
    for span in steps:
        a = span.attributes
        assert span.kind == "SERVER" and span.status == "OK"
        assert span.parent_span_id  # the gateway's span for the request
        assert a["inngest.function.slug"] == "traced-two-steps"
        assert a["inngest.app.name"] == "traced"
        assert a["inngest.request.id"] in requests
        assert a["inngest.job.id"] == requests[a["inngest.request.id"]].job_id
        assert a["inngest.step.attempt"] == 0
        assert span.resource["service.instance.id"] == "traced-1"
        assert span.resource["service.version"] == "v7"
        assert span.event_names == ["ack", "reply.sent", "reply.acked"]
    assert sorted(s.attributes.get("inngest.step.name", "-") for s in steps) == [
        "-", "first", "second"]
    assert sorted(s.attributes["connect_worker.step.outcome"] for s in steps) == [
        "done", "step", "step"]
    [first] = [s for s in steps if s.attributes.get("inngest.step.name") == "first"]
    # User code ran with the step's span current ...
    assert seen_in_user_code == [(first.trace_id, first.span_id)]
    # ... so its log line carries it, as do the engine's lines about the step.
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    [user_line] = [li for li in lines if li["message"] == "inside the first step"]
    assert (user_line["trace_id"], user_line["span_id"]) == (first.trace_id, first.span_id)
    finished = [li for li in lines if li.get("event") == "step.finished"]
    assert len(finished) == 3
    by_request = {s.attributes["inngest.request.id"]: s for s in steps}
    for line in finished:
        assert line["span_id"] == by_request[line["request_id"]].span_id
    # A session span per connection, closed by the drain.
    [session] = receiver.named("session")
    assert session.attributes["connect_worker.close.reason"] == "WORKER_SHUTDOWN"
    [drain] = receiver.named("drain")
    assert drain.attributes["connect_worker.drain.exit_code"] == 0


async def test_the_copy_that_lost_a_reroute_race_records_lease_lost(receiver: Receiver) -> None:
    probe.reset()
    config = DevServerConfig.fast(
        gateway_groups=("gw-a", "gw-b"), lease_duration=20.0, extend_lease_interval=5.0,
        lease_check_interval=5.0,
    )
    async with DevServer(config) as dev:
        import os

        tracing.setup(worker_config(dev), os.environ, set_global=False)
        async with running_worker(dev, instance_id="a"), running_worker(dev, instance_id="b"):
            conn_a = await dev.wait_for_connection(lambda c: c.instance_id == "a")
            conn_b = await dev.wait_for_connection(lambda c: c.instance_id == "b")
            dev.faults.route = lambda ids: (conn_a.conn_id if conn_a.conn_id in ids
                                            else conn_b.conn_id)
            dev.faults.delay_request_ack = 0.5
            [run_id] = await dev.send_event("t/slow", {"seconds": 0.6})
            await probe.wait_started("slow")
            closing = asyncio.create_task(dev.gateway_closing(conn_a.conn_id))
            dev.faults.delay_request_ack = 0.0
            run = await dev.wait_for_run(run_id, timeout=20)
            await closing
        tracing.shutdown()
    assert run.status is RunStatus.COMPLETED
    assert probe.counts["slow"] == 2, "the race did not happen"
    spans = [s for s in receiver.named("step ") if s.attributes["inngest.run.id"] == run_id]
    # (Both workers share this process's tracer: the copies are told apart by events.)
    [lost] = [s for s in spans if "lease_lost" in s.event_names]
    assert lost.event_names == ["ack", "lease.extension_failed", "lease_lost"]
    assert lost.attributes["connect_worker.step.outcome"] == "lease_lost"
    assert lost.status == "UNSET"  # lost, not failed: the other copy answers
    # The other copy of the same request ran it to the end, under the same gateway span.
    request_id = lost.attributes["inngest.request.id"]
    [won] = [s for s in spans if s is not lost and s.attributes["inngest.request.id"]
             == request_id]
    assert won.event_names == ["ack", "reply.sent", "reply.acked"]
    assert won.parent_span_id == lost.parent_span_id
    assert {s.trace_id for s in spans} == {run_trace_id(run_id)}


_OFF_PROBE = textwrap.dedent("""
    import asyncio, json, sys
    from connect_worker.devserver import DevServer, DevServerConfig
    from connect_worker.ops import tracing
    from tests.engine.harness import running_worker

    async def main():
        async with DevServer(DevServerConfig.fast()) as dev:
            async with running_worker(dev):
                [run_id] = await dev.send_event("t/three", {})
                run = await dev.wait_for_run(run_id, timeout=20)
        return run.status.value

    status = asyncio.run(main())
    print(json.dumps({"status": status, "on": tracing.enabled(),
                      "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}))
""")


def test_with_tracing_off_opentelemetry_is_never_imported() -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run([sys.executable, "-c", _OFF_PROBE], capture_output=True,
                            text=True, timeout=60, check=False, env=env)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["status"] == "completed" and found["on"] is False
    assert found["otel"] == []


def test_an_endpoint_without_the_otel_extra_is_a_one_line_error() -> None:
    # The packages made unimportable, as in an install without the extra.
    script = ("import sys; sys.modules['opentelemetry'] = None; "
              "from connect_worker.cli import main; sys.exit(main(['run', 'examples.pipeline']))")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "INNGEST_DEV": "1",
                "CONNECT_WORKER_HTTP_PORT": "off"})
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False, env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("connect-worker: OTEL_EXPORTER_OTLP_ENDPOINT is set but "
                           "OpenTelemetry is not installed")
    assert "connect-worker[otel]" in line


def test_otel_sdk_disabled_wins_over_an_endpoint() -> None:
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:4318/v1/traces"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                               "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                               "OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.wanted({})


def test_resource_attributes_from_railway_and_kubernetes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from connect_worker.config import Config
    from connect_worker.ops._otel import build_resource

    for name in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    config = Config(dev=True, instance_id="pod-7", app_version="abc123")
    env = {"RAILWAY_SERVICE_NAME": "reports", "RAILWAY_REPLICA_ID": "r-1",
           "RAILWAY_DEPLOYMENT_ID": "d-9", "RAILWAY_GIT_COMMIT_SHA": "abc123",
           "K8S_POD_NAME": "pod-7", "K8S_NAMESPACE_NAME": "jobs", "K8S_NODE_NAME": "n-2"}
    a = build_resource(config, env).attributes
    assert (a["service.name"], a["service.instance.id"], a["service.version"]) == (
        "reports", "pod-7", "abc123")
    assert (a["railway.replica.id"], a["deployment.id"], a["vcs.ref.head.revision"]) == (
        "r-1", "d-9", "abc123")
    assert (a["k8s.pod.name"], a["k8s.namespace.name"], a["k8s.node.name"]) == (
        "pod-7", "jobs", "n-2")
    assert "k8s.pod.uid" not in a  # only what is present
    # The standard variables win over what the platform says.
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fleet")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.namespace.name=other")
    a = build_resource(config, env).attributes
    assert (a["service.name"], a["k8s.namespace.name"]) == ("fleet", "other")


@pytest.mark.parametrize(("sampler", "flags", "exported"), [
    (None, "01", True), (None, "00", False),  # parentbased_always_on: the gateway decides
    ("always_on", "00", True), ("always_off", "01", False),
    ("traceidratio", "01", True),  # (ratio 1.0: through the SDK's own sampler)
])
def test_step_spans_follow_the_sampler(monkeypatch: pytest.MonkeyPatch, sampler: str | None,
                                       flags: str, exported: bool) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from connect_worker.config import Config
    from connect_worker.ops._otel import Tracing
    from connect_worker.protocol import ExecutorRequest

    monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    if sampler is None:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    memory = InMemorySpanExporter()
    processor = SimpleSpanProcessor(memory)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    traced = Tracing(provider, processor, Config(dev=True, instance_id="s"))
    parent = f'{{"traceparent":"00-{"ab" * 16}-{"cd" * 8}-{flags}"}}'.encode()

    class Step:
        request = ExecutorRequest("req-1", "acct", "env", "app-id", "app", "fn-id", "fn",
                                  "step", b'{"ctx":{"attempt":2}}', b"{}", parent, "run-1",
                                  "lease", "job-1")

    step = Step()
    traced.step_started(step)
    traced.step_finished(step, None)
    traced.shutdown()
    spans = memory.get_finished_spans()
    assert len(spans) == int(exported)
    if exported:
        [span] = spans
        assert f"{span.context.trace_id:032x}" == "ab" * 16
        assert span.parent is not None and f"{span.parent.span_id:016x}" == "cd" * 8
        assert span.attributes is not None and span.attributes["inngest.step.attempt"] == 2


@pytest.mark.parametrize("parent", [False, True])
def test_hand_encoded_step_spans_match_the_sdks_encoder(parent: bool) -> None:
    """The bytes StepSpanEncoder writes decode to the very message the SDK's encoder
    builds from the same span as a ReadableSpan (ids, trace state, parent and its remote
    flag, every attribute type, events, an error status, the resource and scope), also
    when a batch mixes step spans with the SDK's own spans."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import (
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
    )

    from connect_worker.ops._otlp import StepSpan, StepSpanEncoder

    resource = Resource.create({"service.name": "s", "process.pid": 7, "x.ok": True,
                                "x.list": ["a", "b"]}, schema_url="https://example/1")
    scope = InstrumentationScope("connect_worker", "1.2.3")
    state = TraceState([("vendor", "v1"), ("other", "x")]) if parent else TraceState()
    remote = (SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1),
                          trace_state=state) if parent else None)
    step = StepSpan(
        SpanContext(0xABC if parent else 2**127 + 5, 2**63 + 9, is_remote=False,
                    trace_flags=TraceFlags(1), trace_state=state),
        remote, 1_700_000_000_000_000_001,
        {"inngest.function.slug": "app-fn", "inngest.step.id": "é" * 100,
         "inngest.step.attempt": 3, "neg": -2, "ratio": 0.5, "flag": False},
        [("ack", 1_700_000_000_000_000_002), ("reply.sent", 1_700_000_000_000_000_003)],
        Status(StatusCode.ERROR, "TypeError") if parent else Status(StatusCode.UNSET),
        end=1_700_000_000_000_000_004)
    sdk_span = ReadableSpan(
        step.name, context=step.context, parent=remote, resource=resource,
        attributes=step.attributes, events=[Event(n, timestamp=t) for n, t in step.events],
        kind=SpanKind.SERVER, status=step.status, start_time=step.start,
        end_time=step.end, instrumentation_scope=scope)
    encoder = StepSpanEncoder(resource, scope)

    ours = ExportTraceServiceRequest.FromString(encoder.encode([step, step]))
    assert ours == encode_spans([sdk_span, sdk_span])
    # A mixed batch (what the exporter sends): the SDK's part, then ours, one request.
    other = ReadableSpan("session", context=SpanContext(1, 2, False, TraceFlags(1)),
                         resource=resource, instrumentation_scope=scope)
    mixed = ExportTraceServiceRequest.FromString(
        encode_spans([other]).SerializePartialToString() + encoder.encode([step]))
    assert [len(r.scope_spans[0].spans) for r in mixed.resource_spans] == [1, 1]
    assert mixed.resource_spans[1] == encode_spans([sdk_span]).resource_spans[0]
