"""``Faults.dual_dispatch``: one forward written to two connections at once. The first
ACK owns the lease; the other copy's extensions are NACKed, like a lost re-route race."""

from __future__ import annotations

from connect_worker.devserver import DevServer
from connect_worker.devserver.state import RunStatus
from connect_worker.devserver.testing import fast_config, make_reply, scripted_worker
from connect_worker.protocol import pb


async def test_one_forward_reaches_two_workers_and_the_first_ack_owns_the_lease() -> None:
    async with DevServer(fast_config()) as dev, \
            scripted_worker(dev, instance_id="a", auto_ack=False) as a, \
            scripted_worker(dev, instance_id="b", auto_ack=False) as b:
        await a.connect()
        await b.connect()
        dev.faults.dual_dispatch = 1
        (run_id,) = await dev.send_event("test/evt")
        req_a, req_b = await a.next_request(), await b.next_request()
        assert req_a.request_id == req_b.request_id and req_a.lease_id == req_b.lease_id
        assert dev.faults.dual_dispatch == 0
        await b.ack(req_b)  # b first: b owns the lease
        await dev.wait_for(lambda: any(d.acked_at for d in dev.dispatches))
        await a.ack(req_a)
        await dev.wait_for(lambda: all(d.acked_at for d in dev.dispatches))
        assert not (await a.extend(req_a)).HasField("new_lease_id")  # the loser: NACK
        assert (await b.extend(req_b)).new_lease_id
        await b.reply(make_reply(req_b, pb.SDKResponseStatus.DONE, 1))
        run = await dev.wait_for_run(run_id, timeout=10)
    assert run.status is RunStatus.COMPLETED
    assert sorted(d.conn_id for d in dev.dispatches) == sorted([a.conn_id, b.conn_id])
    assert len({d.request_id for d in dev.dispatches}) == 1
