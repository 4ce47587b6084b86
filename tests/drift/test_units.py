"""The drift tracker driven through the real SDK by hand-made executor requests (no
gateway): the cases the gateway tests cannot stage cheaply."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import inngest
import pytest

from connect_worker.config import Config
from connect_worker.engine import drift, history
from connect_worker.engine.executor import STATUS_ERROR, Executor, Outcome
from connect_worker.errors import ConfigError
from connect_worker.protocol import ExecutorRequest

H = drift.hash_step_id
ran: Counter[str] = Counter()
found: list[tuple[str, str]] = []


def body(name: str) -> Any:
    def run() -> str:
        ran[name] += 1
        return name.upper()

    return run


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    ran.clear()
    found.clear()
    drift.clear_policies()
    yield


def executor(fn: inngest.Function[Any], client: inngest.Inngest, on_drift: str = "fail",
             ) -> Executor:
    guard = drift.DriftGuard(on_drift=on_drift, app_version="v2",
                             count=lambda f, k: found.append((f, k)))
    ex = Executor([(client, [fn])], drift=guard)
    ex.start()
    return ex


def call(ex: Executor, memos: dict[str, Any], *, target: str = "step",
         run_id: str = "run-1") -> Outcome:
    event = {"name": "t/go", "data": {}}
    payload = {"event": event, "events": [event], "steps": memos, "use_api": False,
               "ctx": {"run_id": run_id, "attempt": 0, "disable_immediate_execution": False,
                       "stack": {"stack": list(memos)}}}
    slug = next(iter(ex.apps[0].function_slugs))
    request = ExecutorRequest(
        request_id="r", account_id="", env_id="", app_id="", app_name=ex.apps[0].app_name,
        function_id="", function_slug=slug, step_id=target,
        request_payload=json.dumps(payload).encode(), system_trace_ctx=b"",
        user_trace_ctx=b"", run_id=run_id, lease_id="", job_id="")
    return asyncio.run_coroutine_threadsafe(ex._call(request), ex.user_loop.loop).result(10)


def app(handler: Any, fn_id: str = "f") -> tuple[inngest.Inngest, inngest.Function[Any]]:
    client = inngest.Inngest(app_id="unit", is_production=False)
    fn = client.create_function(fn_id=fn_id, trigger=inngest.TriggerEvent(event="t/go"),
                                retries=0)(handler)
    return client, fn


def ops(outcome: Outcome) -> list[str]:
    return [op["displayName"] for op in json.loads(outcome.body)]


def test_targeted_parallel_step_with_a_later_sibling_memo_is_not_drift() -> None:
    async def fn(ctx: inngest.Context) -> Any:
        await ctx.step.run("a", body("a"))
        return await ctx.group.parallel((lambda: ctx.step.run("p1", body("p1")),
                                         lambda: ctx.step.run("p2", body("p2"))))

    ex = executor(*reversed(app(fn)))
    try:
        # p2 finished first; the gateway now targets p1 with p2's memo in the request.
        out = call(ex, {H("a"): {"data": "A"}, H("p2"): {"data": "P2"}}, target=H("p1"))
    finally:
        ex.stop()
    assert out.status != STATUS_ERROR and ops(out) == ["p1"]
    assert ran == {"p1": 1} and found == []


@pytest.mark.parametrize("new", ["run", "sleep", "wait", "invoke"])
def test_every_step_kind_reached_new_with_memos_left_is_stopped(new: str) -> None:
    async def fn(ctx: inngest.Context) -> Any:
        await ctx.step.run("a", body("a"))
        if new == "run":
            await ctx.step.run("n", body("n"))
        elif new == "sleep":
            await ctx.step.sleep("n", 1000)
        elif new == "wait":
            await ctx.step.wait_for_event("n", event="x/y", timeout=1000)
        else:
            await ctx.step.invoke_by_id("n", function_id="other")
        await ctx.step.run("b", body("b"))

    drift.drift_policy("unit-f", retired=["b"])  # names b's memo in the message
    ex = executor(*reversed(app(fn)))
    try:
        out = call(ex, {H("a"): {"data": "A"}, H("b"): {"data": "B"}})
    finally:
        ex.stop()
    assert out.status == STATUS_ERROR and out.no_retry
    message = json.loads(out.body)["message"]
    assert "version drift" in message and "'n'" in message and "[b]" in message
    assert ran == {} and found == [("unit-f", "added")]


@pytest.mark.parametrize("memo", [None, {"name": "x/y", "data": {}}])
def test_sleep_and_wait_memos_are_consumed(memo: Any) -> None:
    async def fn(ctx: inngest.Context) -> Any:
        await ctx.step.sleep("s", 1000)
        await ctx.step.wait_for_event("w", event="x/y", timeout=1000)
        return await ctx.step.run("c", body("c"))

    ex = executor(*reversed(app(fn)))
    try:
        out = call(ex, {H("s"): None, H("w"): memo})
    finally:
        ex.stop()
    assert out.status != STATUS_ERROR and ran == {"c": 1} and found == []


def test_user_code_swallowing_the_stop_still_fails_the_run() -> None:
    async def fn(ctx: inngest.Context) -> Any:
        await ctx.step.run("a", body("a"))
        try:
            await ctx.step.run("n", body("n"))
        except BaseException:  # what a careless user might write
            pass
        return "done"

    ex = executor(*reversed(app(fn)))
    try:
        out = call(ex, {H("a"): {"data": "A"}, H("b"): {"data": "B"}})
    finally:
        ex.stop()
    assert out.status == STATUS_ERROR and out.no_retry and ran == {}


def test_sync_function_is_guarded_too() -> None:
    def fn(ctx: inngest.ContextSync) -> Any:
        ctx.step.run("a", body("a"))
        return ctx.step.run("n", body("n"))

    ex = executor(*reversed(app(fn)))
    try:
        out = call(ex, {H("a"): {"data": "A"}, H("b"): {"data": "B"}})
    finally:
        ex.stop()
    assert out.status == STATUS_ERROR and out.no_retry and ran == {}


def test_targeted_step_missing_from_the_code_fails_the_run() -> None:
    async def fn(ctx: inngest.Context) -> Any:
        return await ctx.group.parallel((lambda: ctx.step.run("p1", body("p1")),
                                         lambda: ctx.step.run("p2b", body("p2b"))))

    ex = executor(*reversed(app(fn)))
    try:
        out = call(ex, {}, target=H("p2"))
    finally:
        ex.stop()
    assert out.status == STATUS_ERROR and out.no_retry
    assert "not in this code" in json.loads(out.body)["message"]
    assert ran == {} and found == [("unit-f", "unconsumed")]


def test_returning_with_memos_left_is_unconsumed_and_warn_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    async def fn(ctx: inngest.Context) -> Any:
        return await ctx.step.run("a", body("a"))

    drift.drift_policy("unit-f", retired=["old-step"])
    ex = executor(*reversed(app(fn)), on_drift="warn")
    try:
        with caplog.at_level(logging.WARNING, "connect_worker.engine.drift"):
            out = call(ex, {H("a"): {"data": "A"}, H("old-step"): {"data": 1}})
            again = call(ex, {H("a"): {"data": "A"}, H("old-step"): {"data": 1}})
    finally:
        ex.stop()
    assert out.status != STATUS_ERROR and again.status != STATUS_ERROR
    assert found == [("unit-f", "unconsumed")]  # once per run, not per request
    [line] = [r for r in caplog.records if getattr(r, "event", "") == "run.version_drift"]
    assert line.fields["unconsumed"] == ["old-step"]  # type: ignore[attr-defined]


def test_rename_grace_map_covers_repeats() -> None:
    async def fn(ctx: inngest.Context) -> Any:
        return [await ctx.step.run("new", body("new")) for _ in range(2)]

    client, f = app(fn)
    drift.drift_policy(f, renamed={"old": "new"})
    ex = executor(f, client)
    try:
        out = call(ex, {H("old"): {"data": "one"}, H("old:1"): {"data": "two"}})
    finally:
        ex.stop()
    assert out.status != STATUS_ERROR and ran == {} and found == []
    assert json.loads(out.body) == ["one", "two"]


def test_bad_settings_are_one_line_errors() -> None:
    with pytest.raises(ConfigError, match=r"^CONNECT_WORKER_ON_DRIFT='maybe' is invalid: "
                       "expected one of warn, fail$"):
        Config.from_env({"INNGEST_DEV": "1", "CONNECT_WORKER_ON_DRIFT": "maybe"})
    with pytest.raises(ValueError, match="on_drift='stop'"):
        drift.drift_policy("x", on_drift="stop")
    assert Config.from_env({"INNGEST_DEV": "1"}).on_drift == "warn"


def test_shape_of_keeps_structure_and_types_only() -> None:
    assert history.shape_of({"a": "secret", "n": 3, "x": [1.5, 2.5], "ok": True, "z": None}) == {
        "a": "", "n": 0, "x": [0.0], "ok": False, "z": None}


def test_an_sdk_whose_internals_moved_runs_unguarded(caplog: pytest.LogCaptureFixture) -> None:
    class Moved:  # an execution without the `_memos` the guard reads
        pass

    tracker = drift.DriftGuard().begin(drift.Request("run-1", "unit-f", None))
    with caplog.at_level(logging.ERROR, "connect_worker.engine.drift"):
        tracker.attach(Moved(), object())
    assert not tracker.attached
    tracker.finish(returned=True)  # and nothing else happens
    assert any(getattr(r, "event", "") == "drift.guard_unavailable" for r in caplog.records)


def test_the_sdk_methods_the_guard_wraps_have_the_shape_it_expects() -> None:
    """The contract with the installed SDK (0.5.19/0.5.20): fails here, not in production,
    when an upgrade moves what the hooks call."""
    import inspect

    from inngest._internal import execution_lib, step_lib

    drift.install_hooks()
    for cls in (execution_lib.ExecutionV0, execution_lib.ExecutionV0Sync):
        # The executor builds the execution and attaches the tracker to its memos.
        init = inspect.signature(cls.__init__)
        assert list(init.parameters)[1:4] == ["memos", "middleware", "request"]
        report = inspect.signature(cls.report_step.__wrapped__)
        assert list(report.parameters) == ["self", "step_info"]
    for step_cls in (step_lib.Step, step_lib.StepSync):
        params = inspect.signature(step_cls.run.__wrapped__).parameters
        assert list(params)[:3] == ["self", "step_id", "handler"] and "output_type" in params
    memos = step_lib.StepMemos.from_raw({"h": {"data": 1}})
    assert isinstance(memos._memos, dict) and memos.pop("h") is not None


def test_an_unwritable_history_directory_does_not_fail_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def fn(ctx: inngest.Context) -> Any:
        return await ctx.step.run("a", body("a"))

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    client, f = app(fn)
    with caplog.at_level(logging.ERROR, "connect_worker.engine.history"):
        guard = drift.DriftGuard(recorder=history.HistoryRecorder(blocker / "histories"))
        ex = Executor([(client, [f])], drift=guard)
        ex.start()
        try:
            out = call(ex, {})
        finally:
            ex.stop()
    assert out.status != STATUS_ERROR and ran == {"a": 1}
    assert [r for r in caplog.records if getattr(r, "event", "") == "drift.history_unwritable"]
