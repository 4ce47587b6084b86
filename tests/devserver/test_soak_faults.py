"""The dev gateway's faults for the soak: the re-route race (spec §5.2), a whole-gateway
restart, a failing flush endpoint and added latency."""

from __future__ import annotations

import asyncio
import time

import httpx

from connect_worker.devserver import DevServer, RunStatus
from connect_worker.devserver.testing import fast_config, make_reply, scripted_worker
from connect_worker.protocol import pb

S = pb.SDKResponseStatus
Kind = pb.GatewayMessageType

PROTOBUF = {"content-type": "application/protobuf"}


async def test_late_ack_after_reroute_is_ignored() -> None:
    """GATEWAY_CLOSING fails the un-ACKed forward and the proxy re-routes it (same request
    id, same lease); the first worker's ACK, still on the wire, must not count as the
    second worker's: both workers now hold the request, which is the race the worker
    has to detect itself."""
    cfg = fast_config(ack_timeout=30.0, drain_window=0.3, gateway_groups=("gw-a", "gw-b"))
    async with DevServer(cfg) as dev, \
            scripted_worker(dev, instance_id="a", auto_ack=False) as w1, \
            scripted_worker(dev, instance_id="b", auto_ack=False) as w2:
        await w1.connect()
        await w2.connect()
        first = {"a": w1.conn_id}
        dev.faults.route = lambda ids: first.pop("a", None) or w2.conn_id
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w1.next_request()
        closing = asyncio.create_task(dev.gateway_closing(w1.conn_id))
        rerouted = await w2.next_request()
        assert rerouted.request_id == req.request_id and rerouted.lease_id == req.lease_id
        await w1.ack(req)  # late: the forward to w1 already failed
        await dev.wait_for(lambda: any(e.kind == "ACK_IGNORED" and e.conn_id == w1.conn_id
                                       for e in dev.timeline))
        [failed, pending] = dev.dispatches
        assert failed.outcome == "forward_failed" and pending.conn_id == w2.conn_id
        assert pending.acked_at is None  # w1's ACK did not complete w2's forward
        await w2.ack(rerouted)
        await dev.wait_for(lambda: pending.acked_at is not None)
        await w2.reply(make_reply(rerouted, S.DONE, "b"))
        assert (await dev.wait_for_run(run_id)).output == "b"
        await closing


async def test_restart_drops_every_socket_and_refuses_start_for_a_while() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        await dev.restart_gateway(0.5)
        assert await w.wait_closed() == (None, None)  # no close frame
        assert dev.connections[0].close_code == 1006
        assert dev.connections[0].close_class == "GATEWAY_RESTART"
        async with httpx.AsyncClient() as http:
            res = await http.post(f"{dev.api_url}/v0/connect/start",
                                  content=pb.StartRequest().SerializeToString(),
                                  headers=PROTOBUF)
            assert res.status_code == 503
        await dev.wait_for(lambda: not dev.faults.gateway_down(), timeout=2)
        async with scripted_worker(dev) as again:
            await again.connect()  # start and upgrade work again


async def test_flush_fails_for_a_while() -> None:
    async with DevServer(fast_config()) as dev, httpx.AsyncClient() as http:
        dev.fail_flush(0.3)
        assert (await http.post(f"{dev.api_url}/v0/connect/flush", content=b"x",
                                headers=PROTOBUF)
                ).status_code == 503
        deadline = dev.faults.flush_failing_until
        await asyncio.sleep(max(0.0, deadline - time.monotonic()) + 0.01)
        # Back to normal handling (this body is empty, hence 400).
        assert (await http.post(f"{dev.api_url}/v0/connect/flush", headers=PROTOBUF)
                ).status_code == 400


async def test_latency_delays_frames_both_ways_and_keeps_order() -> None:
    async with DevServer(fast_config()) as dev, scripted_worker(dev) as w:
        await w.connect()
        dev.faults.frame_latency = 0.15
        sent = time.monotonic()
        for _ in range(5):
            await w.send(Kind.WORKER_HEARTBEAT)
        for _ in range(5):
            await w.expect(Kind.GATEWAY_HEARTBEAT)
        # At least the latency each way (a lower bound; no speed assertion).
        assert time.monotonic() - sent >= 0.3
        run_id = (await dev.send_event("test/evt"))[0]
        req = await w.next_request()
        await w.ack(req)
        await w.reply(make_reply(req, S.DONE, "slow"))
        assert (await dev.wait_for_run(run_id)).status is RunStatus.COMPLETED


async def test_a_worker_can_connect_while_frames_are_late() -> None:
    # GATEWAY_HELLO serializes to an empty frame: the delay line once took it for its
    # end-of-socket marker, so no handshake could finish during a latency fault (a soak
    # replica stayed disconnected for 7 s, and a re-route race went unchecked).
    async with DevServer(fast_config()) as dev:
        dev.faults.frame_latency = 0.1
        async with scripted_worker(dev) as w:
            await w.connect()
            run_id = (await dev.send_event("test/evt"))[0]
            req = await w.next_request()
            await w.ack(req)
            await w.reply(make_reply(req, S.DONE, "late"))
            assert (await dev.wait_for_run(run_id)).output == "late"
        assert [e.kind for e in dev.timeline][:2] == ["HTTP_START", "GATEWAY_HELLO"]
