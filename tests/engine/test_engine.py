"""The engine against the local gateway over real loopback sockets.

Every test counts what matters: step bodies executed (in the body itself),
dispatches per job, replies received and how (socket or flush), connections.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from connect_worker.devserver import ConnStatus, DevServer, DevServerConfig, RunStatus
from connect_worker.devserver.testing import realistic_races
from connect_worker.protocol import pb

from .apps import probe
from .harness import running_worker


@pytest.fixture(autouse=True)
def _reset_probe() -> None:
    probe.reset()


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with DevServer(DevServerConfig.fast()) as server:
        # The real gateway's reply/close race (a reply read just before its socket closes
        # is lost): the tests below must hold with it.
        yield realistic_races(server)


def fast_dev(**changes: object) -> DevServer:
    return DevServer(DevServerConfig.fast(**changes))


def reply_for(dev: DevServer, request_id: str) -> list[float]:
    """When each reply (socket or flush) for ``request_id`` reached the gateway."""
    return [r.ts for r in dev.replies + dev.flushes if r.request_id == request_id]


def step_dispatch(dev: DevServer, slug_suffix: str, dispatches: int = 2) -> str:
    """The request that ran the function's step: the first dispatch (the second is the
    discovery call that returns the function's result)."""
    ids = [d.request_id for d in dev.dispatches if d.function_slug.endswith(slug_suffix)]
    assert len(ids) == dispatches, ids
    return ids[0]


async def test_three_step_function_runs_each_step_exactly_once(dev: DevServer) -> None:
    async with running_worker(dev):
        [run_id] = await dev.send_event("t/three", {})
        run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert run.output == ["A", "B", "C"]
    assert probe.counts == {"a": 1, "b": 1, "c": 1}
    assert set(dev.dispatch_counts_by_job().values()) == {1}
    assert not dev.errors


async def test_twenty_concurrent_runs_complete(dev: DevServer) -> None:
    async with running_worker(dev):
        run_ids = [rid for _ in range(20) for rid in await dev.send_event("t/three", {})]
        runs = [await dev.wait_for_run(rid, timeout=30) for rid in run_ids]
    assert {r.status for r in runs} == {RunStatus.COMPLETED}
    assert probe.counts == {"a": 20, "b": 20, "c": 20}
    assert set(dev.dispatch_counts_by_job().values()) == {1}


async def test_step_lasting_several_leases_is_not_redispatched() -> None:
    async with fast_dev(lease_duration=0.6, extend_lease_interval=0.15,
                        lease_check_interval=0.1, lease_grace=0.1) as dev:
        async with running_worker(dev):
            [run_id] = await dev.send_event("t/slow", {"seconds": 2.5})
            run = await dev.wait_for_run(run_id, timeout=20)
        extensions = [e for e in dev.timeline if e.kind == "WORKER_REQUEST_EXTEND_LEASE"]
    assert run.status is RunStatus.COMPLETED
    assert probe.counts == {"slow": 1}
    assert set(dev.dispatch_counts_by_job().values()) == {1}
    assert len(extensions) >= 10  # 2.5 s of step / 0.15 s interval, minus slack


def first_dispatch(dev: DevServer, slug_suffix: str) -> str:
    return next(d.request_id for d in dev.dispatches if d.function_slug.endswith(slug_suffix))


@pytest.mark.parametrize("step_ends", ["after_swap", "during_reconnect"])
async def test_gateway_closing_mid_step(step_ends: str) -> None:
    """The reply takes the path the design says, decided by events, not by a clock:
    after the swap, the new socket; while no new socket can be had, the old one (it
    still carries replies after GATEWAY_CLOSING)."""
    async with fast_dev(gateway_groups=("gw-a", "gw-b"), drain_window=5.0) as dev:
        async with running_worker(dev):
            [run_id] = await dev.send_event("t/gated", {})
            await probe.wait_started("gated")
            request_id = first_dispatch(dev, "gated")
            [old] = dev.live_connections
            if step_ends == "during_reconnect":
                dev.faults.gateway_down_until = time.monotonic() + 60  # no new gateway yet
            closing = asyncio.create_task(dev.gateway_closing(old.conn_id))
            if step_ends == "during_reconnect":
                await dev.wait_for(lambda: len(dev.start_calls) >= 2, 10)  # asked, refused
                probe.gates["gated"].set()
                await dev.wait_for(lambda: bool(reply_for(dev, request_id)), 10)
                dev.faults.gateway_down_until = 0.0
            await dev.wait_for(lambda: any(c.conn_id != old.conn_id and c.status is
                                           ConnStatus.READY for c in dev.connections), 10)
            probe.gates["gated"].set()
            run = await dev.wait_for_run(run_id, timeout=15)
            await asyncio.wait_for(closing, 10)
        assert request_id == step_dispatch(dev, "gated")
        new = next(c for c in dev.connections if c.conn_id != old.conn_id)
        timeline = list(dev.timeline)
    assert run.status is RunStatus.COMPLETED
    assert probe.counts == {"gated": 1}
    assert set(dev.dispatch_counts_by_job().values()) == {1}
    ready_at = min(e.ts for e in timeline if e.kind == "WORKER_READY" and e.conn_id == new.conn_id)
    [first] = [r for r in dev.replies if r.request_id == request_id][:1]
    assert first.via == "ws"
    if step_ends == "after_swap":
        assert first.conn_id == new.conn_id
    else:
        assert first.conn_id == old.conn_id and first.ts < ready_at
    # The replacement excluded the draining gateway and was READY before the old socket closed.
    assert dev.start_calls[-1].exclude_gateways == [old.gateway_group]
    assert new.gateway_group != old.gateway_group
    assert old.closed_at is not None and ready_at < old.closed_at
    assert old.close_code == 1000


@pytest.mark.parametrize("step_ends", ["after_reconnect", "during_reconnect"])
async def test_socket_drop_mid_step(step_ends: str) -> None:
    """After the reconnect the reply goes on the new socket; with no socket at all it is
    flushed at once, before any new socket exists."""
    async with fast_dev() as dev:
        async with running_worker(dev) as worker:
            [run_id] = await dev.send_event("t/gated", {})
            await probe.wait_started("gated")
            request_id = first_dispatch(dev, "gated")
            [old] = dev.live_connections
            if step_ends == "during_reconnect":
                dev.faults.gateway_down_until = time.monotonic() + 60
            await dev.drop_socket(old.conn_id)
            if step_ends == "during_reconnect":
                probe.gates["gated"].set()
                await dev.wait_for(lambda: bool(reply_for(dev, request_id)), 10)
                dev.faults.gateway_down_until = 0.0
            await dev.wait_for(lambda: any(c.conn_id != old.conn_id and c.status is
                                           ConnStatus.READY for c in dev.connections), 10)
            await asyncio.wait_for(worker.wait_ready(), 10)
            probe.gates["gated"].set()
            run = await dev.wait_for_run(run_id, timeout=15)
        assert request_id == step_dispatch(dev, "gated")
    assert run.status is RunStatus.COMPLETED
    assert probe.counts == {"gated": 1}
    assert set(dev.dispatch_counts_by_job().values()) == {1}
    new = next(c for c in dev.connections if c.conn_id != old.conn_id)
    ready_at = min(e.ts for e in dev.timeline
                   if e.kind == "WORKER_READY" and e.conn_id == new.conn_id)
    if step_ends == "after_reconnect":
        [first] = [r for r in dev.replies if r.request_id == request_id][:1]
        assert first.via == "ws" and first.conn_id == new.conn_id
    else:
        [flushed] = [r for r in dev.flushes if r.request_id == request_id][:1]
        assert flushed.ts < ready_at
    instance_ids = {c.instance_id for c in dev.connections}
    assert len(dev.connections) == 2 and instance_ids == {"engine-test-1"}


async def test_withheld_reply_ack_is_flushed() -> None:
    async with fast_dev() as dev:
        dev.faults.withhold_reply_ack = True
        async with running_worker(dev, reply_ack_timeout=0.3):
            [run_id] = await dev.send_event("t/three", {})
            run = await dev.wait_for_run(run_id, timeout=15)
            await dev.wait_for(lambda: len(dev.flushes) >= 4, 5)
    assert run.status is RunStatus.COMPLETED
    assert probe.counts == {"a": 1, "b": 1, "c": 1}
    flushed = {f.request_id for f in dev.flushes}
    assert flushed == {d.request_id for d in dev.dispatches}


def executor_request(app_name: str, slug: str, request_id: str) -> bytes:
    return bytes(pb.GatewayExecutorRequestData(
        request_id=request_id, app_name=app_name, function_slug=slug, run_id="01RUN",
        lease_id="01LEASE", job_id="job-1", request_payload=b"{}",
        system_trace_ctx=b"{}", user_trace_ctx=b"{}",
    ).SerializeToString())


@pytest.mark.parametrize(("app", "slug"), [("ghost-app", "ghost-app-x"), ("engine", "engine-nope")])
async def test_unknown_app_or_function_gets_an_error_reply_at_once(
    dev: DevServer, app: str, slug: str
) -> None:
    async with running_worker(dev):
        [conn] = dev.live_connections
        sent_at = time.time()
        await dev.send_message(conn.conn_id, pb.GatewayMessageType.GATEWAY_EXECUTOR_REQUEST,
                               executor_request(app, slug, "01UNKNOWN"))
        await dev.wait_for(lambda: bool(reply_for(dev, "01UNKNOWN")), 5)
    [reply] = [r for r in dev.replies if r.request_id == "01UNKNOWN"]
    assert reply.response.status == pb.SDKResponseStatus.ERROR
    assert reply.ts - sent_at < 1.0
    assert slug in reply.response.body.decode() or app in reply.response.body.decode()


async def test_garbage_and_unknown_kinds_do_not_break_the_connection(dev: DevServer) -> None:
    async with running_worker(dev):
        [conn] = dev.live_connections
        await dev.send_raw(conn.conn_id, b"\xff\x00\x13 not protobuf")
        await dev.send_raw(conn.conn_id, "a text frame")
        await dev.send_message(conn.conn_id, 99, b"future payload")
        await dev.send_message(conn.conn_id, pb.GatewayMessageType.GATEWAY_EXECUTOR_REQUEST,
                               b"\x0a\xff\xff")  # truncated field
        await dev.send_message(conn.conn_id, pb.GatewayMessageType.WORKER_REPLY, b"")
        [run_id] = await dev.send_event("t/three", {})
        run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert len(dev.connections) == 1 and len(dev.start_calls) == 1


async def test_blocking_step_cannot_starve_heartbeats_or_leases() -> None:
    # The step freezes its own event loop for > 5 heartbeat intervals and > 2 leases.
    async with fast_dev(heartbeat_interval=0.2, heartbeat_miss_close=0.7, heartbeat_stale=0.5,
                        lease_duration=0.6, extend_lease_interval=0.15,
                        lease_check_interval=0.1, lease_grace=0.1) as dev:
        async with running_worker(dev):
            [conn] = dev.live_connections
            before = conn.heartbeats
            [run_id] = await dev.send_event("t/blocking", {"seconds": 1.5})
            run = await dev.wait_for_run(run_id, timeout=15)
            during = conn.heartbeats - before
    assert run.status is RunStatus.COMPLETED
    assert probe.counts == {"blocking": 1}
    assert set(dev.dispatch_counts_by_job().values()) == {1}
    assert len(dev.connections) == 1
    assert during >= 5


async def test_sync_function_sees_its_request_identity(dev: DevServer) -> None:
    async with running_worker(dev):
        [run_id] = await dev.send_event("t/sync", {})
        run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert run.output in {d.job_id for d in dev.dispatches}


async def test_step_body_sees_which_attempt_it_is(dev: DevServer) -> None:
    async with running_worker(dev):
        [run_id] = await dev.send_event("t/second-try", {})
        run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert run.output == [0, 1]
    assert probe.counts == {"second-try": 2}


async def test_shutdown_mid_step_pauses_finishes_and_closes_cleanly(dev: DevServer) -> None:
    async with running_worker(dev) as worker:
        [run_id] = await dev.send_event("t/gated", {})
        await probe.wait_started("gated")
        [conn] = dev.live_connections
        worker.request_shutdown()
        await dev.wait_for(lambda: conn.paused, 5)
        assert not worker.ready
        probe.gates["gated"].set()
        await dev.wait_for(lambda: conn.close_code is not None, 10)
    # Only the step ran here: the run's next call waits for another worker.
    request_id = step_dispatch(dev, "gated", dispatches=1)
    [reply] = [r for r in dev.replies if r.request_id == request_id]
    assert reply.acked
    assert (conn.close_code, conn.close_reason) == (1000, "WORKER_SHUTDOWN")
    assert worker.exit_code == 0
    assert probe.counts == {"gated": 1}
    # The step's discovery continues elsewhere later; this worker took nothing after PAUSE.
    pause_at = next(e.ts for e in dev.timeline if e.kind == "WORKER_PAUSE")
    assert not [d for d in dev.dispatches if d.conn_id == conn.conn_id and d.sent_at > pause_at]
    assert dev.runs[run_id].status is not RunStatus.FAILED


async def test_lease_nack_cancels_the_step_and_sends_no_reply() -> None:
    async with fast_dev(lease_duration=0.6, extend_lease_interval=0.15, lease_check_interval=0.1,
                        lease_grace=0.1) as dev:
        first: list[str] = []

        def nack_first(request_id: str) -> bool:
            first.append(request_id)
            return request_id == first[0]

        dev.faults.nack_extensions = nack_first
        async with running_worker(dev):
            [run_id] = await dev.send_event("t/gated", {})
            await dev.wait_for(lambda: len(dev.dispatches) >= 2, 10)
            probe.gates["gated"].set()
            run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert probe.cancelled == {"gated": 1}
    assert not reply_for(dev, first[0])


async def test_start_failures_are_retried_until_it_connects() -> None:
    async with fast_dev() as dev:
        dev.faults.start_failures = [500, 502, 429, 500, 503, 500]
        async with running_worker(dev, reconnect_max_backoff=0.05):
            [run_id] = await dev.send_event("t/three", {})
            run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert [c.status for c in dev.start_calls[:7]] == [500, 502, 429, 500, 503, 500, 200]


async def test_max_worker_concurrency_is_honoured(dev: DevServer) -> None:
    async with running_worker(dev, max_worker_concurrency=2):
        run_ids = [rid for _ in range(6) for rid in await dev.send_event("t/slow",
                                                                          {"seconds": 0.3})]
        runs = [await dev.wait_for_run(rid, timeout=20) for rid in run_ids]
    assert {r.status for r in runs} == {RunStatus.COMPLETED}
    assert probe.max_running <= 2
    assert dev.connections[0].max_worker_concurrency == 2


async def test_handshake_uses_manual_readiness_and_identifies_the_worker(dev: DevServer) -> None:
    async with running_worker(dev, app_version="build-42"):
        [conn] = dev.live_connections
    assert conn.manual_readiness is True
    assert conn.app_version == {"engine": "build-42"}
    request = conn.connect_request
    assert request.instance_id == "engine-test-1"
    assert request.framework == "connect"


async def test_cloud_mode_authenticates_with_the_fallback_key() -> None:
    primary = "signkey-prod-" + "aa" * 32
    fallback = "signkey-prod-" + "bb" * 32
    async with fast_dev(signing_key=fallback) as dev:
        async with running_worker(dev, dev=False, signing_key=primary,
                                  signing_key_fallback=fallback):
            [run_id] = await dev.send_event("t/three", {})
            run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    statuses = [c.status for c in dev.start_calls]
    assert statuses[:2] == [401, 200]


async def test_refused_signing_key_stops_the_worker_with_a_fatal_exit_code() -> None:
    from connect_worker.engine.worker import EXIT_FATAL, Worker

    from . import apps
    from .harness import worker_config

    async with fast_dev(signing_key="signkey-prod-" + "cc" * 32) as dev:
        config = worker_config(dev, dev=False, signing_key="signkey-prod-" + "dd" * 32)
        worker = Worker(config, [(apps.client, apps.functions)])
        code = await asyncio.wait_for(worker.run(), 10)
    assert code == EXIT_FATAL
    assert [c.status for c in dev.start_calls] == [401]


async def test_sync_rejected_again_and_again_stops_the_worker() -> None:
    from connect_worker.engine.worker import EXIT_FATAL, MAX_CONSECUTIVE_SYNC_FAILURES, Worker

    from . import apps
    from .harness import worker_config

    async with fast_dev() as dev:
        dev.faults.sync_failure = ("connect_invalid_function_config", "bad function config")
        dev.faults.sync_failure_persistent = True
        worker = Worker(worker_config(dev, reconnect_max_backoff=0.05),
                        [(apps.client, apps.functions)])
        code = await asyncio.wait_for(worker.run(), 15)
    assert code == EXIT_FATAL
    assert len(dev.start_calls) == MAX_CONSECUTIVE_SYNC_FAILURES
    assert all(c.close_reason == "connect_invalid_function_config" for c in dev.connections)


async def test_one_sync_failure_is_retried(dev: DevServer) -> None:
    dev.faults.sync_failure = ("connect_sync_pending", "try again")
    async with running_worker(dev):
        [run_id] = await dev.send_event("t/three", {})
        run = await dev.wait_for_run(run_id, timeout=15)
    assert run.status is RunStatus.COMPLETED
    assert [c.close_reason for c in dev.connections][:1] == ["connect_sync_pending"]


async def test_heartbeats_racing_a_close_never_crash_the_worker() -> None:
    # Regression: a heartbeat built while close() awaited the close handshake raised
    # LocalProtocolError (state CLOSED) and crashed the worker after a clean drain, or
    # mid-step when the old socket was retired after GATEWAY_CLOSING.
    async with fast_dev(heartbeat_interval=0.002, gateway_groups=("gw-a", "gw-b")) as dev:
        for attempt in range(4):
            async with running_worker(dev, instance_id=f"race-{attempt}") as worker:
                [run_id] = await dev.send_event("t/gated", {"key": f"race-{attempt}"})
                await probe.wait_started(f"race-{attempt}")
                # With 2 ms heartbeats a loaded machine can miss one and reconnect:
                # take whichever READY connection the worker has now.
                conn = await dev.wait_for_connection(
                    lambda c, name=f"race-{attempt}": c.instance_id == name)
                await dev.gateway_closing(conn.conn_id)
                probe.gates[f"race-{attempt}"].set()
                run = await dev.wait_for_run(run_id, timeout=15)
                assert run.status is RunStatus.COMPLETED
            assert worker.exit_code == 0


async def test_worker_status_reports_in_flight_requests_when_the_gateway_asks() -> None:
    async with fast_dev(status_interval=0.1) as dev:
        async with running_worker(dev) as worker:
            [run_id] = await dev.send_event("t/gated", {})
            await probe.wait_started("gated")
            request_id = dev.dispatches[0].request_id

            def reported(text: str) -> bool:
                return any(e.kind == "WORKER_STATUS" and text in (e.detail or "")
                           for e in dev.timeline)

            await dev.wait_for(lambda: reported(f"in_flight={request_id} shutdown=False"), 5)
            worker.request_shutdown()
            await dev.wait_for(lambda: reported("shutdown=True"), 5)
            probe.gates["gated"].set()
    assert dev.runs[run_id].status is not RunStatus.FAILED


async def test_no_worker_status_by_default(dev: DevServer) -> None:
    async with running_worker(dev):
        [run_id] = await dev.send_event("t/three", {})
        await dev.wait_for_run(run_id, timeout=15)
    assert not [e for e in dev.timeline if e.kind == "WORKER_STATUS"]


async def test_user_code_sees_the_drain_and_checkpoints(dev: DevServer) -> None:
    async with running_worker(dev) as worker:
        [run_id] = await dev.send_event("t/drain-aware", {})
        await probe.wait_started("drain-aware")
        worker.request_shutdown()
        request_id = dev.dispatches[0].request_id
        await dev.wait_for(lambda: any(r.request_id == request_id and r.acked
                                       for r in dev.replies), 10)
    [reply] = [r for r in dev.replies if r.request_id == request_id]
    assert b"checkpointed" in reply.response.body
    assert worker.exit_code == 0
    assert dev.runs[run_id].status is not RunStatus.FAILED
