"""The worker: supervisor, in-flight steps, reply delivery, lease extension and drain.

Task tree (an anyio task group for the long-lived tasks; steps are asyncio tasks the
worker tracks and cancels at the drain deadline)::

    Worker.run
    ├─ supervisor      start -> WebSocket -> handshake -> READY (or PAUSE when draining);
    │                  reconnects forever with capped, jittered backoff; AuthError is fatal
    │   └─ session     reader + heartbeats, one per WebSocket (two briefly on GATEWAY_CLOSING)
    ├─ lease extender  every extend interval, each unfinished step's newest lease id,
    │                  over the newest live session; plus one early ownership check per
    │                  step (below)
    ├─ one task per step: ACKed request -> SDK on the user loop -> reply -> delivered
    ├─ status reports  WORKER_STATUS, only when the gateway asks for them
    └─ drain           on request: stop acking, PAUSE, wait for every step's reply to be
                       acknowledged (WORKER_REPLY_ACK or flush 200) within the deadline,
                       close 1000 WORKER_SHUTDOWN

A step's first extension goes out ``OWNERSHIP_CHECK_DELAY`` after its ACK, at once when
its session gets GATEWAY_CLOSING, and again at once on a new session if it was never
confirmed: when the gateway re-routed a forward
whose ACK was already on the wire (it fails un-ACKed forwards as soon as a connection
leaves READY), two workers hold the same lease id and only the first to extend keeps it.
The other gets a NACK, cancels its copy and sends no reply a fraction of a second in,
instead of running the whole step next to the real owner (``step.lease_lost``).

At the drain deadline (or a second signal) every step still running is *handed back*:
a retryable error reply saying which worker gave it up, why and after how long, so
Inngest retries it at once instead of after the lease expires (about 2 minutes).

A step's reply is *delivered* only when the gateway acknowledged it or
``/v0/connect/flush`` accepted it; until then the step stays in ``_steps``, its
lease keeps being extended, and every new session re-sends it. Sessions come and
go under the steps: a GATEWAY_CLOSING or a dropped socket never touches user code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from .. import __version__
from ..config import Config
from ..context import draining
from ..errors import (
    AuthError,
    ConnectWorkerError,
    GatewayError,
    ProtocolError,
    SyncError,
    TransportError,
)
from ..ops.logs import event
from ..ops.logs import set_context as set_log_context
from ..ops.metrics import WorkerMetrics
from ..protocol import (
    ExecutorRequest,
    GatewayEvent,
    LeaseExtended,
    ReplyAck,
    WorkerConnection,
    pb,
)
from ..protocol.codec import build_sdk_response
from ..protocol.state import State
from .executor import SDK_LANGUAGE, SDK_VERSION, App, Executor, Outcome, error_outcome
from .gateway_api import GatewayAPI
from .session import Session
from .stacks import running_steps

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
# The gateway handles PAUSE and ACKs on different goroutines: an ACK written just
# before PAUSE can lose that race and the request would be re-routed while we run it
# (spec §5.2). PAUSE therefore waits until the newest ACK is this old.
PAUSE_SETTLE = 0.2
# A lost re-route race is found by the first lease extension (see the module docstring):
# soon enough that the losing copy of all but the shortest steps stops before its end
# (the soak found 1 s let sub-second steps run to the end twice), late enough that
# steps of a few milliseconds are done before it and cost no extra frame.
OWNERSHIP_CHECK_DELAY = 0.2
# Hand-back replies at the drain deadline get this long to be acknowledged (socket or
# flush) before the process exits: the platform's SIGKILL is close behind.
HAND_BACK_TIMEOUT = 1.5
# How long the deadline waits for the gateway to confirm steps it never confirmed
# before handing them back (those it does not confirm are not handed back).
OWNERSHIP_ANSWER_TIMEOUT = 0.5
FLUSH_MAX_BACKOFF = 5.0

EXIT_OK = 0
EXIT_ABANDONED = 3  # the drain deadline passed with steps still running
EXIT_FATAL = 2  # stopped without being asked (key refused, sync rejected, a bug)


def backoff_delays(minimum: float, maximum: float) -> Iterator[float]:
    """Capped exponential backoff with equal jitter: never zero, never above ``maximum``."""
    ceiling = minimum
    while True:
        yield random.uniform(ceiling / 2, ceiling)
        ceiling = min(maximum, ceiling * 2)


# SYNC_FAILED this many times in a row means our function configuration is rejected:
# exiting (non-zero) makes the failure visible and lets the platform's restart policy
# decide, instead of a worker that is alive but never routable.
MAX_CONSECUTIVE_SYNC_FAILURES = 5


def is_fatal(exc: BaseException, consecutive_sync_failures: int = 0) -> bool:
    """Whether reconnecting cannot help (the supervisor stops and the process exits)."""
    if isinstance(exc, AuthError):
        return True
    return isinstance(exc, SyncError) and (
        consecutive_sync_failures >= MAX_CONSECUTIVE_SYNC_FAILURES
    )


@dataclass(eq=False)
class Step:
    """An ACKed executor request, from ACK until its reply is delivered."""

    request: ExecutorRequest
    lease_id: str
    started_at: float
    task: asyncio.Task[None] | None = None
    reply: bytes | None = None
    outcome: str = "running"
    extending: bool = True
    # A successful extension proved the gateway counts this copy as the lease holder.
    confirmed: bool = False
    ownership_check: asyncio.TimerHandle | None = None
    sent_on: Session | None = None
    delivered: bool = False
    # Set when the reply is delivered or the socket that carried it closes; replaced by
    # whoever waits on it again (one waiter at a time: the step's own task). Steps are
    # plain asyncio tasks: they are the hot path, and the engine runs on asyncio anyway
    # (websockets' asyncio client).
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Worker:
    """Hosts the given apps over Inngest Connect until asked to stop."""

    def __init__(
        self,
        config: Config,
        apps: Sequence[App],
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or WorkerMetrics(CollectorRegistry())
        # Computed at scrape time, so the hot path does no counting for them.
        self.metrics.steps_in_flight.set_function(
            lambda: sum(1 for s in self._steps.values() if s.reply is None)
        )
        self.metrics.replies_awaiting_ack.set_function(
            lambda: sum(1 for s in self._steps.values() if s.reply is not None)
        )
        self._executor = Executor(apps, app_version=config.app_version)
        self._api: GatewayAPI | None = None
        self._steps: dict[str, Step] = {}
        self._step_tasks: set[asyncio.Task[None]] = set()
        self._due_checks: list[Step] = []  # early ownership checks to send now
        self._checks_task: asyncio.Task[None] | None = None
        self._current: Session | None = None
        self._sessions: list[Session] = []
        self._limiter: anyio.CapacityLimiter | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        self._drain_scope: anyio.CancelScope | None = None
        self._stop_requested = False
        self._abort_requested = False
        self._draining = False
        self._last_ack_at = 0.0
        self._fatal: BaseException | None = None
        self.exit_code: int | None = None

    # ----- public surface -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Routable right now: a session is ACTIVE and we are not draining."""
        current = self._current
        return (
            not self._draining
            and current is not None
            and current.conn.state is State.ACTIVE
            and not current.closed.is_set()
        )

    async def wait_ready(self) -> None:
        """Wait until the worker is routable (for embedding and tests)."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._wait_until(lambda: self.ready)

    def request_shutdown(self) -> None:
        """Start the drain. Idempotent; may be called before ``run`` (it then drains at once).

        Must be called from the worker's event loop thread (signal handlers installed with
        anyio's signal receiver are).
        """
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    def abort(self) -> None:
        """End the drain now (second signal): in-flight steps are reported as abandoned."""
        self._abort_requested = True
        self.request_shutdown()
        if self._drain_scope is not None:
            self._drain_scope.cancel()

    async def run(self) -> int:
        """Serve until shut down; returns the process exit code."""
        self._stop = anyio.Event()
        # One worker per process drains once; a new run (embedding, tests) starts clear.
        draining().clear()
        if self._changed is None:
            self._changed = anyio.Event()
        if self.config.max_worker_concurrency:
            self._limiter = anyio.CapacityLimiter(self.config.max_worker_concurrency)
        if self._stop_requested:
            self._stop.set()
        self.metrics.set_build_info(
            __version__, self.config.app_version or "", self.config.deployment_id or ""
        )
        self.metrics.set_connection_state("connecting")
        self._api = GatewayAPI(self.config)
        self._executor.start()
        event(log, "worker.start", instance_id=self.config.instance_id,
              apps=[a.app_name for a in self._executor.apps],
              app_version=self.config.app_version, api=self.config.api_base_url,
              drain_timeout=self.config.drain_timeout)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._supervise)
                tg.start_soon(self._extend_leases)
                await self._stop.wait()
                self.exit_code = await self._drain()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self.metrics.set_connection_state("disconnected")
            with anyio.CancelScope(shield=True):
                await self._api.aclose()
            self._executor.stop()
        assert self.exit_code is not None
        return self.exit_code

    # ----- helpers -------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake everything waiting in ``_wait_until`` (usually nobody: skip the work)."""
        changed = self._changed
        if changed is not None and changed.statistics().tasks_waiting:
            changed.set()
            self._changed = anyio.Event()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            assert self._changed is not None
            await self._changed.wait()

    def _live_session(self) -> Session | None:
        """The newest session that can carry extensions and replies."""
        for session in reversed(self._sessions):
            if session.conn.live and not session.closed.is_set():
                return session
        return None

    def _connect_request(self) -> Any:
        request = pb.WorkerConnectRequestData(
            instance_id=self.config.instance_id,
            capabilities=b'{"connect":"v1","in_band_sync":"v1","trust_probe":"v1"}',
            worker_manual_readiness_ack=True,
            framework="connect",
            sdk_language=SDK_LANGUAGE,
            sdk_version=SDK_VERSION,
            system_attributes=pb.SystemAttributes(
                cpu_cores=os.cpu_count() or 1, os=platform.system().lower()
            ),
        )
        request.started_at.GetCurrentTime()
        if self.config.env:
            request.environment = self.config.env
        if self.config.max_worker_concurrency:
            request.max_worker_concurrency = self.config.max_worker_concurrency
        for app in self._executor.apps:
            config = request.apps.add(app_name=app.app_name, functions=app.functions_json)
            if app.app_version:
                config.app_version = app.app_version
        return request

    # ----- supervisor ----------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._supervise_forever()
        except Exception as exc:
            # Never alive-but-dead: anything the supervisor cannot handle stops the
            # worker with a non-zero exit so the platform restarts it.
            self._fatal = exc
            event(log, "worker.fatal", level=logging.ERROR, error=str(exc),
                  error_type=type(exc).__name__)
            self.abort()

    async def _supervise_forever(self) -> None:
        assert self._api is not None and self._tg is not None
        exclude: list[str] = []
        delays = backoff_delays(self.config.reconnect_min_backoff,
                                self.config.reconnect_max_backoff)
        sync_failures = 0
        while True:
            try:
                start = await self._api.start(exclude)
                session = await Session.open(
                    start, self._connect_request(),
                    handshake_timeout=HANDSHAKE_TIMEOUT, metrics=self.metrics,
                )
            except (TransportError, GatewayError, ProtocolError) as exc:
                sync_failures = sync_failures + 1 if isinstance(exc, SyncError) else 0
                if is_fatal(exc, sync_failures):
                    raise
                delay = next(delays)
                event(log, "connection.retry", level=logging.WARNING, error=str(exc),
                      retry_in=round(delay, 3), draining=self._draining)
                reason = "sync_failed" if isinstance(exc, SyncError) else "start_failed"
                self.metrics.reconnects_total.labels(reason=reason).inc()
                await anyio.sleep(delay)
                continue
            delays = backoff_delays(self.config.reconnect_min_backoff,
                                    self.config.reconnect_max_backoff)
            sync_failures = 0
            await self._tg.start(session.run, self)
            await self._activate(session)
            await _first_of(session.closed, session.gateway_closing)
            if session.gateway_closing.is_set():
                # The gateway failed every forward whose ACK it had not read yet and
                # re-routes them: ask about unconfirmed steps now, over this socket
                # (it still carries extensions), not after the next handshake.
                self._queue_checks([s for s in self._steps.values()
                                    if s.reply is None and not s.confirmed and s.extending])
                # Replace first, retire the old socket once the new one is active.
                exclude = [session.start.gateway_group] if session.start.gateway_group else []
                self.metrics.reconnects_total.labels(reason="gateway_closing").inc()
                event(log, "connection.replace", conn_id=session.id, draining=self._draining)
            else:
                exclude = []
                self.metrics.reconnects_total.labels(reason="socket_closed").inc()
                event(log, "connection.reconnect", level=logging.WARNING, conn_id=session.id,
                      draining=self._draining)

    async def _activate(self, session: Session) -> None:
        """Make ``session`` the current one: READY (or PAUSE), then move work onto it."""
        old = [s for s in self._sessions if s is not session]
        self._sessions.append(session)
        if self._draining:
            sent = await session.send(WorkerConnection.pause)
            self.metrics.set_connection_state("paused")
            event(log, "drain.pause_on_reconnect", conn_id=session.id, sent=sent)
        else:
            await session.send(WorkerConnection.send_ready)
            self.metrics.set_connection_state("ready")
        self._current = session
        if session.ready.status_interval > 0:
            self._tg_start(self._report_status, session)
        set_log_context(conn_id=session.id)
        event(log, "connection.ready", conn_id=session.id,
              gateway_group=session.start.gateway_group,
              paused=self._draining, heartbeat_interval=session.ready.heartbeat_interval,
              extend_lease_interval=session.ready.extend_lease_interval)
        # Replies still waiting for an ACK go out again on the new socket at once, and
        # steps whose lease was never confirmed (ACKed just before the old socket left
        # READY: the gateway may have re-routed them) are checked now.
        for step in list(self._steps.values()):
            if step.reply is not None and not step.delivered:
                await self._send_reply(step, session)
            elif step.reply is None and step.extending and not step.confirmed:
                await self._send_extension(session, step)
        for stale in old:
            self._sessions.remove(stale)
            if not stale.closed.is_set():
                self._tg_start(stale.close, "GATEWAY_DRAINING")
        self._notify()

    def _tg_start(self, func: Callable[..., Any], *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(func, *args)

    def session_closed(self, session: Session) -> None:
        """Called by each session when its socket is gone, whatever the reason."""
        if session in self._sessions:
            self._sessions.remove(session)
        if self._current is session:
            self._current = None
            self.metrics.set_connection_state("disconnected")
        for step in self._steps.values():
            if step.sent_on is session and not step.delivered:
                step.wake.set()  # its reply goes to the flush (and the next session) now
        self._notify()

    # ----- gateway events ------------------------------------------------------------

    async def handle_event(self, session: Session, received: GatewayEvent) -> None:
        if isinstance(received, ExecutorRequest):
            await self._on_request(session, received)
        elif isinstance(received, LeaseExtended):
            self._on_lease_extended(received)
        elif isinstance(received, ReplyAck):
            self._on_reply_ack(received)
        # CONNECTION_READY is consumed by the handshake; heartbeats and GATEWAY_CLOSING
        # are handled by the session and the supervisor; unknown kinds are ignored.

    async def _on_request(self, session: Session, request: ExecutorRequest) -> None:
        existing = self._steps.get(request.request_id)
        if existing is not None:
            # The same dispatch again (our ACK got lost): confirm it, never run it twice.
            if session.conn.accepts_work:
                await session.send(lambda conn: conn.ack(request))
            return
        if self._draining or not session.conn.accepts_work:
            # Not acking makes the gateway re-route it at once (it fails un-ACKed
            # forwards when it processes our PAUSE).
            self.metrics.requests_rejected_total.labels(reason="paused").inc()
            event(log, "request.not_acked", level=logging.DEBUG, conn_id=session.id,
                  request_id=request.request_id, reason="paused")
            return
        if not await session.send(lambda conn: conn.ack(request)):
            return  # never acked: the gateway re-routes it
        self._last_ack_at = time.monotonic()
        self.metrics.requests_acked_total.inc()
        step = Step(request=request, lease_id=request.lease_id, started_at=time.monotonic())
        self._steps[request.request_id] = step
        self._notify()
        loop = asyncio.get_running_loop()
        step.ownership_check = loop.call_later(
            OWNERSHIP_CHECK_DELAY, self._check_ownership, step
        )
        task = loop.create_task(self._run_step(step))
        step.task = task
        self._step_tasks.add(task)
        task.add_done_callback(self._step_done)

    def _step_done(self, task: asyncio.Task[None]) -> None:
        self._step_tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the engine, not in user code (that becomes an error reply): stop with
        # a non-zero exit rather than run on in an unknown state.
        exc = task.exception()
        log.error("a step task failed", exc_info=exc)
        self._fatal = exc
        self.abort()

    def _check_ownership(self, step: Step) -> None:
        """The early extension of one step (a timer callback; see the module docstring)."""
        step.ownership_check = None
        finished = step.task is None or step.task.done()
        if finished or step.reply is not None or step.confirmed or not step.extending:
            return
        if self._tg is None:  # the worker has stopped
            return
        self._queue_checks([step])

    def _queue_checks(self, steps: list[Step]) -> None:
        # Checks due together (a burst of dispatches) go out from one task.
        self._due_checks.extend(steps)
        if self._checks_task is None:
            self._checks_task = asyncio.get_running_loop().create_task(self._send_checks())

    async def _send_checks(self) -> None:
        try:
            while self._due_checks:
                due, self._due_checks = self._due_checks, []
                session = self._live_session()
                if session is None:
                    return  # the next session checks every unconfirmed step on activation
                for step in due:
                    if step.reply is None and not step.confirmed and step.extending:
                        await self._send_extension(session, step)
        finally:
            self._checks_task = None

    async def _send_extension(self, session: Session, step: Step) -> None:
        await session.send(partial(
            WorkerConnection.extend_lease, request=step.request, lease_id=step.lease_id,
        ))

    def _on_lease_extended(self, ack: LeaseExtended) -> None:
        step = self._steps.get(ack.request_id)
        if step is None:
            return
        if ack.new_lease_id:
            step.lease_id = ack.new_lease_id
            if not step.confirmed:
                step.confirmed = True
                self._notify()
            self.metrics.lease_extensions_total.labels(outcome="extended").inc()
            return
        self.metrics.lease_extensions_total.labels(outcome="nack").inc()
        step.extending = False
        self._notify()
        if step.reply is None and step.task is not None:
            # Another copy holds the lease (a re-route race, or ours expired): stop, and
            # send no reply; that copy's reply is the one Inngest uses.
            request = step.request
            step.outcome = "lease_lost"
            step.task.cancel()
            event(log, "step.lease_lost", level=logging.WARNING,
                  request_id=request.request_id, run_id=request.run_id,
                  function=request.function_slug, step_id=self._step_name(step),
                  confirmed_before=step.confirmed,
                  ran_for=round(time.monotonic() - step.started_at, 3))

    def _step_name(self, step: Step) -> str:
        """The step's name from the user's code, else the request's step id."""
        names = running_steps(self._executor.user_loop.loop)
        return names.get(step.request.run_id) or step.request.step_id or "step"

    def _on_reply_ack(self, ack: ReplyAck) -> None:
        step = self._steps.get(ack.request_id)
        if step is None or step.reply is None:
            return
        self.metrics.reply_acks_total.inc()
        self._delivered(step)

    def _delivered(self, step: Step) -> None:
        if step.delivered:
            return
        step.delivered = True
        step.wake.set()
        self._steps.pop(step.request.request_id, None)
        self._notify()

    # ----- steps ---------------------------------------------------------------------

    async def _run_step(self, step: Step) -> None:
        request = step.request
        try:
            outcome = self._executor.check_served(request) or await self._execute(request)
        except asyncio.CancelledError:
            if step.outcome != "lease_lost":
                raise
            self._steps.pop(request.request_id, None)
            self.metrics.steps_total.labels(function=request.function_slug,
                                            outcome="lease_lost").inc()
            self._notify()
            return
        if step.ownership_check is not None:
            step.ownership_check.cancel()
            step.ownership_check = None
        duration = time.monotonic() - step.started_at
        self.metrics.steps_total.labels(function=request.function_slug,
                                        outcome=outcome.label).inc()
        self.metrics.step_duration_seconds.labels(function=request.function_slug).observe(duration)
        step.outcome = outcome.label
        step.reply = self._reply(request, outcome)
        event(log, "step.finished", level=logging.DEBUG, request_id=request.request_id,
              function=request.function_slug, outcome=outcome.label,
              duration=round(duration, 3))
        self._notify()
        await self._deliver(step)

    @staticmethod
    def _reply(request: ExecutorRequest, outcome: Outcome) -> bytes:
        return build_sdk_response(
            request,
            status=outcome.status,
            body=outcome.body,
            no_retry=outcome.no_retry,
            retry_after=outcome.retry_after,
            sdk_version=outcome.sdk_version,
            request_version=outcome.request_version,
        )

    async def _execute(self, request: ExecutorRequest) -> Outcome:
        try:
            if self._limiter is None:
                return await self._executor.execute(request)
            async with self._limiter:
                return await self._executor.execute(request)
        except Exception:
            log.exception("the SDK failed to run request %s", request.request_id)
            return error_outcome("ExecutionError", "connect_worker could not run the step")

    async def _send_reply(self, step: Step, session: Session) -> bool:
        reply = step.reply
        assert reply is not None
        if not session.conn.live:
            return False
        if await session.send(lambda conn: conn.reply(reply)):
            step.sent_on = session
            self.metrics.replies_sent_total.inc()
            return True
        return False

    async def _deliver(self, step: Step, *, ack_timeout: float | None = None) -> None:
        """Get the reply acknowledged: socket first, flush when the ACK does not come."""
        session = self._live_session()
        if session is not None and await self._send_reply(step, session):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ack_timeout or self.config.reply_ack_timeout):
                    await step.wake.wait()
        if not step.delivered:
            await self._flush(step)

    async def _flush(self, step: Step) -> None:
        """POST the reply to /v0/connect/flush until accepted or acknowledged another way."""
        assert self._api is not None and step.reply is not None
        delays = backoff_delays(0.1, FLUSH_MAX_BACKOFF)
        while not step.delivered:
            try:
                await self._api.flush(step.reply)
            except ConnectWorkerError as exc:
                self.metrics.flushes_total.labels(outcome="error").inc()
                delay = next(delays)
                event(log, "reply.flush_failed", level=logging.WARNING,
                      request_id=step.request.request_id, error=str(exc),
                      retry_in=round(delay, 3))
                step.wake = asyncio.Event()
                if not step.delivered:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await step.wake.wait()
                continue
            self.metrics.flushes_total.labels(outcome="ok").inc()
            event(log, "reply.flushed", request_id=step.request.request_id,
                  function=step.request.function_slug, draining=self._draining)
            self._delivered(step)

    async def _extend_leases(self) -> None:
        while True:
            # The gateway tells the interval (lease / 4) in CONNECTION_READY.
            await self._wait_until(lambda: self._live_session() is not None)
            session = self._live_session()
            assert session is not None
            await anyio.sleep(session.ready.extend_lease_interval)
            session = self._live_session()
            if session is None:
                continue  # leases outlive a reconnect; the next session extends them
            for step in list(self._steps.values()):
                if step.extending and not step.delivered:
                    await session.send(partial(
                        WorkerConnection.extend_lease, request=step.request,
                        lease_id=step.lease_id,
                    ))

    async def _report_status(self, session: Session) -> None:
        """WORKER_STATUS at the interval the gateway asked for (it only logs them today)."""
        while not session.closed.is_set():
            await anyio.sleep(session.ready.status_interval)
            await session.send(partial(
                WorkerConnection.status, in_flight_request_ids=list(self._steps),
                shutdown_requested=self._draining,
            ))

    # ----- drain ---------------------------------------------------------------------

    async def _drain(self) -> int:
        self._draining = True
        draining().set()
        drain_started_at = time.monotonic()
        self.metrics.start_drain(self.config.drain_timeout)
        event(log, "drain.start", in_flight=len(self._steps),
              drain_timeout=self.config.drain_timeout)
        await self._pause_sessions()
        with anyio.CancelScope(deadline=anyio.current_time() + self.config.drain_timeout) as scope:
            self._drain_scope = scope
            if self._abort_requested:
                scope.cancel()
            await self._wait_until(lambda: not self._steps)
        abandoned = list(self._steps.values())
        if abandoned:
            await self._abandon(abandoned)
        for session in list(self._sessions):
            await session.close("WORKER_SHUTDOWN")
        duration = time.monotonic() - drain_started_at
        self.metrics.drain_duration_seconds.set(duration)
        self.metrics.draining.set(0)
        if self._fatal is not None:
            code = EXIT_FATAL
        elif abandoned:
            code = EXIT_ABANDONED
        else:
            code = EXIT_OK
        event(log, "drain.end", duration=round(duration, 3), abandoned=len(abandoned),
              exit_code=code)
        return code

    async def _abandon(self, steps: list[Step]) -> None:
        """Give up on ``steps``: log each by name, stop them, hand the running ones back."""
        names = running_steps(self._executor.user_loop.loop)  # before the cancellation
        await self._confirm_ownership([s for s in steps if s.reply is None])
        if self._fatal is not None:
            reason = "the worker is stopping after a fatal error"
        elif self._abort_requested:
            reason = "the worker got a second stop signal"
        else:
            reason = f"the drain deadline ({self.config.drain_timeout:g} s) passed"
        now = time.monotonic()
        handed_back: list[Step] = []
        for step in steps:
            request = step.request
            running = step.reply is None
            # Only a copy the gateway confirmed as the lease holder may speak for the
            # step: an unconfirmed one may have lost a re-route race, and its error
            # reply would beat the real owner's answer into the reply buffer.
            hand_back = running and step.confirmed and step.outcome != "lease_lost"
            name = names.get(request.run_id) or request.step_id or "step"
            running_for = now - step.started_at
            event(log, "drain.step_abandoned", level=logging.ERROR,
                  function=request.function_slug, run_id=request.run_id,
                  step_id=name, job_id=request.job_id, request_id=request.request_id,
                  state="running" if running else "reply_unacknowledged",
                  running_for=round(running_for, 3), handed_back=hand_back)
            if hand_back:
                step.reply = self._reply(request, error_outcome(
                    "StepAbandoned",
                    f"connect_worker instance {self.config.instance_id} gave up step "
                    f"{name!r} of {request.function_slug!r} after {running_for:.1f} s: "
                    f"{reason}. Inngest retries it.",
                ))
                handed_back.append(step)
        self.metrics.steps_abandoned_total.inc(len(steps))
        for task in list(self._step_tasks):
            task.cancel()  # the user task on the user loop gets the cancellation too
        if self._step_tasks:
            await asyncio.wait(self._step_tasks, timeout=1.0)
        if not handed_back:
            return
        # Without this reply Inngest would wait for the lease to expire (minutes) before
        # retrying. The budget is short: the platform's SIGKILL is close behind.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await asyncio.gather(*(
                    self._deliver(step, ack_timeout=HAND_BACK_TIMEOUT / 2)
                    for step in handed_back
                ))
        event(log, "drain.handed_back", steps=len(handed_back),
              acknowledged=sum(1 for step in handed_back if step.delivered))

    async def _confirm_ownership(self, steps: list[Step]) -> None:
        """Ask the gateway now about every step it has not confirmed as ours yet."""
        unconfirmed = [s for s in steps if not s.confirmed and s.extending]
        session = self._live_session()
        if not unconfirmed or session is None:
            return
        for step in unconfirmed:
            await self._send_extension(session, step)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OWNERSHIP_ANSWER_TIMEOUT):
                await self._wait_until(
                    lambda: all(s.confirmed or not s.extending for s in unconfirmed)
                )

    async def _pause_sessions(self) -> None:
        """Stop being routable: every handshaken session gets WORKER_PAUSE."""
        settle = self._last_ack_at + PAUSE_SETTLE - time.monotonic()
        if settle > 0 and self._fatal is None:
            await anyio.sleep(settle)
        for session in list(self._sessions):
            if session.conn.state in (State.CONNECTED, State.ACTIVE):
                sent = await session.send(WorkerConnection.pause)
                event(log, "drain.pause", conn_id=session.id, sent=sent)
        self.metrics.set_connection_state("paused")


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for ev in events:
                tg.start_soon(_set_then_cancel, ev, scope)


async def _set_then_cancel(ev: anyio.Event, scope: anyio.CancelScope) -> None:
    await ev.wait()
    scope.cancel()
