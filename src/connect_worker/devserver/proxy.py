"""The dev gateway's proxy (Inngest's grpc/proxy.go): one dispatch of a queue item.

Lease, route, forward and wait for the ACK (up to ``forward_attempts`` times; to two
workers at once under ``Faults.dual_dispatch``), then wait for the reply while checking
the lease. The runs (executor.py) decide what to dispatch and what a result means.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..protocol import pb
from . import logfmt
from .core import ACCOUNT_ID, ENV_ID, Core, app_uuid, function_uuid
from .gateway import Gateway
from .state import Dispatch, QueueItem, Run
from .ulid import new_ulid

log = logging.getLogger(__name__)

STOPPED_RESPONDING = "connect_worker_stopped_responding"
ROUTE_FAILED = "failed to route request to gateway"


@dataclass
class ProxyResult:
    response: pb.SDKResponse | None
    error: str | None  # transport-level step error (syscode or message)


def _trace_ctx() -> bytes:
    trace = new_ulid().lower().rjust(32, "0")[:32]
    span = new_ulid().lower()[-16:]
    # Only the traceparent: the propagator leaves out an empty tracestate.
    return json.dumps({"traceparent": f"00-{trace}-{span}-01"}).encode()


def _user_trace_ctx(run_id: str, app_id: str, function_id: str) -> bytes:
    """As Inngest sends it: the run's trace (one trace id for all its steps, on whatever
    worker they run), a new parent span per request, and Inngest's app and function IDs in
    the tracestate (trace.HeadersFromTraceState; the real one may add inngest@traceref)."""
    trace = hashlib.sha256(run_id.encode()).hexdigest()[:32]
    span = hashlib.sha256(new_ulid().encode()).hexdigest()[:16]
    return json.dumps({"traceparent": f"00-{trace}-{span}-01",
                       "tracestate": f"inngest@fn={function_id},inngest@app={app_id}"}).encode()


class Proxy:
    def __init__(self, core: Core, gateway: Gateway, tasks: set[asyncio.Task[None]]) -> None:
        self.core = core
        self.state = core.state
        self.config = core.config
        self.gateway = gateway
        # The executor's tasks (cancelled when it closes): a dual dispatch's second ACK
        # completes in one.
        self._tasks = tasks

    async def dispatch(self, run: Run, item: QueueItem,
                       payload: Callable[[str], bytes]) -> ProxyResult:
        """One dispatch of ``item``: a new request and lease; ``payload`` builds the
        request body for its request ID."""
        core = self.core
        request_id = new_ulid()
        item.generation += 1
        lease = core.leases.lease(request_id)
        poke = asyncio.Event()
        core.leases.pokes[request_id] = poke
        reply = core.buffer.waiter(request_id)
        trace = _trace_ctx()
        try:
            request = pb.GatewayExecutorRequestData(
                request_id=request_id,
                account_id=ACCOUNT_ID,
                env_id=ENV_ID,
                app_id=app_uuid(run.app_name),
                app_name=run.app_name,
                function_id=function_uuid(run.function_slug),
                function_slug=run.function_slug,
                step_id=item.step_id,
                request_payload=payload(request_id),
                system_trace_ctx=trace,
                user_trace_ctx=_user_trace_ctx(run.run_id, app_uuid(run.app_name),
                                               function_uuid(run.function_slug)),
                run_id=run.run_id,
                lease_id=lease.lease_id,
                job_id=item.job_id if self.config.send_job_id else "",
            )
            error = await self._forward(run, item, request)
            if error is not None:
                return ProxyResult(None, error)
            result = await self._await_reply(request_id, reply, poke)
            if result.response is not None:
                core.leases.release(request_id)
            return result
        finally:
            core.buffer.forget_waiter(request_id)
            core.buffer.delete(request_id)
            core.leases.give_up(request_id)  # a no-op after release
            self.gateway.dual_owners.pop(request_id, None)
            self.state.notify()

    async def _forward(
        self, run: Run, item: QueueItem, request: pb.GatewayExecutorRequestData
    ) -> str | None:
        """Route and forward up to ``forward_attempts`` times; None once ACKed."""
        core = self.core
        last_error = ROUTE_FAILED
        for attempt in range(1, self.config.forward_attempts + 1):
            route = core.router.route(run.app_name, run.function_slug)
            if route.conn_id is None:
                with contextlib.suppress(TimeoutError):
                    await self.state.wait_for(
                        lambda: core.router.route(run.app_name, run.function_slug).conn_id
                        is not None,
                        self.config.route_wait,
                    )
                route = core.router.route(run.app_name, run.function_slug)
                if route.conn_id is not None:
                    # Inngest does not wait for a route (GetRoute fails at once and the
                    # queue retries with a new lease): the wait must not eat the lease,
                    # or the step is forwarded with a lease about to lapse and runs twice.
                    core.leases.restart(request.request_id)
            if route.conn_id is None:
                return route.error or ROUTE_FAILED
            if self.state.faults.dual_dispatch > 0:
                twin = core.router.route(run.app_name, run.function_slug,
                                         exclude=frozenset({route.conn_id}))
                if twin.conn_id is not None:
                    self.state.faults.dual_dispatch -= 1
                    if await self._forward_twice(run, item, request, attempt,
                                                 (route.conn_id, twin.conn_id)):
                        return None
                    continue
            conn = self.gateway.live.get(route.conn_id)
            instance = conn.info.instance_id if conn else None
            core.leases.assign(request.request_id, instance)
            dispatch = Dispatch(
                request_id=request.request_id,
                job_id=item.job_id,
                run_id=run.run_id,
                function_slug=run.function_slug,
                step_id=item.step_id,
                attempt=item.attempt,
                conn_id=route.conn_id,
                forward_attempt=attempt,
                sent_at=time.time(),
            )
            self.state.dispatches.append(dispatch)
            self.state.notify()
            log.info("dispatching %s of %s run %s (attempt %d) to %s: request %s",
                     logfmt.step(run, item.step_id), run.function_slug, run.run_id,
                     item.attempt + 1, logfmt.who(conn.info if conn else None),
                     request.request_id)
            if await self.gateway.forward(route.conn_id, request):
                dispatch.acked_at = time.time()
                dispatch.outcome = "acked"
                self.state.notify()
                log.info("request %s ACKed by %s", request.request_id, instance)
                return None
            log.info("request %s not ACKed by %s (forward %d of %d)", request.request_id,
                     instance, attempt, self.config.forward_attempts)
            dispatch.outcome = "forward_failed"
            core.leases.assign(request.request_id, None)
            self.state.notify()
        return last_error

    async def _forward_twice(self, run: Run, item: QueueItem,
                             request: pb.GatewayExecutorRequestData, attempt: int,
                             conn_ids: tuple[str, str]) -> bool:
        """Faults.dual_dispatch: write the request to both connections at once. The
        first WORKER_REQUEST_ACK owns the lease (the gateway NACKs the other copy's
        extensions, so its worker cancels it); a reply from either copy is accepted,
        the first one stored wins. True once either ACKed."""
        dispatches = {
            conn_id: Dispatch(request_id=request.request_id, job_id=item.job_id,
                              run_id=run.run_id, function_slug=run.function_slug,
                              step_id=item.step_id, attempt=item.attempt, conn_id=conn_id,
                              forward_attempt=attempt, sent_at=time.time())
            for conn_id in conn_ids}
        self.state.dispatches.extend(dispatches.values())
        self.state.notify()
        log.info("dispatching %s of %s run %s to two workers at once (fault): %s: request %s",
                 logfmt.step(run, item.step_id), run.function_slug, run.run_id,
                 " and ".join(str(logfmt.who(self.state.connections.get(c))) for c in conn_ids),
                 request.request_id)
        acked: list[str] = []

        async def forward(conn_id: str) -> None:
            ok = await self.gateway.forward(conn_id, request)
            log.info("request %s %s on conn %s (dual dispatch)", request.request_id,
                     "ACKed" if ok else "not ACKed", conn_id)
            dispatches[conn_id].outcome = "acked" if ok else "forward_failed"
            if ok:
                dispatches[conn_id].acked_at = time.time()
                acked.append(conn_id)  # in the order the ACKs were processed
                live = self.gateway.live.get(conn_id)
                if len(acked) == 1 and live is not None:  # the first ACK owns the lease
                    self.gateway.dual_owners[request.request_id] = live.info.instance_id
                    self.core.leases.assign(request.request_id, live.info.instance_id)
            self.state.notify()

        tasks = [asyncio.create_task(forward(conn_id)) for conn_id in conn_ids]
        for task in tasks:
            # The second copy's ACK may still be on its way; it completes in the background.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending and not acked:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        return bool(acked)

    async def _await_reply(
        self, request_id: str, reply: asyncio.Future[pb.SDKResponse], poke: asyncio.Event
    ) -> ProxyResult:
        cfg = self.config
        leases = self.core.leases
        while True:
            poked: asyncio.Task[bool] = asyncio.create_task(poke.wait())
            waitables: list[asyncio.Future[Any]] = [reply, poked]
            try:
                await asyncio.wait(
                    waitables,
                    timeout=cfg.lease_check_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                poked.cancel()
            poke.clear()
            if reply.done():
                self._mark(request_id, "replied")
                return ProxyResult(reply.result(), None)
            if not cfg.enforce_lease_expiry or leases.is_live(request_id):
                continue
            # Lease lapsed: give the worker a grace period for a late reply.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.lease_grace):
                    await asyncio.shield(reply)
            if reply.done() and not reply.cancelled():
                self._mark(request_id, "replied")
                return ProxyResult(reply.result(), None)
            # Like the real proxy: an extension during the grace period comes too late.
            self._mark(request_id, "lease_lost")
            log.info("lease expired: request %s got no reply or lease extension for %.0f s "
                     "(the worker stopped responding)", request_id, cfg.lease_duration)
            return ProxyResult(None, STOPPED_RESPONDING)

    def _mark(self, request_id: str, outcome: str) -> None:
        for d in reversed(self.state.dispatches):
            if d.request_id == request_id:
                d.outcome = outcome
                break
        self.state.notify()
