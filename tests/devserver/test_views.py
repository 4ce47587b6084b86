"""What the dev gateway shows a person: runs by step name with workers, attempts and
reply paths (GET /v1/runs), connections with in-flight steps (GET /v1/connections),
the fault commands (POST /v1/faults/...) and one info log line per event."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from connect_worker.devserver import (
    ConnectionInfo,
    DevServer,
    DevServerConfig,
    Dispatch,
    Event,
    ReplyRecord,
    Run,
)
from connect_worker.devserver.state import DevState
from connect_worker.devserver.testing import (
    hash_step_id,
    make_reply,
    scripted_worker,
    step_script,
)
from connect_worker.devserver.views import connection_view, run_view
from connect_worker.ops.httpserver import Request
from connect_worker.protocol import pb

JSON = "application/json"


async def _get(dev: DevServer, path: str) -> Any:
    async with httpx.AsyncClient() as http:
        res = await http.get(dev.api_url + path)
    assert res.status_code == 200, res.text
    return res.json()


async def _post(dev: DevServer, path: str, body: Any = None) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(dev.api_url + path, json={} if body is None else body)


def _steps(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in view["steps"]}


async def test_runs_show_step_names_workers_and_reply_path(
    devserver: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connect_worker.devserver")
    async with scripted_worker(devserver, replier=step_script(["research", "draft"]),
                               instance_id="box-1") as w:
        await w.connect()
        [run_id] = await devserver.send_event("test/evt", {"topic": "x"})
        await devserver.wait_for_run(run_id)
        [view] = (await _get(devserver, "/v1/runs"))["data"]
    assert view["run_id"] == run_id and view["status"] == "completed"
    assert view["function"] == "test-app-fn" and view["event"]["name"] == "test/evt"
    steps = _steps(view)
    assert list(steps) == ["research", "draft"]
    for step in steps.values():
        assert step["status"] == "completed" and step["attempts"] == 1
        assert step["worker"] == "box-1" and step["reply_via"] == "ws"
        assert step["duration"] is not None and step["duration"] >= 0
    assert [r["result"] for r in view["requests"]] == [None, None, "function returned"]
    # The single-run endpoint carries the same view.
    detail = (await _get(devserver, f"/v1/runs/{run_id}"))["data"]
    assert detail["status"] == "completed" and _steps(detail["view"]).keys() == steps.keys()
    messages = [r.getMessage() for r in caplog.records]
    for expected in ("connection opened: box-1", "connection ready: box-1",
                     "event received: test/evt", "run started: test-app-fn",
                     "dispatching next step of test-app-fn", "ACKed by box-1",
                     "reply by socket from box-1", "step done 'research'",
                     "function returned", "run completed: test-app-fn",
                     "connection closed: box-1"):
        assert any(expected in m for m in messages), (expected, messages)
    assert all("\n" not in m for m in messages)


async def test_a_lost_attempt_is_named_after_its_step(
    devserver: DevServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A request whose lease expires (worker went silent) counts as an attempt of the step
    the retry then ran, with the reason; the log says lease expired and retrying."""
    caplog.set_level(logging.INFO, logger="connect_worker.devserver")
    answer = step_script(["research"])
    calls = 0

    def silent_first(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse | None:
        nonlocal calls
        calls += 1
        return None if calls == 1 else answer(req)

    async with scripted_worker(devserver, replier=silent_first) as w:
        await w.connect()
        [run_id] = await devserver.send_event("test/evt")
        first = await w.next_request()
        await devserver.wait_for(lambda: bool(devserver.dispatches)
                                 and devserver.dispatches[0].outcome == "acked")
        # While it is in flight the connection lists it and the run shows a running step.
        [conn] = (await _get(devserver, "/v1/connections"))["data"]
        assert conn["live"] and [f["request_id"] for f in conn["in_flight"]] == [
            first.request_id]
        running = (await _get(devserver, "/v1/runs"))["data"][0]
        assert [r["request_id"] for r in running["running"]] == [first.request_id]
        assert await devserver.expire_lease(first.request_id)
        run = await devserver.wait_for_run(run_id)
        assert run.status.value == "completed"
        view = (await _get(devserver, f"/v1/runs/{run_id}"))["data"]["view"]
    research = _steps(view)["research"]
    assert research["attempts"] == 2 and research["status"] == "completed"
    assert [e["attempt"] for e in research["errors"]] == [1]
    assert "lease expired" in research["errors"][0]["error"]
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "lease expired: request " + first.request_id in messages
    assert "retrying next step of run " + run_id + " (attempt 2 of" in messages


async def test_step_error_then_success_counts_attempts(devserver: DevServer) -> None:
    sid = hash_step_id("flaky")
    tries = 0

    def flaky(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        nonlocal tries
        memo = json.loads(req.request_payload)["steps"]
        if sid in memo:
            return make_reply(req, pb.SDKResponseStatus.DONE, "ok")
        tries += 1
        if tries == 1:
            op = {"op": "StepError", "id": sid, "name": "flaky", "displayName": "flaky",
                  "error": {"name": "ValueError", "message": "bad luck"}}
        else:
            op = {"op": "StepRun", "id": sid, "name": "flaky", "displayName": "flaky",
                  "data": 1}
        return make_reply(req, pb.SDKResponseStatus.NOT_COMPLETED, [op])

    async with scripted_worker(devserver, replier=flaky) as w:
        await w.connect()
        [run_id] = await devserver.send_event("test/evt")
        await devserver.wait_for_run(run_id)
        view = (await _get(devserver, "/v1/runs"))["data"][0]
    step = _steps(view)["flaky"]
    assert step["attempts"] == 2 and step["status"] == "completed" and step["error"] is None
    assert step["errors"] == [{"attempt": 1, "worker": "scripted-1",
                               "error": "ValueError: bad luck"}]


async def test_fault_commands(devserver: DevServer) -> None:
    async with scripted_worker(devserver, instance_id="old-1") as old, \
            scripted_worker(devserver, instance_id="new-1") as new:
        await old.connect()
        await new.connect()
        res = await _post(devserver, "/v1/faults/withhold-reply-ack", {"count": 2})
        assert res.status_code == 200 and res.json()["data"]["pending"] == {
            "withhold_reply_ack": 2, "dual_dispatch": 0}
        assert (await _post(devserver, "/v1/faults/dual-dispatch")).status_code == 200
        assert devserver.faults.dual_dispatch == 1
        assert (await _get(devserver, "/v1/faults"))["data"] == {
            "withhold_reply_ack": 2, "dual_dispatch": 1}
        # The withheld-ACK predicate is true for exactly the next two replies.
        withhold = devserver.faults.withhold_reply_ack
        assert callable(withhold)
        assert [withhold("r") for _ in range(3)] == [True, True, False]

        res = await _post(devserver, "/v1/faults/gateway-closing", {"worker": "old-1"})
        assert res.json()["data"]["connections"] == [old.conn_id]
        await old.expect(pb.GatewayMessageType.GATEWAY_CLOSING)
        res = await _post(devserver, "/v1/faults/drop", {"worker": new.conn_id[-6:]})
        assert res.json()["data"]["connections"] == [new.conn_id]
        await new.wait_closed()
        await devserver.wait_for(lambda: devserver.connection(new.conn_id).close_code == 1006)

        assert (await _post(devserver, "/v1/faults/drop", {"worker": "nobody"})
                ).status_code == 404
        assert (await _post(devserver, "/v1/faults/explode")).status_code == 404
        assert (await _post(devserver, "/v1/faults/dual-dispatch", {"count": 0})
                ).status_code == 400


async def test_admin_endpoints_refuse_clients_that_are_not_loopback(devserver: DevServer) -> None:
    def request(peer: str) -> Request:
        return Request("POST", "/v1/faults/dual-dispatch", {}, {"content-type": JSON}, b"{}",
                       peer=peer)

    routes = devserver.api.routes()
    fault = routes[("POST", "/v1/faults/*")]
    assert (await fault(request("192.0.2.7"))).status == 403
    assert (await fault(request("::ffff:127.0.0.1"))).status == 200
    assert (await fault(request("::1"))).status == 200
    assert devserver.faults.dual_dispatch == 2
    for path in ("/", "/v1/runs", "/v1/connections", "/v1/faults"):
        get = Request("GET", path, {}, {}, b"", peer="192.0.2.7")
        assert (await routes[("GET", path)](get)).status == 403, path


async def test_page_is_served_at_root(devserver: DevServer) -> None:
    async with httpx.AsyncClient() as http:
        res = await http.get(devserver.api_url + "/")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/html")
    # Self-contained: no script, style or font from anywhere else.
    assert "http://" not in res.text and "https://" not in res.text
    assert "/v1/runs" in res.text and "/v1/connections" in res.text


def _records() -> tuple[DevState, Run]:
    """A DevState with two connections and one run, filled by hand as the gateway would."""
    state = DevState(DevServerConfig.fast())
    for conn_id, worker in (("C1", "w-old"), ("C2", "w-new")):
        state.connections[conn_id] = ConnectionInfo(
            conn_id=conn_id, instance_id=worker, gateway_group="gw-a", env="dev",
            connect_request=pb.WorkerConnectRequestData(), start_headers={},
            manual_readiness=False, apps=["app"], app_version={"app": worker[2:]},
            functions={"app": ["app-fn"]}, group_hashes={}, max_worker_concurrency=None)
    run = Run("R1", "app-fn", "app", Event("E1", "e", {}, 0), [], 4)
    state.runs["R1"] = run
    return state, run


def _reply(request_id: str, ops: list[dict[str, Any]]) -> pb.SDKResponse:
    return pb.SDKResponse(request_id=request_id, run_id="R1", body=json.dumps(ops).encode(),
                          status=pb.SDKResponseStatus.NOT_COMPLETED)


def test_a_request_sent_to_two_workers_shows_both() -> None:
    """Records as Faults.dual_dispatch leaves them: one request, two ACKed dispatches; the
    step is credited to the worker whose reply was stored and lists both copies."""
    state, run = _records()
    for conn_id, acked in (("C1", 10.2), ("C2", 10.1)):
        state.dispatches.append(Dispatch("Q1", "J1", "R1", "app-fn", "step", 0, conn_id, 1,
                                         10.0, acked_at=acked, outcome="acked"))
    state.dispatches[1].replied_at, state.dispatches[1].reply_via = 11.0, "ws"
    op = {"op": "StepRun", "id": hash_step_id("charge"), "displayName": "charge", "data": 1}
    state.replies.append(ReplyRecord(11.0, "ws", "C2", "Q1", _reply("Q1", [op]), stored=True))

    [step] = run_view(state, run)["steps"]
    assert (step["name"], step["worker"], step["app_version"]) == ("charge", "w-new", "new")
    assert step["copies"] == ["w-new", "w-old"] and step["attempts"] == 1
    # Replied: in flight on neither connection any more.
    assert connection_view(state, state.connections["C1"], True)["in_flight"] == []


def test_steps_checkpointed_over_http_are_listed_with_their_worker() -> None:
    """An SDK that checkpoints (the TypeScript SDK 4.x) reports steps over HTTP while its
    request runs and ends with RunComplete: the steps come from the run's history, the
    worker from the request running then; RunComplete is no step."""
    state, run = _records()
    state.dispatches.append(Dispatch("Q1", "J1", "R1", "app-fn", "step", 0, "C1", 1, 10.0,
                                     acked_at=10.1, replied_at=12.0, reply_via="ws",
                                     outcome="replied"))
    run.history += [{"ts": 10.5, "type": "step_completed", "step": "S1", "name": "fetch",
                     "via": "checkpoint"},
                    {"ts": 11.5, "type": "step_completed", "step": "S2", "name": "store",
                     "via": "checkpoint"}]
    done = {"op": "RunComplete", "id": "X", "data": "ok"}
    state.replies.append(ReplyRecord(12.0, "ws", "C1", "Q1", _reply("Q1", [done]),
                                     stored=True))
    view = run_view(state, run)
    assert [(s["name"], s["status"], s["worker"], s["reply_via"]) for s in view["steps"]] == [
        ("fetch", "completed", "w-old", "checkpoint"), ("store", "completed", "w-old",
                                                        "checkpoint")]
    # Each took the time since the request's previous checkpoint (or its ACK).
    assert [round(s["duration"], 3) for s in view["steps"]] == [0.4, 1.0]
    assert view["requests"][0]["result"] == "function returned"


def test_a_sleep_shows_when_it_began_and_how_long_it_was() -> None:
    state, run = _records()
    state.dispatches.append(Dispatch("Q1", "J1", "R1", "app-fn", "step", 0, "C2", 1, 10.0,
                                     acked_at=10.1, replied_at=10.2, reply_via="ws",
                                     outcome="replied"))
    nap = {"op": "Sleep", "id": "S9", "displayName": "nap", "opts": {"duration": "2s"}}
    state.replies.append(ReplyRecord(10.2, "ws", "C2", "Q1", _reply("Q1", [nap]),
                                     stored=True))
    run.history.append({"ts": 10.25, "type": "sleep", "step": "S9", "seconds": 2.0})
    [sleeping] = run_view(state, run)["steps"]
    assert (sleeping["name"], sleeping["status"], sleeping["ended_at"]) == ("nap", "sleep", None)
    run.steps["S9"] = None  # woke up
    [slept] = run_view(state, run)["steps"]
    assert (slept["status"], slept["started_at"], slept["duration"]) == ("completed", 10.25, 2.0)


async def test_a_step_whose_worker_vanished_says_why_it_is_still_running(
    devserver: DevServer,
) -> None:
    async with scripted_worker(devserver, replier=lambda req: None) as w:
        await w.connect()
        [run_id] = await devserver.send_event("test/evt")
        await w.next_request()
        await devserver.wait_for(lambda: bool(devserver.dispatches)
                                 and devserver.dispatches[0].outcome == "acked")
        await w.abort()
        await devserver.wait_for(lambda: devserver.connection(w.conn_id).closed_at is not None)
        [running] = (await _get(devserver, f"/v1/runs/{run_id}"))["data"]["view"]["running"]
    assert running["worker"] == "scripted-1"
    assert running["note"].startswith("scripted-1's connection closed (UNEXPECTED)")
    assert "leases last 4 s" in running["note"]


async def test_a_step_handed_back_counts_as_an_attempt_of_that_step(
    devserver: DevServer,
) -> None:
    """A draining worker gives a step back with an error reply; the retry of the same job
    runs it: the page names the step, two attempts, and why the first one ended."""
    answer = step_script(["summarise"])
    calls = 0

    def hand_back_first(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return make_reply(req, pb.SDKResponseStatus.ERROR,
                              {"name": "StepAbandoned", "message": "w gave up"})
        return answer(req)

    async with scripted_worker(devserver, replier=hand_back_first) as w:
        await w.connect()
        [run_id] = await devserver.send_event("test/evt")
        await devserver.wait_for_run(run_id)
        view = (await _get(devserver, "/v1/runs"))["data"][0]
    step = _steps(view)["summarise"]
    assert step["attempts"] == 2 and step["status"] == "completed"
    assert step["errors"] == [{"attempt": 1, "worker": "scripted-1",
                               "error": "function error: StepAbandoned: w gave up"}]


async def test_dual_dispatch_from_the_fault_endpoint_shows_both_workers(
    devserver: DevServer,
) -> None:
    async with scripted_worker(devserver, replier=step_script(["once"]), instance_id="a") as a, \
            scripted_worker(devserver, replier=step_script(["once"]), instance_id="b") as b:
        await a.connect()
        await b.connect()
        assert (await _post(devserver, "/v1/faults/dual-dispatch")).status_code == 200
        [run_id] = await devserver.send_event("test/evt")
        await devserver.wait_for_run(run_id)
        view = (await _get(devserver, f"/v1/runs/{run_id}"))["data"]["view"]
    assert devserver.faults.dual_dispatch == 0
    step = _steps(view)["once"]
    assert sorted(step["copies"]) == ["a", "b"] and step["worker"] in ("a", "b")
    assert sorted(view["requests"][0]["sent_to"]) == ["a", "b"]
