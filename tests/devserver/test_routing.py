"""Routing, capacity, forwarding/ACK, pause, gateway drain, socket loss (spec §5.2, §5.4)."""

from __future__ import annotations

import asyncio
from collections import Counter

from connect_worker.devserver import ConnStatus, DevServer, Phase, RunStatus
from connect_worker.devserver.testing import (
    fast_config,
    make_reply,
    scripted_worker,
    step_script,
)
from connect_worker.protocol import pb

S = pb.SDKResponseStatus
Kind = pb.GatewayMessageType


def _done(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
    return make_reply(req, S.DONE, "ok")


async def test_routing_by_function_slug() -> None:
    # The app's config is the last sync (w2: one + two); w1 is an older build
    # that only has "one", so "two" must never be routed to it.
    async with DevServer(fast_config(seed=1)) as dev, scripted_worker(
        dev, fn_ids=("one",), instance_id="i1", replier=_done
    ) as w1, scripted_worker(
        dev, fn_ids=("one", "two"), instance_id="i2", replier=_done
    ) as w2:
        await w1.connect()
        await w2.connect()
        await dev.wait_for_connection(lambda c: c.conn_id == w2.conn_id)
        runs = [r for _ in range(6) for r in await dev.send_event("test/evt")]
        assert len(runs) == 12
        for r in runs:
            assert (await dev.wait_for_run(r)).status is RunStatus.COMPLETED
        assert {r.function_slug for r in w1.requests} <= {"test-app-one"}
        assert "test-app-two" in {r.function_slug for r in w2.requests}


async def test_instance_capacity_shared_across_connections() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, instance_id="cap", max_worker_concurrency=1
    ) as w1, scripted_worker(dev, instance_id="cap", max_worker_concurrency=1) as w2:
        await w1.connect()
        await w2.connect()
        r1 = (await dev.send_event("test/evt"))[0]
        r2 = (await dev.send_event("test/evt"))[0]
        await dev.wait_for(lambda: len(dev.dispatches) == 1)
        # The instance's one slot is taken on both of its connections: the router (asked
        # again on every state change, so asking it here is what the queue sees) has no
        # connection to offer, and the second run waits.
        await dev.wait_for(lambda: dev.dispatches[0].outcome == "acked")
        first = dev.dispatches[0]
        route = dev.core.router.route("test-app", first.function_slug)
        assert (route.conn_id, route.error) == (None, "connect_all_workers_at_capacity")
        assert len(dev.dispatches) == 1
        first = dev.dispatches[0]
        holder = w1 if first.conn_id == w1.conn_id else w2
        req = holder.requests[0]
        await holder.reply(make_reply(req, S.DONE, "1"))
        await dev.wait_for(lambda: len(dev.dispatches) == 2)
        second = dev.dispatches[1]
        other = w1 if second.conn_id == w1.conn_id else w2
        frame = await other.expect(
            Kind.GATEWAY_EXECUTOR_REQUEST,
            lambda r: r.parse(pb.GatewayExecutorRequestData).request_id == second.request_id,
        )
        await other.reply(make_reply(frame.parse(pb.GatewayExecutorRequestData), S.DONE, "2"))
        assert {(await dev.wait_for_run(r)).status for r in (r1, r2)} == {RunStatus.COMPLETED}


async def test_all_workers_at_capacity() -> None:
    cfg = fast_config(route_wait=0.2, default_retries=0)
    async with DevServer(cfg) as dev, scripted_worker(dev, max_worker_concurrency=1) as w:
        await w.connect()
        await dev.send_event("test/evt")
        await w.next_request()
        r2 = (await dev.send_event("test/evt"))[0]
        run = await dev.wait_for_run(r2)
        assert run.error["message"] == "connect_all_workers_at_capacity"


async def test_pause_fails_unacked_forward_and_reroutes() -> None:
    async with DevServer(fast_config(ack_timeout=30.0)) as dev, scripted_worker(
        dev, instance_id="slow", auto_ack=False
    ) as w1, scripted_worker(dev, instance_id="good", replier=_done) as w2:
        await w1.connect()
        dev.faults.route = lambda ids: w1.conn_id if w1.conn_id in ids else None
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w1.next_request()
        await w2.connect()
        await dev.wait_for_connection(lambda c: c.conn_id == w2.conn_id)
        await w1.send(Kind.WORKER_PAUSE)
        run = await dev.wait_for_run(run_id, timeout=5)
        assert run.status is RunStatus.COMPLETED
        assert [d.outcome for d in dev.dispatches] == ["forward_failed", "replied"]
        assert [d.request_id for d in dev.dispatches] == [req.request_id] * 2
        assert dev.dispatches[1].conn_id == w2.conn_id
        info = dev.connection(w1.conn_id)
        assert info.status is ConnStatus.DRAINING and info.phase is Phase.DRAINING


async def test_paused_worker_keeps_extending_and_replying() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        await w.send(Kind.WORKER_PAUSE)
        assert (await w.extend(req)).new_lease_id
        await w.send(Kind.WORKER_HEARTBEAT)
        await w.expect(Kind.GATEWAY_HEARTBEAT)
        await w.reply(make_reply(req, S.DONE, "after pause"))
        assert (await dev.wait_for_run(run_id)).output == "after pause"


async def test_no_ack_times_out_and_reroutes_then_exhausts() -> None:
    cfg = fast_config(ack_timeout=0.2, forward_attempts=2, default_retries=0)
    async with DevServer(cfg) as dev, scripted_worker(dev, auto_ack=False) as w:
        await w.connect()
        run = await dev.wait_for_run((await dev.send_event("test/evt"))[0])
        assert run.status is RunStatus.FAILED
        assert run.error["message"] == "failed to route request to gateway"
        assert [d.outcome for d in dev.dispatches] == ["forward_failed", "forward_failed"]
        assert len(w.requests) == 2


async def test_pause_ack_race_duplicates_execution() -> None:
    """faults.delay_request_ack lets a PAUSE sent right after an ACK win (§5.2)."""
    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, instance_id="a", auto_ack=False
    ) as w1, scripted_worker(dev, instance_id="b", replier=step_script(["s"])) as w2:
        await w1.connect()
        dev.faults.route = lambda ids: w1.conn_id if w1.conn_id in ids else None
        dev.faults.delay_request_ack = 0.2
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w1.next_request()
        await w2.connect()
        await w1.ack(req)
        await w1.send(Kind.WORKER_PAUSE)
        # Worker 1 runs the step anyway and replies; worker 2 got it re-routed.
        await w1.reply(step_script(["s"])(req))  # type: ignore[arg-type]
        run = await dev.wait_for_run(run_id)
        assert run.status is RunStatus.COMPLETED
        assert dev.dispatches[0].outcome == "forward_failed"
        assert max(dev.step_executions().values()) == 1  # same request_id: deduped
        assert len({d.conn_id for d in dev.dispatches if d.request_id == req.request_id}) == 2


async def test_gateway_closing_worker_does_not_close() -> None:
    async with DevServer(fast_config(drain_window=0.3)) as dev, scripted_worker(dev) as w:
        await w.connect()
        info = await dev.wait_for_connection()
        await dev.gateway_closing(info.conn_id)
        await w.expect(Kind.GATEWAY_CLOSING)
        assert await w.wait_closed() == (1001, "connect_gateway_closing")
        assert info.close_class == "GATEWAY:connect_gateway_closing"
        assert info.status is ConnStatus.DISCONNECTED


async def test_gateway_closing_worker_reconnects_and_replies_on_new_socket() -> None:
    async with DevServer(fast_config(gateway_groups=("gw-a", "gw-b"))) as dev, \
            scripted_worker(dev, instance_id="same") as old:
        await old.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await old.next_request()
        closing = asyncio.create_task(dev.gateway_closing(old.conn_id))
        await old.expect(Kind.GATEWAY_CLOSING)
        info = dev.connection(old.conn_id)
        assert info.phase is Phase.DRAINING and info.status is ConnStatus.READY
        async with scripted_worker(dev, instance_id="same") as new:
            await new.start_session(exclude_gateways=["gw-a"])
            assert new.start is not None and new.start.gateway_group == "gw-b"
            await new.connect()
            await old.close()
            await asyncio.wait_for(closing, 2)
            assert info.close_class == "WORKER_SHUTDOWN"
            assert (await new.extend(req)).new_lease_id
            await new.reply(make_reply(req, S.DONE, "moved"))
            assert (await dev.wait_for_run(run_id)).output == "moved"


async def test_gateway_closing_fails_unacked_forward() -> None:
    async with DevServer(fast_config(ack_timeout=30.0, drain_window=0.2)) as dev, \
            scripted_worker(dev, instance_id="a", auto_ack=False) as w1, \
            scripted_worker(dev, instance_id="b", replier=_done) as w2:
        await w1.connect()
        dev.faults.route = lambda ids: w1.conn_id if w1.conn_id in ids else None
        run_id = (await dev.send_event("test/evt"))[0]
        await w1.next_request()
        await w2.connect()
        await dev.wait_for_connection(lambda c: c.conn_id == w2.conn_id)
        await dev.gateway_closing(w1.conn_id)
        assert (await dev.wait_for_run(run_id)).status is RunStatus.COMPLETED
        assert dev.dispatches[0].outcome == "forward_failed"


async def test_drain_gateway_refuses_upgrades() -> None:
    cfg = fast_config(drain_window=0.2, gateway_groups=("gw-a", "gw-b"))
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.drain_gateway("gw-a")
        assert await w.wait_closed() == (1001, "connect_gateway_closing")
        async with scripted_worker(dev) as late:
            await late.start_session()
            assert late.start is not None and late.start.gateway_group == "gw-b"
            await late.open(dev.gateway_urls["gw-a"])
            assert await late.wait_closed() == (1001, "connect_gateway_closing")


async def test_drop_socket_reroutes_unacked_and_waits_for_acked() -> None:
    cfg = fast_config(lease_duration=0.5, lease_check_interval=0.05, lease_grace=0.05,
                      ack_timeout=30.0)
    async with DevServer(cfg) as dev, scripted_worker(dev, instance_id="a") as w1:
        await w1.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w1.next_request()
        await dev.wait_for(lambda: dev.dispatches[0].outcome == "acked")
        await dev.drop_socket(w1.conn_id)
        assert dev.connection(w1.conn_id).close_code == 1006
        async with scripted_worker(dev, instance_id="a") as w2:
            await w2.connect()
            # The ACKed request is not re-sent while its lease lives; the
            # worker can keep extending it on the new connection.
            assert (await w2.extend(req)).new_lease_id
            await w2.reply(make_reply(req, S.DONE, "survived"))
            assert (await dev.wait_for_run(run_id)).output == "survived"
            assert len(dev.dispatches) == 1


async def test_weighted_routing_prefers_newest_group() -> None:
    async with DevServer(fast_config(seed=7)) as dev, scripted_worker(
        dev, instance_id="old", replier=_done
    ) as old:
        await old.connect()
        await asyncio.sleep(0.05)  # make the groups' ages differ
        async with scripted_worker(dev, instance_id="new", replier=_done) as new:
            await new.connect(apps=[pb.AppConfiguration(
                app_name="test-app", app_version="v2",
                functions=__import__("json").dumps(new.functions).encode())])
            await dev.wait_for_connection(lambda c: c.instance_id == "new")
            runs = [(await dev.send_event("test/evt"))[0] for _ in range(40)]
            for r in runs:
                await dev.wait_for_run(r)
            picks = Counter(d.conn_id for d in dev.dispatches)
            assert picks[new.conn_id] > picks[old.conn_id] > 0


async def test_worker_groups_sync_and_rollback_hazard() -> None:
    """A group is synced once; a re-created old group reverts the app config (§5.5)."""
    async with DevServer(fast_config()) as dev:
        async with scripted_worker(dev, fn_ids=("one",), instance_id="v1") as v1:
            await v1.connect()
            async with scripted_worker(dev, fn_ids=("one",), instance_id="v1b") as v1b:
                await v1b.connect()
                await dev.wait_for(lambda: len(dev.live_connections) == 2)
                assert len(dev.syncs) == 1  # same hash: reused, no second sync
            async with scripted_worker(dev, fn_ids=("one", "two"), instance_id="v2") as v2:
                await v2.connect()
                await dev.wait_for(lambda: len(dev.syncs) == 2)
                assert dev.syncs[-1].changed
                assert set(dev.functions["test-app"]) == {"test-app-one", "test-app-two"}
        await dev.wait_for(lambda: not dev.live_connections)
        # v1's group vanished with its last connection: reconnecting re-syncs the
        # old config (rollback).
        async with scripted_worker(dev, fn_ids=("one",), instance_id="v1") as again:
            await again.connect()
            await dev.wait_for(lambda: len(dev.syncs) == 3)
            assert set(dev.functions["test-app"]) == {"test-app-one"}
