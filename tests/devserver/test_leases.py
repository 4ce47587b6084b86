"""Leases, extensions, lease enforcement and the reply buffer (spec §5.2, §5.3)."""

from __future__ import annotations

import asyncio
import json

import pytest

from connect_worker.devserver import DevServer, is_ulid
from connect_worker.devserver.testing import fast_config, make_reply, scripted_worker
from connect_worker.protocol import pb

S = pb.SDKResponseStatus
Kind = pb.GatewayMessageType


async def test_extension_rules() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.send_event("test/evt")
        req = await w.next_request()
        l0 = req.lease_id
        a1 = await w.extend(req, l0)
        assert is_ulid(a1.new_lease_id) and a1.new_lease_id != l0
        assert a1.request_id == req.request_id and a1.function_slug == req.function_slug
        a2 = await w.extend(req, a1.new_lease_id)
        l2 = a2.new_lease_id
        assert is_ulid(l2) and l2 != a1.new_lease_id
        # One lost ACK: the previous lease from the owner gets the current ID back.
        assert (await w.extend(req, a1.new_lease_id)).new_lease_id == l2
        # Anything older is a NACK.
        assert not (await w.extend(req, l0)).HasField("new_lease_id")
        # Unknown request: NACK.
        other = pb.GatewayExecutorRequestData()
        other.CopyFrom(req)
        other.request_id = "01HZZZZZZZZZZZZZZZZZZZZZZZ"
        assert not (await w.extend(other, l2)).HasField("new_lease_id")
        await w.reply(make_reply(req, S.DONE, 1))
        await dev.wait_for(lambda: dev.dispatches[0].outcome == "replied")
        # Reply consumed, lease deleted: NACK.
        assert not (await w.extend(req, l2)).HasField("new_lease_id")


async def test_bad_lease_id_closes_socket() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.send_event("test/evt")
        req = await w.next_request()
        await w.send(Kind.WORKER_REQUEST_EXTEND_LEASE,
                     pb.WorkerRequestExtendLeaseData(request_id=req.request_id, lease_id="nope"))
        reason = "connect_worker_request_extend_lease_invalid_payload"
        assert await w.wait_closed() == (1008, reason)


async def test_bad_ack_payload_closes_socket() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await w.send_raw(pb.ConnectMessage(kind=Kind.WORKER_REQUEST_ACK,
                                           payload=b"\xff\xff").SerializeToString())
        assert await w.wait_closed() == (1008, "connect_worker_request_ack_invalid_payload")


async def test_extension_on_other_connection_and_capacity_ownership() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, instance_id="inst-a", max_worker_concurrency=5
    ) as w1, scripted_worker(dev, instance_id="inst-a", max_worker_concurrency=5) as w2, \
            scripted_worker(dev, instance_id="inst-b", max_worker_concurrency=5) as w3:
        await w1.connect()
        dev.faults.route = lambda ids: w1.conn_id if w1.conn_id in ids else None
        await dev.send_event("test/evt")
        req = await w1.next_request()
        await w2.connect()
        await w3.connect()
        # Same instance, other connection: accepted.
        lease = (await w2.extend(req)).new_lease_id
        assert lease
        # Other instance while the request is mapped to inst-a (capacity-limited): NACK.
        assert not (await w3.extend(req, lease)).HasField("new_lease_id")
        # Reply on yet another connection is accepted and ACKed there.
        await w2.reply(make_reply(req, S.DONE, "x"))
        await dev.wait_for(lambda: next(iter(dev.runs.values())).status.terminal)


async def test_unlimited_instance_anyone_with_current_lease_extends() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(
        dev, instance_id="a"
    ) as w1, scripted_worker(dev, instance_id="b") as w2:
        await w1.connect()
        dev.faults.route = lambda ids: w1.conn_id if w1.conn_id in ids else None
        await dev.send_event("test/evt")
        req = await w1.next_request()
        await w2.connect()
        assert (await w2.extend(req)).new_lease_id


async def test_fault_nack_and_withheld_extend_ack() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.send_event("test/evt")
        req = await w.next_request()
        dev.faults.nack_extensions = lambda rid: rid == req.request_id
        assert not (await w.extend(req)).HasField("new_lease_id")
        dev.faults.nack_extensions = False
        dev.faults.withhold_extend_ack = True
        with pytest.raises(TimeoutError):
            await w.send(Kind.WORKER_REQUEST_EXTEND_LEASE, pb.WorkerRequestExtendLeaseData(
                request_id=req.request_id, lease_id=req.lease_id))
            await w.expect(Kind.WORKER_REQUEST_EXTEND_LEASE_ACK, timeout=0.3)
        # The extension was applied even though its ACK was withheld, so the
        # original lease is now "previous" and gets the current ID back.
        dev.faults.withhold_extend_ack = False
        assert (await w.extend(req, req.lease_id)).new_lease_id


async def test_lease_lapse_retries_with_new_request_same_job() -> None:
    cfg = fast_config(lease_duration=0.4, lease_check_interval=0.1, lease_grace=0.1)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        first = await w.next_request()  # ACKed, never extended or answered
        second = await w.next_request(timeout=5)
        assert second.request_id != first.request_id
        assert second.job_id == first.job_id
        assert json.loads(second.request_payload)["ctx"]["attempt"] == 1
        assert dev.dispatches[0].outcome == "lease_lost"
        # The late reply for the abandoned request is ACKed but not used.
        await w.reply(make_reply(first, S.DONE, "late"))
        await w.reply(make_reply(second, S.DONE, "fresh"))
        run = await dev.wait_for_run(run_id)
        assert run.output == "fresh"
        errors = [h for h in run.history if h["type"] == "step_error"]
        assert errors[0]["error"] == "connect_worker_stopped_responding"


@pytest.mark.parametrize("limit", [None, 5])
async def test_extension_after_the_proxy_gave_up(limit: int | None) -> None:
    # As extend_lease.lua: the proxy keeps the lease record of a request it gave up on, so
    # a worker without a capacity limit that extends with its current lease ID renews a
    # lease nobody waits for (no NACK); with a limit, the request -> instance mapping is
    # gone and the extension is refused.
    cfg = fast_config(lease_duration=0.4, lease_check_interval=0.1, lease_grace=0.1)
    async with DevServer(cfg) as dev, \
            scripted_worker(dev, max_worker_concurrency=limit) as w:
        await w.connect()
        await dev.send_event("test/evt")
        first = await w.next_request()
        second = await w.next_request(timeout=5)  # the retry: the proxy gave up on first
        assert second.job_id == first.job_id
        ack = await w.extend(first, first.lease_id)
        assert ack.HasField("new_lease_id") is (limit is None)


async def test_a_lapsed_lease_is_taken_over_by_any_lease_id() -> None:
    cfg = fast_config(lease_duration=0.3, lease_check_interval=30.0)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.send_event("test/evt")
        req = await w.next_request()
        current = (await w.extend(req, req.lease_id)).new_lease_id
        # A live lease with another ID: NACK.
        assert not (await w.extend(req, "01HZZZZZZZZZZZZZZZZZZZZZZZ")).HasField("new_lease_id")
        await dev.wait_for(lambda: not dev.core.leases.is_live(req.request_id), timeout=2)
        taken = await w.extend(req, "01HZZZZZZZZZZZZZZZZZZZZZZZ")
        assert taken.HasField("new_lease_id") and taken.new_lease_id != current


async def test_expire_lease_injection() -> None:
    cfg = fast_config(lease_check_interval=30.0, lease_grace=0.1)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.send_event("test/evt")
        first = await w.next_request()
        assert await dev.expire_lease(first.request_id)
        second = await w.next_request(timeout=3)
        assert second.job_id == first.job_id and second.request_id != first.request_id


async def test_extensions_keep_a_long_step_alive() -> None:
    cfg = fast_config(lease_duration=0.3, lease_check_interval=0.05, lease_grace=0.05)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        lease = req.lease_id
        for _ in range(6):  # ~0.9 s of work, three lease durations
            lease = (await w.extend(req, lease)).new_lease_id
            await asyncio.sleep(0.15)  # simulated step work
        await w.reply(make_reply(req, S.DONE, "long"))
        run = await dev.wait_for_run(run_id)
        assert run.output == "long" and len(dev.dispatches) == 1


async def test_lease_enforcement_can_be_disabled() -> None:
    cfg = fast_config(lease_duration=0.1, lease_check_interval=0.05, lease_grace=0.05,
                      enforce_lease_expiry=False)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        await asyncio.sleep(0.4)  # well past the lease; nobody gives up
        await w.reply(make_reply(req, S.DONE, "slow"))
        assert (await dev.wait_for_run(run_id)).output == "slow"
        assert len(dev.dispatches) == 1


async def test_duplicate_replies_are_acked_first_wins() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        await w.reply(make_reply(req, S.DONE, "first"))
        await w.reply(make_reply(req, S.DONE, "second"))
        run = await dev.wait_for_run(run_id)
        assert run.output == "first"
        assert len(w.received(Kind.WORKER_REPLY_ACK)) == 2
        # Set-if-absent in the buffer (no proxy consumes this request ID).
        orphan = make_reply(req, S.DONE, "a")
        orphan.request_id = "01HYYYYYYYYYYYYYYYYYYYYYYY"
        await w.reply(orphan)
        orphan.body = b'"b"'
        await w.reply(orphan)
        assert [r.stored for r in dev.replies[-2:]] == [True, False]
        stored = dev.core.buffer.get(orphan.request_id)
        assert stored is not None and stored.body == b'"a"'
        assert all(r.acked for r in dev.replies)


async def test_withheld_and_dropped_replies() -> None:
    cfg = fast_config(lease_duration=0.3, lease_check_interval=0.05, lease_grace=0.05)
    async with DevServer(cfg) as dev, scripted_worker(dev) as w:
        await w.connect()
        dev.faults.withhold_reply_ack = True
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        await w.reply(make_reply(req, S.DONE, "kept"), wait_ack=False)
        run = await dev.wait_for_run(run_id)
        assert run.output == "kept"  # stored and used, just never ACKed
        assert not w.received(Kind.WORKER_REPLY_ACK)

        dev.faults.withhold_reply_ack = False
        dev.faults.drop_replies = True
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        await w.reply(make_reply(req, S.DONE, "lost"), wait_ack=False)
        retry = await w.next_request(timeout=5)  # lease lapsed -> retried
        assert retry.job_id == req.job_id
        dev.faults.drop_replies = False
        await w.reply(make_reply(retry, S.DONE, "retried"))
        assert (await dev.wait_for_run(run_id)).output == "retried"


async def test_reply_close_race_discards_reply_then_lease_retry() -> None:
    cfg = fast_config(lease_duration=0.3, lease_check_interval=0.05, lease_grace=0.05)
    async with DevServer(cfg) as dev:
        dev.faults.reply_close_race = 0.1
        async with scripted_worker(dev, instance_id="a") as w1:
            await w1.connect()
            run_id = (await dev.send_event("test/evt"))[0]
            req = await w1.next_request()
            await w1.reply(make_reply(req, S.DONE, "lost"), wait_ack=False)
            await w1.close()  # right after the reply, like the JS SDK
        await dev.wait_for(lambda: any(t.kind == "REPLY_DISCARDED" for t in dev.timeline))
        dev.faults.reply_close_race = 0.0
        async with scripted_worker(dev, instance_id="b") as w2:
            await w2.connect()
            retry = await w2.next_request(timeout=5)
            assert retry.job_id == req.job_id
            await w2.reply(make_reply(retry, S.DONE, "second"))
            assert (await dev.wait_for_run(run_id)).output == "second"


async def test_waiting_for_a_route_does_not_eat_the_lease() -> None:
    """Inngest does not wait for a route (GetRoute fails at once and the queue retries
    with a new lease); ours waits, and that wait must not count against the lease, or a
    step forwarded after a long wait (a deploy's replacement still starting) would lapse
    before its first extension and run twice."""
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await w.send(Kind.WORKER_PAUSE)  # connected, not routable: the forward waits
        await dev.send_event("test/evt")
        leases = dev.core.leases
        await dev.wait_for(lambda: bool(leases.leases))
        [lease] = leases.leases.values()
        lease.expires_at = 0.0  # as if the wait had lasted longer than the lease
        async with scripted_worker(dev) as ready:
            await ready.connect()
            req = await ready.next_request()
            assert req.request_id == lease.request_id and req.lease_id == lease.lease_id
            assert leases.is_live(req.request_id)
            assert (await ready.extend(req)).new_lease_id
