"""THE contract test: the official Python SDK's own Connect client (inngest 0.5.19; also run
against 0.5.20a0) runs functions against our devserver, so the devserver speaks the real
protocol. Each step body must run exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
from collections import Counter
from typing import Any

import inngest
import pytest
from inngest._internal import const as inngest_const
from inngest.connect import connect

from connect_worker.devserver import ConnStatus, DevServer, DevServerConfig, RunStatus
from connect_worker.devserver.testing import realistic_races

from ..engine.harness import running_worker


async def test_official_sdk_completes_three_step_run() -> None:
    cfg = DevServerConfig.fast(interval_format="seconds")
    async with DevServer(cfg) as dev:
        realistic_races(dev)  # e.g. a reply read just before its socket closes is lost
        client = inngest.Inngest(
            app_id="contract-app", is_production=False, api_base_url=dev.api_url,
            event_api_base_url=dev.api_url,
        )
        executions: Counter[str] = Counter()

        @client.create_function(
            fn_id="three-steps", trigger=inngest.TriggerEvent(event="contract/go")
        )
        async def three_steps(ctx: inngest.Context) -> dict[str, object]:
            async def step(name: str) -> str:
                executions[name] += 1
                return f"{name}-ok"

            a = await ctx.step.run("a", step, "a")
            b = await ctx.step.run("b", step, "b")
            c = await ctx.step.run("c", step, "c")
            return {"a": a, "b": b, "c": c, "n": ctx.event.data["n"]}

        conn = connect([(client, [three_steps])], instance_id="contract-1", shutdown_signals=[])
        task = asyncio.create_task(conn.start())
        try:
            info = await dev.wait_for_connection(timeout=15)
            assert info.instance_id == "contract-1"
            assert info.connect_request.sdk_language == "py"
            assert "contract-app-three-steps" in info.functions["contract-app"]

            run_ids = await dev.send_event("contract/go", {"n": 7})
            assert len(run_ids) == 1
            run = await dev.wait_for_run(run_ids[0], timeout=30)
            assert run.status is RunStatus.COMPLETED, dev.dump()
            assert run.output == {"a": "a-ok", "b": "b-ok", "c": "c-ok", "n": 7}
            assert executions == {"a": 1, "b": 1, "c": 1}
            # 3 StepRun discoveries + the final DONE call, each dispatched once.
            assert len(dev.dispatches) == 4
            assert all(n == 1 for n in dev.dispatch_counts_by_job().values())
            assert all(n == 1 for n in dev.step_executions().values())
            await dev.wait_for(lambda: all(r.acked for r in dev.replies), timeout=5)

            await conn.close(wait=True)
            await asyncio.wait_for(task, 15)
            await dev.wait_for(lambda: dev.connections[0].status is ConnStatus.DISCONNECTED)
            assert dev.connections[0].close_code == 1000
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class _SDKWorker:
    """Runs the official SDK's Connect client as a task; always stopped on exit."""

    def __init__(self, dev: DevServer, fns: list[inngest.Function[object]],
                 client: inngest.Inngest, instance_id: str = "contract-1") -> None:
        self.dev = dev
        self.conn = connect([(client, fns)], instance_id=instance_id, shutdown_signals=[])
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _SDKWorker:
        self.task = asyncio.create_task(self.conn.start())
        await self.dev.wait_for_connection(timeout=15)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        try:
            await asyncio.wait_for(self.conn.close(wait=True), 15)
            await asyncio.wait_for(self.task, 15)
        finally:
            if not self.task.done():
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.task


def _client(dev: DevServer, app_id: str = "contract-app") -> inngest.Inngest:
    return inngest.Inngest(app_id=app_id, is_production=False, api_base_url=dev.api_url,
                           event_api_base_url=dev.api_url)


async def test_official_sdk_parallel_sleep_and_retry() -> None:
    cfg = DevServerConfig.fast(interval_format="seconds")
    async with DevServer(cfg) as dev:
        realistic_races(dev)  # e.g. a reply read just before its socket closes is lost
        client = _client(dev)
        executions: Counter[str] = Counter()

        @client.create_function(fn_id="mixed", trigger=inngest.TriggerEvent(event="contract/mixed"),
                                retries=2)
        async def mixed(ctx: inngest.Context) -> list[object]:
            async def body(name: str) -> str:
                executions[name] += 1
                if name == "flaky" and ctx.attempt == 0:
                    raise ValueError("first attempt fails")
                return name

            p = await ctx.group.parallel((
                lambda: ctx.step.run("p1", body, "p1"),
                lambda: ctx.step.run("p2", body, "p2"),
            ))
            await ctx.step.sleep("nap", datetime.timedelta(milliseconds=300))
            flaky = await ctx.step.run("flaky", body, "flaky")
            return [*p, flaky]

        async with _SDKWorker(dev, [mixed], client):
            run = await dev.wait_for_run((await dev.send_event("contract/mixed"))[0])
            assert run.status is RunStatus.COMPLETED, dev.dump()
            assert run.output == ["p1", "p2", "flaky"]
            assert executions == {"p1": 1, "p2": 1, "flaky": 2}
            kinds = [h["type"] for h in run.history]
            # p1 and p2, then flaky: after a parallel fan-out Inngest sets
            # disable_immediate_execution, so every later step is planned first.
            assert kinds.count("step_planned") == 3
            assert "sleep" in kinds and "step_errored" in kinds
            targeted = {d.step_id for d in dev.dispatches} - {"step"}
            assert len(targeted) == 3


async def test_official_sdk_extends_leases_and_flushes_unacked_reply() -> None:
    cfg = DevServerConfig.fast(interval_format="seconds", lease_duration=1.5,
                               lease_check_interval=0.2, lease_grace=0.2)
    async with DevServer(cfg) as dev:
        realistic_races(dev)  # e.g. a reply read just before its socket closes is lost
        client = _client(dev)
        dev.faults.withhold_reply_ack = True

        @client.create_function(fn_id="slow", trigger=inngest.TriggerEvent(event="contract/slow"))
        async def slow(ctx: inngest.Context) -> str:
            async def work() -> str:
                await asyncio.sleep(2.5)  # longer than the lease: needs extensions
                return "slept"

            return await ctx.step.run("work", work)

        async with _SDKWorker(dev, [slow], client):
            run_id = (await dev.send_event("contract/slow"))[0]
            # The step reply is never ACKed on the socket: the SDK flushes it over
            # HTTP after extend_lease_interval; flush must accept its body.
            await dev.wait_for(lambda: len(dev.flushes) >= 1, timeout=10)
            dev.faults.withhold_reply_ack = False
            run = await dev.wait_for_run(run_id, timeout=15)
            assert run.status is RunStatus.COMPLETED, dev.dump()
            assert run.output == "slept"
            extends = [t for t in dev.timeline if t.kind == "WORKER_REQUEST_EXTEND_LEASE"]
            assert len(extends) >= 2
            # Every extension was granted: no step was retried.
            assert all(n == 1 for n in dev.dispatch_counts_by_job().values())
            assert dev.flushes[0].request_id == dev.replies[0].request_id


async def test_official_sdk_gateway_closing_mid_step() -> None:
    """Appendix A run 3: the SDK reconnects and replies on the new socket."""
    cfg = DevServerConfig.fast(interval_format="seconds", drain_window=5.0)
    async with DevServer(cfg) as dev:
        realistic_races(dev)  # e.g. a reply read just before its socket closes is lost
        client = _client(dev)
        executions: Counter[str] = Counter()

        @client.create_function(fn_id="slow", trigger=inngest.TriggerEvent(event="contract/gc"))
        async def slow(ctx: inngest.Context) -> str:
            async def work() -> str:
                executions["work"] += 1
                await asyncio.sleep(2.0)
                return "done"

            return await ctx.step.run("work", work)

        async with _SDKWorker(dev, [slow], client):
            run_id = (await dev.send_event("contract/gc"))[0]
            await dev.wait_for(
                lambda: bool(dev.dispatches) and dev.dispatches[0].acked_at is not None
            )
            old = dev.dispatches[0].conn_id
            await dev.gateway_closing(old)
            run = await dev.wait_for_run(run_id, timeout=20)
            assert run.status is RunStatus.COMPLETED, dev.dump()
            assert executions == {"work": 1}
            first_reply = next(r for r in [*dev.replies, *dev.flushes]
                               if r.request_id == dev.dispatches[0].request_id)
            assert first_reply.conn_id != old
            assert len(dev.start_calls) >= 2


async def test_official_sdk_shutdown_pauses_and_finishes_step() -> None:
    cfg = DevServerConfig.fast(interval_format="seconds")
    async with DevServer(cfg) as dev:
        realistic_races(dev)  # e.g. a reply read just before its socket closes is lost
        client = _client(dev)

        @client.create_function(fn_id="slow", trigger=inngest.TriggerEvent(event="contract/sd"))
        async def slow(ctx: inngest.Context) -> str:
            async def work() -> str:
                await asyncio.sleep(1.0)
                return "finished"

            return await ctx.step.run("work", work)

        worker = _SDKWorker(dev, [slow], client)
        await worker.__aenter__()
        try:
            await dev.send_event("contract/sd")
            await dev.wait_for(
                lambda: bool(dev.dispatches) and dev.dispatches[0].acked_at is not None
            )
            conn_id = dev.dispatches[0].conn_id
            await worker.conn.close(wait=False)
            await dev.wait_for(lambda: dev.connection(conn_id).paused)
            await dev.wait_for(lambda: dev.connection(conn_id).status is ConnStatus.DISCONNECTED,
                               timeout=10)
            # The step's reply made it before the close; the run then waits for a worker.
            assert dev.dispatches[0].reply_via == "ws"
            info = dev.connection(conn_id)
            assert (info.close_code, info.close_class) == (1000, "UNEXPECTED")  # empty reason
        finally:
            await worker.__aexit__(None, None, None)


def _deferred() -> Any:
    """``inngest.experimental.deferred`` (0.5.20 and later), or skip."""
    try:
        return importlib.import_module("inngest.experimental.deferred")
    except ImportError:
        pytest.skip(f"inngest {inngest_const.VERSION} has no deferred functions (0.5.20+)")


@pytest.mark.parametrize("client_kind", ["official", "connect_worker"])
async def test_defer_runs_after_the_parent_completes(client_kind: str) -> None:
    """0.5.20 adds DeferAdd/DeferAbort and ends such runs with RunComplete: the gateway
    starts each deferred function when the parent finishes, aborted ones never."""
    deferred = _deferred()
    async with DevServer(DevServerConfig.fast(interval_format="seconds")) as dev:
        realistic_races(dev)  # e.g. a reply read just before its socket closes is lost
        client = _client(dev, "defer-app")
        executions: Counter[str] = Counter()

        @deferred.create_defer(client, fn_id="later")
        async def later(ctx: inngest.Context) -> str:
            executions[f"later-{ctx.event.data['k']}"] += 1
            return f"later-{ctx.event.data['k']}"

        @client.create_function(fn_id="parent",
                                trigger=inngest.TriggerEvent(event="contract/defer"))
        async def parent(ctx: inngest.Context) -> str:
            async def step() -> str:
                executions["a"] += 1
                return "A"

            a = await ctx.step.run("a", step)
            ctx.defer("later-1", function=later, data={"k": 1})
            ctx.defer("later-2", function=later, data={"k": 2}).abort()
            return a

        fns: list[inngest.Function[Any]] = [parent, later]
        async with contextlib.AsyncExitStack() as stack:
            if client_kind == "official":
                await stack.enter_async_context(_SDKWorker(dev, fns, client))
            else:
                worker = await stack.enter_async_context(running_worker(
                    dev, [(client, fns)], instance_id="contract-engine", drain_timeout=10.0))
            run_id = (await dev.send_event("contract/defer"))[0]
            run = await dev.wait_for_run(run_id)
            assert run.status is RunStatus.COMPLETED and run.output == "A", dev.dump()
            assert "defer_added" in [h["type"] for h in run.history]
            await dev.wait_for(lambda: len(dev.runs) == 2)
            child = next(r for r in dev.runs.values() if r.run_id != run_id)
            child = await dev.wait_for_run(child.run_id)
            assert child.status is RunStatus.COMPLETED and child.output == "later-1"
            assert child.parent_run_id == run_id
            assert executions == {"a": 1, "later-1": 1}
            assert not dev.errors, dev.errors
            if client_kind == "connect_worker":
                # The parent ended in [DeferAdd, RunComplete]: counted as done, not a step.
                done = worker.metrics.registry.get_sample_value(
                    "connect_worker_steps_total",
                    {"function": "defer-app-parent", "outcome": "done"})
                assert done == 1
