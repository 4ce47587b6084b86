"""The executor: payload shape, opcodes, retries (spec §5.9)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from connect_worker.devserver import DevServer, RunStatus, is_ulid
from connect_worker.devserver.executor import Executor
from connect_worker.devserver.state import Event, QueueItem, Run
from connect_worker.devserver.testing import (
    fast_config,
    hash_step_id,
    make_reply,
    scripted_worker,
    step_script,
)
from connect_worker.protocol import pb

S = pb.SDKResponseStatus


def _op(op: str, step: str, **fields: Any) -> dict[str, Any]:
    return {"op": op, "id": hash_step_id(step), "name": step, "displayName": step,
            "opts": None, **fields}


async def test_three_step_run_and_payload_shape() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, replier=step_script(["a", "b", "c"], output={"total": 3})
    ) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt", {"n": 1}))[0]
        run = await dev.wait_for_run(run_id)
        assert run.status is RunStatus.COMPLETED
        assert run.output == {"total": 3}
        assert run.stack == [hash_step_id(s) for s in "abc"]
        assert run.steps[hash_step_id("b")] == {"data": "b-result"}
        assert len(w.requests) == 4
        assert len({r.request_id for r in w.requests}) == 4
        assert len({r.job_id for r in w.requests}) == 4
        last = w.requests[-1]
        assert last.app_name == "test-app" and last.function_slug == "test-app-fn"
        assert last.step_id == "step" and last.run_id == run_id
        assert is_ulid(last.request_id) and is_ulid(last.lease_id)
        assert json.loads(last.system_trace_ctx)["traceparent"].startswith("00-")
        body = json.loads(last.request_payload)
        assert body["event"]["name"] == "test/evt" and body["event"]["data"] == {"n": 1}
        assert body["event"]["user"] == {} and is_ulid(body["event"]["id"])
        assert body["events"] == [body["event"]]
        assert list(body["steps"]) == run.stack
        ctx = body["ctx"]
        assert ctx["run_id"] == run_id and ctx["attempt"] == 0 and ctx["max_attempts"] == 4
        assert ctx["stack"] == {"stack": run.stack, "current": 3}
        assert ctx["request_id"] == last.request_id and ctx["job_id"] == last.job_id
        assert ctx["disable_immediate_execution"] is False and ctx["use_api"] is False
        assert body["use_api"] is False and body["version"] == 2
        assert json.loads(w.requests[0].request_payload)["version"] == -1
        assert all(n == 1 for n in dev.step_executions().values())
        assert len(dev.step_executions()) == 3


async def test_error_retried_then_succeeds_same_job() -> None:
    calls: list[pb.GatewayExecutorRequestData] = []

    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        calls.append(req)
        if len(calls) < 3:
            return make_reply(req, S.ERROR, {"name": "Boom", "message": "flaky"})
        return make_reply(req, S.DONE, "ok")

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=replier) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED and run.output == "ok"
        assert [json.loads(c.request_payload)["ctx"]["attempt"] for c in calls] == [0, 1, 2]
        assert len({c.job_id for c in calls}) == 1
        assert len({c.request_id for c in calls}) == 3
        assert dev.dispatch_counts_by_job() == {calls[0].job_id: 3}


async def test_error_no_retry_and_exhaustion() -> None:
    def no_retry(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        return make_reply(req, S.ERROR, {"message": "fatal"}, no_retry=True)

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=no_retry) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.FAILED and run.error == {"message": "fatal"}
        assert len(w.requests) == 1

    def always(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        return make_reply(req, S.ERROR, {"message": "again"})

    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, replier=always, retries=1
    ) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.FAILED
        assert len(w.requests) == 2  # retries=1 -> max_attempts=2
        assert json.loads(w.requests[0].request_payload)["ctx"]["max_attempts"] == 2


async def test_retry_after_is_honoured() -> None:
    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        attempt = json.loads(req.request_payload)["ctx"]["attempt"]
        if attempt == 0:
            when = (datetime.now(UTC) + timedelta(seconds=0.3)).isoformat()
            return make_reply(req, S.ERROR, {"message": "later"}, retry_after=when)
        return make_reply(req, S.DONE, "ok")

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=replier) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED
        assert dev.dispatches[1].sent_at - dev.dispatches[0].sent_at >= 0.25


async def test_step_error_then_step_failed() -> None:
    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        body = json.loads(req.request_payload)
        if hash_step_id("s") in body["steps"]:
            return make_reply(req, S.DONE, body["steps"][hash_step_id("s")])
        ctx = body["ctx"]
        err = {"name": "E", "message": "bad"}
        op = "StepFailed" if ctx["attempt"] + 1 >= ctx["max_attempts"] else "StepError"
        return make_reply(req, S.NOT_COMPLETED, [_op(op, "s", error=err)])

    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, replier=replier, retries=2
    ) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED
        assert run.output == {"error": {"name": "E", "message": "bad"}}
        attempts = [json.loads(r.request_payload)["ctx"]["attempt"] for r in w.requests]
        assert attempts == [0, 1, 2, 0]
        assert len({r.job_id for r in w.requests[:3]}) == 1
        assert [h["type"] for h in run.history].count("step_errored") == 2


async def test_parallel_step_planned() -> None:
    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        body = json.loads(req.request_payload)
        if req.step_id != "step":
            name = {hash_step_id("p1"): "p1", hash_step_id("p2"): "p2"}[req.step_id]
            return make_reply(req, S.NOT_COMPLETED, [_op("StepRun", name, data=name.upper())])
        if len(body["steps"]) == 2:
            return make_reply(req, S.DONE, sorted(v["data"] for v in body["steps"].values()))
        return make_reply(req, S.NOT_COMPLETED, [_op("StepPlanned", "p1"),
                                                 _op("StepPlanned", "p2")])

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=replier) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED and run.output == ["P1", "P2"]
        targeted = sorted(r.step_id for r in w.requests if r.step_id != "step")
        assert targeted == sorted([hash_step_id("p1"), hash_step_id("p2")])
        assert len(w.requests) == 4  # discovery, 2 targeted, final discovery


async def test_sleep_and_none_opcodes() -> None:
    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        body = json.loads(req.request_payload)
        if hash_step_id("nap") in body["steps"]:
            assert body["steps"][hash_step_id("nap")] is None
            return make_reply(req, S.DONE, "rested")
        wake = (datetime.now(UTC) + timedelta(seconds=0.2)).isoformat()
        return make_reply(req, S.NOT_COMPLETED, [_op("Sleep", "nap", name=wake),
                                                 {"op": "None", "id": "x"}])

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=replier) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED and run.output == "rested"
        assert dev.dispatches[1].sent_at - dev.dispatches[0].sent_at >= 0.15


async def test_wait_for_event_and_invoke() -> None:
    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        body = json.loads(req.request_payload)
        if req.function_slug == "test-app-child":
            return make_reply(req, S.DONE, {"child": body["event"]["data"]})
        steps = body["steps"]
        if hash_step_id("inv") in steps:
            return make_reply(req, S.DONE, {"got": steps[hash_step_id("w")]["data"],
                                            "inv": steps[hash_step_id("inv")]})
        if hash_step_id("w") in steps:
            opts = {"function_id": "test-app-child", "payload": {"data": {"k": 1}}}
            return make_reply(req, S.NOT_COMPLETED, [_op("InvokeFunction", "inv", opts=opts)])
        opts = {"event": "test/approve", "timeout": "5s"}
        return make_reply(req, S.NOT_COMPLETED, [_op("WaitForEvent", "w", opts=opts)])

    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, replier=replier, fn_ids=("fn", "child"), events=("test/evt",)
    ) as w:
        await w.connect()
        run_ids = await dev.send_event("test/evt")
        parent = next(r for r in run_ids if dev.runs[r].function_slug == "test-app-fn")
        await dev.wait_for(lambda: any(h["type"] == "wait_for_event"
                                       for h in dev.runs[parent].history))
        await dev.send_event("test/approve", {"ok": True})
        run = await dev.wait_for_run(parent)
        assert run.status is RunStatus.COMPLETED
        assert run.output == {"got": {"ok": True}, "inv": {"data": {"child": {"k": 1}}}}


async def test_invoke_opcode_goes_through_invoke() -> None:
    """InvokeFunction and the invoke API share one path: the child run names its parent,
    its event is recorded, and an unknown function is memoized as an error, not a crash."""
    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        body = json.loads(req.request_payload)
        if req.function_slug == "test-app-child":
            return make_reply(req, S.DONE, "child-done")
        steps = body["steps"]
        if hash_step_id("gone") in steps:
            return make_reply(req, S.DONE, {"child": steps[hash_step_id("inv")],
                                            "gone": steps[hash_step_id("gone")]})
        if hash_step_id("inv") in steps:
            opts = {"function_id": "test-app-nobody", "payload": {}}
            return make_reply(req, S.NOT_COMPLETED, [_op("InvokeFunction", "gone", opts=opts)])
        opts = {"function_id": "test-app-child", "payload": {"data": None}}
        return make_reply(req, S.NOT_COMPLETED, [_op("InvokeFunction", "inv", opts=opts)])

    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, replier=replier, fn_ids=("fn", "child"), events=("test/evt",)
    ) as w:
        await w.connect()
        parent = (await dev.send_event("test/evt"))[0]
        run = await dev.wait_for_run(parent)
        assert run.status is RunStatus.COMPLETED
        assert run.output == {
            "child": {"data": "child-done"},
            "gone": {"error": {"name": "Error", "message": "no function test-app-nobody"}},
        }
        children = [r for r in dev.runs.values() if r.parent_run_id == parent]
        assert [c.function_slug for c in children] == ["test-app-child"]
        child_event = dev.events[children[0].event.id]
        assert child_event.name == "inngest/function.invoked" and child_event.data == {}
        assert child_event.run_ids == [children[0].run_id]


async def test_step_error_exhausts_attempts() -> None:
    """A StepError on every attempt spends the item's attempts, then fails the run."""
    def replier(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        err = {"name": "E", "message": "bad"}
        return make_reply(req, S.NOT_COMPLETED, [_op("StepError", "s", error=err)])

    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, replier=replier, retries=2
    ) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.FAILED
        assert run.error == {"message": "step attempts exhausted"}
        attempts = [json.loads(r.request_payload)["ctx"]["attempt"] for r in w.requests]
        assert attempts == [0, 1, 2]


def test_next_attempt_counts_up_to_max_attempts() -> None:
    event = Event("e", "test/evt", {}, 0)
    run = Run(run_id="r", function_slug="f", app_name="a", event=event, events=[event],
              max_attempts=3)
    item = QueueItem("r", "step", "job")
    assert [Executor._next_attempt(run, item) for _ in range(4)] == [True, True, False, False]
    assert item.attempt == 2


async def test_event_without_matching_function_starts_nothing() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.wait_for_connection()
        assert await dev.send_event("nobody/listens") == []


async def test_wildcard_trigger_and_cancel() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, events=("test/*",), auto_ack=True
    ) as w:
        await w.connect()
        run_id = (await dev.send_event("test/anything"))[0]
        await w.next_request()  # ACKed, never answered
        assert dev.cancel_run(run_id)
        run = await dev.wait_for_run(run_id)
        assert run.status is RunStatus.CANCELLED
