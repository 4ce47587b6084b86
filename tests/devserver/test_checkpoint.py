"""Async checkpoints and the opcodes SDKs that checkpoint send (RunComplete, ...), and what
the executor does with a response it cannot act on: an error, never a silent stall."""

from __future__ import annotations

import json
from typing import Any

import httpx

from connect_worker.devserver import DevServer, RunStatus
from connect_worker.devserver.testing import (
    fast_config,
    hash_step_id,
    make_reply,
    scripted_worker,
)
from connect_worker.protocol import pb

S = pb.SDKResponseStatus


def _op(op: str, step: str, **fields: Any) -> dict[str, Any]:
    return {"op": op, "id": hash_step_id(step), "name": step, "displayName": step, **fields}


def _ctx(req: pb.GatewayExecutorRequestData) -> dict[str, Any]:
    ctx: dict[str, Any] = json.loads(req.request_payload)["ctx"]
    return ctx


async def _checkpoint(dev: DevServer, run_id: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient() as http:
        return await http.post(f"{dev.api_url}/v1/checkpoint/{run_id}/async", content=content,
                               headers={"content-type": "application/json"})


def _body(req: pb.GatewayExecutorRequestData, steps: list[dict[str, Any]],
          **changes: Any) -> dict[str, Any]:
    ctx = _ctx(req)
    return {"run_id": req.run_id, "fn_id": ctx["fn_id"], "qi_id": ctx["qi_id"],
            "request_id": req.request_id, "generation_id": ctx["generation_id"],
            "steps": steps, "ts": 0, **changes}


async def test_steps_checkpointed_in_one_request_then_run_complete() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        assert _ctx(req)["generation_id"] == 1
        for name in ("a", "b"):
            res = await _checkpoint(dev, run_id, _body(req, [_op("StepRun", name, data=name)]))
            assert res.status_code == 200, res.text
        # A retransmitted checkpoint is ignored, as Inngest does.
        assert (await _checkpoint(dev, run_id, _body(req, [_op("StepRun", "a", data="x")]))
                ).status_code == 200
        await w.reply(make_reply(req, S.NOT_COMPLETED, [
            {"op": "RunComplete", "id": hash_step_id("complete"), "data": {"sum": "ab"}}]))
        run = await dev.wait_for_run(run_id)
        assert run.status is RunStatus.COMPLETED and run.output == {"sum": "ab"}
        assert run.steps == {hash_step_id("a"): {"data": "a"}, hash_step_id("b"): {"data": "b"}}
        assert [h.get("via") for h in run.history if h["type"] == "step_completed"] == [
            "checkpoint", "checkpoint"]
        assert len(dev.dispatches) == 1 and not dev.errors


async def test_checkpoint_refusals_use_inngests_statuses_and_are_recorded() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        step = [_op("StepRun", "a", data=1)]
        assert (await _checkpoint(dev, "01NOSUCHRUN", _body(req, step))).status_code == 404
        bad_json = await _checkpoint(dev, run_id, b"{not json")
        assert bad_json.status_code == 400 and "invalid request body" in bad_json.text
        sleep = await _checkpoint(dev, run_id, _body(req, [_op("Sleep", "nap")]))
        assert sleep.status_code == 400 and "async" in sleep.text
        final = await _checkpoint(dev, run_id, _body(req, [_op("RunComplete", "complete")]))
        assert final.status_code == 400 and "RunComplete" in final.text
        unknown = await _checkpoint(dev, run_id, _body(req, [_op("Teleport", "x")]))
        assert unknown.status_code == 400 and "unknown opcode 'Teleport'" in unknown.text
        stale = await _checkpoint(dev, run_id, _body(req, step, generation_id=2))
        assert stale.status_code == 409 and "stale dispatch" in stale.text
        run = dev.runs[run_id]
        kinds = [h["type"] for h in run.history]
        assert kinds.count("checkpoint_error") == 3 and "checkpoint_stale" in kinds
        assert len(dev.errors) == 3
        assert run.steps == {}  # nothing stored by a refused checkpoint
        await w.reply(make_reply(req, S.DONE, "ok"))
        await dev.wait_for_run(run_id)
        done = await _checkpoint(dev, run_id, _body(req, step))
        assert done.status_code == 404 and "completed" in done.text


async def test_unknown_opcode_fails_the_run_with_a_reason_after_retries() -> None:
    def reply(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        return make_reply(req, S.NOT_COMPLETED, [{"op": "Teleport", "id": "x"}])

    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, retries=1, replier=reply
    ) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.FAILED
        assert run.error["name"] == "OpcodeError" and "'Teleport'" in run.error["message"]
        assert [h["attempt"] for h in run.history if h["type"] == "opcode_error"] == [0, 1]
        assert len(w.requests) == 2 and len(dev.errors) == 2


async def test_empty_or_malformed_opcode_lists_are_errors_too() -> None:
    bodies = iter([[], [{"id": "no-op-name"}], "not a list"])

    def reply(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        return make_reply(req, S.NOT_COMPLETED, next(bodies))

    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, retries=2, replier=reply
    ) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.FAILED, run.history
        errors = [h["error"] for h in run.history if h["type"] == "opcode_error"]
        assert len(errors) == 3
        assert "non-empty list" in errors[0] and "'op'" in errors[1]


async def test_parallel_steps_turn_on_disable_immediate_execution() -> None:
    def reply(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        memo = json.loads(req.request_payload)["steps"]
        if req.step_id != "step":
            return make_reply(req, S.NOT_COMPLETED, [
                {"op": "StepRun", "id": req.step_id, "data": req.step_id[:4]}])
        if not memo:
            return make_reply(req, S.NOT_COMPLETED, [_op("StepPlanned", "p1"),
                                                     _op("StepPlanned", "p2")])
        return make_reply(req, S.DONE, _ctx(req)["disable_immediate_execution"])

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=reply) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED and run.output is True
        assert _ctx(w.requests[0])["disable_immediate_execution"] is False


async def test_discovery_request_and_lazy_only_responses_keep_the_run_going() -> None:
    def reply(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        payload = json.loads(req.request_payload)
        n = len(w.requests)
        if n == 1:
            return make_reply(req, S.NOT_COMPLETED, [{"op": "DiscoveryRequest", "id": "d"}])
        if n == 2:  # a defer alone: the executor must still come back for discovery
            return make_reply(req, S.NOT_COMPLETED, [_op(
                "DeferAdd", "later", opts={"fn_slug": "test-app-fn", "input": {"k": 1}})])
        assert payload["defers"] == {hash_step_id("later"): {"abortable": True}}
        if n == 3:
            return make_reply(req, S.NOT_COMPLETED, [
                _op("DeferAbort", "later:abort",
                    opts={"target_hashed_id": hash_step_id("later")}),
                {"op": "RunComplete", "id": hash_step_id("complete"), "data": "parent"}])
        return make_reply(req, S.DONE, "child")

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=reply) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.COMPLETED and run.output == "parent"
        kinds = [h["type"] for h in run.history]
        assert kinds.index("defer_aborted") < kinds.index("run_completed")
        assert len(dev.runs) == 1  # the aborted defer started nothing


async def test_defer_starts_its_function_when_the_parent_completes() -> None:
    def reply(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        payload = json.loads(req.request_payload)
        if payload["event"]["name"] == "inngest/deferred.schedule":
            return make_reply(req, S.DONE, payload["event"]["data"])
        return make_reply(req, S.NOT_COMPLETED, [
            _op("DeferAdd", "later", opts={"fn_slug": "fn", "input": {"k": 1}}),
            {"op": "RunComplete", "id": hash_step_id("complete"), "data": "parent"}])

    async with DevServer(fast_config()) as dev, scripted_worker(dev, replier=reply) as w:
        await w.connect()
        parent = (await dev.send_event("test/evt"))[0]
        await dev.wait_for(lambda: len(dev.runs) == 2)
        child = next(r for r in dev.runs.values() if r.run_id != parent)
        child = await dev.wait_for_run(child.run_id)
        assert child.parent_run_id == parent and child.status is RunStatus.COMPLETED
        assert child.output["k"] == 1
        assert child.output["_inngest"]["parent_run_id"] == parent
