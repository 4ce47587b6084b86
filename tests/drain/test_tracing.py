"""A rolling deploy in traces: real worker subprocesses export to a receiver on 127.0.0.1.

v1 runs the first step and is SIGTERMed mid-step; v2 runs the rest. The run's steps
share one trace across both processes; v1's drain span links the step it waited for.
"""

from __future__ import annotations

import hashlib
import logging
import signal
from collections.abc import Iterator

import pytest

from connect_worker.devserver import DevServer, RunStatus
from connect_worker.lab.fleet import WorkerProcess, read_executions

from ..otlp_receiver import Receiver
from .test_drain import TARGET, dev, exec_log, first_step_acked_on

__all__ = ["dev", "exec_log"]  # fixtures


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver().start()
    try:
        yield found
    finally:
        found.stop()


def traced_worker(dev: DevServer, receiver: Receiver, name: str, version: str,
                  exec_log: str, *, autostart: bool = True) -> WorkerProcess:
    return WorkerProcess(
        TARGET, api_url=dev.api_url, instance_id=name, app_version=version,
        drain_timeout=20.0, autostart=autostart,
        env={"STEP_SECONDS": "1.0", "CONNECT_WORKER_EXECUTION_LOG": exec_log,
             "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
             "OTEL_SERVICE_NAME": "reports-worker",
             "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
             "RAILWAY_REPLICA_ID": f"replica-{name}"},
    )


async def test_a_rolling_deploy_in_one_trace(
        dev: DevServer, exec_log: str, receiver: Receiver) -> None:
    async with traced_worker(dev, receiver, "old", "v1", exec_log) as old, \
            traced_worker(dev, receiver, "new", "v2", exec_log) as new:
        old_conn = await old.wait_ready(dev)
        await new.wait_ready(dev)
        # v2 is up before the run starts (a subprocess starts slower than a step runs on
        # a loaded machine); the gateway prefers v1 while it is routable.
        dev.faults.route = lambda ids: old_conn.conn_id if old_conn.conn_id in ids else ids[0]
        [run_id] = await dev.send_event("report/requested", {"topic": "deploys"})
        await first_step_acked_on(dev, old_conn.conn_id)
        old.send_signal(signal.SIGTERM)
        assert await old.wait(30) == 0
        run = await dev.wait_for_run(run_id, timeout=30)
        await new.stop()  # both exited: each exported its spans before exiting
    assert run.status is RunStatus.COMPLETED
    by_step = {e["step"]: e["pid"] for e in read_executions(exec_log)}
    assert by_step == {"research": old.pid, "draft": new.pid, "review": new.pid}

    tree = receiver.tree(("inngest.step.name", "connect_worker.step.outcome"))
    steps = [s for s in receiver.named("step ") if s.attributes["inngest.run.id"] == run_id]
    assert len(steps) == 4, tree  # research, draft, review, then the function returns
    on = {s.attributes.get("inngest.step.name", "(return)"): s.resource["service.instance.id"]
          for s in steps}
    assert on == {"research": "old", "draft": "new", "review": "new", "(return)": "new"}, tree
    # One trace for the run, on both versions.
    run_trace = hashlib.sha256(run_id.encode()).hexdigest()[:32]
    assert {s.trace_id for s in steps} == {run_trace}
    assert {s.resource["service.version"] for s in steps} == {"v1", "v2"}
    for span in steps:
        assert span.resource["service.name"] == "reports-worker"
        assert span.resource["deployment.environment.name"] == "test"
        assert span.resource["railway.replica.id"] == "replica-" + span.resource[
            "service.instance.id"]
    # The step in flight when v1 got SIGTERM finished on v1, within its drain.
    [waited] = [s for s in steps if "drain.started" in s.event_names]
    assert waited.attributes["inngest.step.name"] == "research"
    assert waited.resource["service.instance.id"] == "old"
    assert waited.event_names == ["ack", "drain.started", "reply.sent", "reply.acked"]
    # v1's drain: waited for that step, handed nothing back, exit 0; linked to the step.
    [drain] = [s for s in receiver.named("drain") if s.resource["service.instance.id"] == "old"]
    assert drain.attributes["connect_worker.drain.steps_in_flight"] == 1
    assert drain.attributes["connect_worker.drain.handed_back"] == 0
    assert drain.attributes["connect_worker.drain.exit_code"] == 0
    assert drain.links == [(waited.trace_id, waited.span_id)]
    assert drain.start_ns < waited.end_ns <= drain.end_ns
    # v1's session ended with the drain's close.
    old_sessions = [s for s in receiver.named("session")
                    if s.resource["service.instance.id"] == "old"]
    assert [s.attributes["connect_worker.close.reason"] for s in old_sessions] == [
        "WORKER_SHUTDOWN"]
    logging.getLogger(__name__).info("the rolling deploy's spans:\n%s", tree)
