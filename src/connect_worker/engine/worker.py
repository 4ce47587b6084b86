"""The worker: runs the engine's parts, pumps events into the step ledger and carries out
its actions, and drains.

It owns no step state: every step's state is the ledger's (``steps.py``, where the whole
lifecycle is one table). The parts it wires together, each in its own module::

    Worker.run
    ├─ supervisor      (supervisor.py) start -> WebSocket -> handshake -> READY (or PAUSE
    │   │              when draining); reconnects forever with backoff; fatal errors stop it
    │   └─ session     (session.py) reader + heartbeats, one per WebSocket
    ├─ leases          (leases.py) the periodic extender, and EXTEND_NOW batches from one
    │                  task (ownership checks, a new socket, the drain deadline)
    ├─ steps (no task each): ACKed in the read callback -> body on the user loop
    │                  (bodies.py, a future) -> reply written from its callback -> ACK
    │                  timer or flush task (delivery.py)
    └─ drain           (drain.py) stop acking, PAUSE, wait until the ledger has no live
                       step within the deadline, then give up on the rest (the owned
                       ones are *handed back*: a retryable error reply naming the worker,
                       so Inngest retries at once instead of after the lease expires),
                       close 1000 WORKER_SHUTDOWN

Everything reaching the ledger comes through ``_fire``; each action it returns maps to
one handler (``_handlers``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Sequence

import anyio
from prometheus_client import CollectorRegistry

from .. import __version__
from ..config import Config
from ..context import draining
from ..ops import tracing
from ..ops.logs import event
from ..ops.metrics import WorkerMetrics
from ..protocol import ExecutorRequest, GatewayEvent, LeaseExtended, ReplyAck, WorkerConnection
from ..protocol.codec import request_echo
from .bodies import Bodies
from .confirm import wanted as confirm_wanted
from .delivery import Delivery, build_reply
from .drain import EXIT_ABANDONED, EXIT_FATAL, EXIT_OK, Drain
from .drift import guard_from_config
from .executor import App, Executor, Outcome
from .gateway_api import GatewayAPI
from .lease_clock import lease_seconds, watch_leases
from .leases import Leases
from .session import Session
from .steps import LIVE, Action, Arrival, Ledger, Step, StepEvent, StepState
from .supervisor import MAX_CONSECUTIVE_SYNC_FAILURES, Supervisor, is_fatal
from .timers import Changes
from .userloop import UserLoop, loop_factory

__all__ = ["EXIT_ABANDONED", "EXIT_FATAL", "EXIT_OK", "MAX_CONSECUTIVE_SYNC_FAILURES",
           "Worker", "is_fatal"]

log = logging.getLogger(__name__)

# Delivered replies are kept this long (and at most this many) so a request the gateway
# forwards again after we delivered it is answered, not run again: it re-routes a forward
# it never saw ACKed for up to about the route wait (10 s) per attempt, three attempts.
DELIVERED_REPLY_TTL = 60.0
DELIVERED_REPLIES_KEPT = 1024
# Steps whose lease the worker's own clock watches (running, lease not lost).
_HELD = frozenset({StepState.CONFIRMING, StepState.ACKED, StepState.OWNED})
GC_DEFAULT_THRESHOLD = 700  # CPython's generation-0 threshold
GC_THRESHOLD = 10_000


class Worker:
    """Hosts the given apps over Inngest Connect until asked to stop."""

    def __init__(self, config: Config, apps: Sequence[App], *,
                 metrics: WorkerMetrics | None = None, user_loop: UserLoop | None = None) -> None:
        """``user_loop``: where user code runs; None = a thread of its own (always, when
        serving: ``InlineUserLoop`` exists only for the bench to price that thread)."""
        self.config = config
        self.metrics = metrics or WorkerMetrics(CollectorRegistry())
        self._ledger = ledger = Ledger(kept=DELIVERED_REPLIES_KEPT, ttl=DELIVERED_REPLY_TTL)
        # Computed at scrape time, so the hot path does no counting for them.
        self.metrics.steps_in_flight.set_function(
            lambda: sum(1 for s in ledger.steps.values() if s.reply is None))
        self.metrics.replies_awaiting_ack.set_function(
            lambda: sum(1 for s in ledger.steps.values() if s.reply is not None))
        # One per lease extension ACK: thousands per round with many steps in flight.
        self._extended = self.metrics.lease_extensions_total.labels(outcome="extended")
        self._changes = Changes()
        self._executor = Executor(apps, app_version=config.app_version,
                                  new_loop=loop_factory(config.event_loop),
                                  drift=guard_from_config(config, apps, self.metrics),
                                  user_loop=user_loop)
        self._supervisor = Supervisor(
            config, self.metrics, self._changes, self._executor.apps,
            in_flight=lambda: list(ledger.steps),
            on_socket_ready=lambda: self.fire_all(StepEvent.SOCKET_READY),
            on_gateway_closing=lambda: self.fire_all(StepEvent.GATEWAY_CLOSING),
        )
        live = self._supervisor.live_session
        self._leases = Leases(ledger, self._changes, fire=self._fire, live_session=live)
        self._bodies = Bodies(self._executor, max_concurrency=config.max_worker_concurrency,
                              done=self._body_done, fire=self._fire)
        self._delivery = Delivery(ledger, self.metrics,
                                  reply_ack_timeout=config.reply_ack_timeout,
                                  fire=self._fire, live_session=live, spawn=self._spawn_flush)
        self._handlers: dict[Action, Callable[[Step, Session | None], None]] = {
            Action.SEND_REPLY: lambda step, _: self._delivery.send_reply(step),
            Action.REMEMBER: self._remember,
            Action.EXTEND_NOW: lambda step, _: self._leases.extend_now(step),
            Action.START_BODY: lambda step, _: self._start_body(step),
            Action.RESEND_REPLY: lambda step, _: self._delivery.resend_reply(step),
            Action.ARM_ACK_TIMER: lambda step, _: self._delivery.arm_ack_timer(step),
            Action.FLUSH: lambda step, _: self._delivery.flush(step),
            Action.WAKE: lambda step, _: self._delivery.wake(step),
            Action.ACK_AGAIN: self._ack_again,
            Action.CANCEL_BODY: lambda step, _: self._bodies.cancel(step),
            Action.LOG_LEASE_LOST: lambda step, _: self._log_lease_lost(step,
                                                                         "step.lease_lost"),
            Action.LOG_LEASE_EXPIRED: lambda step, _: self._log_lease_lost(
                step, "step.lease_expired"),
            Action.COUNT_LEASE_LOST: self._count_lease_lost,
            Action.LOG_ABANDONED: lambda step, _: self._drain.log_abandoned(step),
            Action.HAND_BACK: lambda step, _: self._drain.hand_back(step),
        }
        self._flushes: set[asyncio.Task[None]] = set()
        self._drain = Drain(config, self.metrics, ledger, self._changes, self._supervisor,
                            self._delivery, self._bodies, fire=self._fire,
                            user_loop=lambda: self._executor.user_loop.loop,
                            cancel_flushes=self._cancel_flushes)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._stop_requested = False
        self.exit_code: int | None = None

    # ----- public surface -------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Routable right now: a session is ACTIVE and we are not draining."""
        return self._supervisor.ready

    async def wait_ready(self) -> None:
        """Wait until the worker is routable (for embedding and tests)."""
        await self._changes.wait_until(lambda: self.ready)

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
        self._drain.abort()
        self.request_shutdown()

    async def run(self) -> int:
        """Serve until shut down; returns the process exit code."""
        self._stop = anyio.Event()
        self._loop = asyncio.get_running_loop()
        self._drain.reset()
        # One worker per process drains once; a new run (embedding, tests) starts clear.
        draining().clear()
        # Everything loaded so far (the SDK, the user's apps) lives as long as the
        # process: out of the collector's sight, every collection is cheaper.
        gc.collect()
        gc.freeze()
        if gc.get_threshold()[0] == GC_DEFAULT_THRESHOLD:  # not tuned by the user
            # Each step allocates a few thousand objects, nearly all freed by reference
            # counting: collecting every 700 allocations mostly walks live ones. 50,000
            # measured cheaper still but cost 10 MB of peak RSS and longer pauses (worse
            # p99 latencies); see docs/benchmarks.md.
            gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        if self._stop_requested:
            self._stop.set()
        self.metrics.set_build_info(
            __version__, self.config.app_version or "", self.config.deployment_id or ""
        )
        self.metrics.set_connection_state("connecting")
        api = GatewayAPI(self.config)
        self._delivery.start(api)
        self._bodies.start(self._loop)
        self._executor.start()
        event(log, "worker.start", instance_id=self.config.instance_id,
              apps=[a.app_name for a in self._executor.apps],
              app_version=self.config.app_version, api=self.config.api_base_url,
              drain_timeout=self.config.drain_timeout,
              event_loop=type(self._loop).__module__.partition(".")[0])
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._supervise, api, tg)
                tg.start_soon(self._leases.extend_periodically)
                tg.start_soon(self._leases.send_queued)
                tg.start_soon(watch_leases, lambda: self._ledger.in_state(_HELD),
                              self._lease_expired,
                              lambda: self._supervisor.extend_interval)
                await self._stop.wait()
                self.exit_code = await self._drain.run()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._leases.checks.clear()
            self._delivery.stop()
            self.metrics.set_connection_state("disconnected")
            with anyio.CancelScope(shield=True):
                await api.aclose()
            self._executor.stop()
        assert self.exit_code is not None
        return self.exit_code

    async def _supervise(self, api: GatewayAPI, tg: anyio.abc.TaskGroup) -> None:
        try:
            await self._supervisor.run(api, self, tg, lambda: bool(self._ledger.steps))
        except Exception as exc:
            # Never alive-but-dead: anything the supervisor cannot handle stops the
            # worker with a non-zero exit so the platform restarts it.
            self._drain.fatal = exc
            event(log, "worker.fatal", level=logging.ERROR, error=str(exc),
                  error_type=type(exc).__name__)
            self.abort()

    # ----- the pump: events in ----------------------------------------------------------

    def _fire(self, step: Step, ev: StepEvent, session: Session | None = None) -> None:
        """Feed one event to the ledger and carry out the actions it returns, in order."""
        handlers = self._handlers
        before = step.state
        actions = self._ledger.fire(step, ev)
        if step.state is not before:
            if step.state is StepState.DELIVERED:
                tracing.step_finished(step)
            elif step.state is StepState.LEASE_LOST:
                tracing.step_finished(step, "lease_lost")
        for action in actions:
            handlers[action](step, session)
        self._changes.notify()

    def fire_all(self, ev: StepEvent) -> None:
        """Feed ``ev`` to every live step (a new socket, GATEWAY_CLOSING, the deadline)."""
        for step in list(self._ledger.steps.values()):
            if step.state in LIVE:  # (an earlier step's actions cannot end it, but be sure)
                self._fire(step, ev)

    def handle_event(self, session: Session, received: GatewayEvent) -> None:
        """One decoded frame, in the socket's read callback (see ``Session._on_frame``)."""
        kind = type(received)
        if kind is ExecutorRequest:
            self._on_request(session, received)  # type: ignore[arg-type]
        elif kind is ReplyAck:
            step = self._ledger.steps.get(received.request_id)  # type: ignore[union-attr]
            if step is not None:
                if step.reply is not None:
                    self._delivery.reply_acked(step)
                self._fire(step, StepEvent.REPLY_ACKED)
        elif kind is LeaseExtended:
            self._on_lease_extended(received)  # type: ignore[arg-type]
        # CONNECTION_READY is consumed by the handshake; heartbeats and GATEWAY_CLOSING
        # are handled by the session and the supervisor; unknown kinds are ignored.

    def session_closed(self, session: Session) -> None:
        """Called by each session when its socket is gone, whatever the reason."""
        tracing.session_finished(session)
        self._supervisor.closed(session)
        for step in list(self._ledger.steps.values()):
            if step.sent_on is session:
                self._fire(step, StepEvent.SOCKET_LOST)
        self._changes.notify()

    def _on_request(self, session: Session, request: ExecutorRequest) -> None:
        request_id = request.request_id
        ledger = self._ledger
        arrival = ledger.arrive(
            request_id, routable=not self._drain.started and session.conn.accepts_work)
        if arrival is Arrival.NEW:
            echo = request_echo(request)
            if not session.send_now(WorkerConnection.ack, request, echo):
                return  # never acked: the gateway re-routes it
            now = time.monotonic()
            self._drain.last_ack_at = now
            self.metrics.requests_acked_total.inc()
            confirm = confirm_wanted(request.function_slug, self.config.confirm_before_run)
            step = ledger.open(request, echo, now, confirm=confirm)
            step.lease_deadline = now + lease_seconds(request.lease_id,
                                                      self._supervisor.extend_interval)
            tracing.step_started(step)
            self._changes.notify()
            self._leases.checks.add(request_id)
            if confirm:
                self._leases.extend_now(step)  # START_BODY follows the granted extension
            else:
                self._start_body(step)
        elif arrival is Arrival.IN_FLIGHT:
            self._fire(ledger.steps[request_id], StepEvent.REDELIVERED, session)
        elif arrival is Arrival.DELIVERED:
            found = ledger.delivered_reply(request_id, time.monotonic())
            assert found is not None
            if session.conn.accepts_work:
                session.send_now(WorkerConnection.ack, request)
            self._delivery.redelivered(session, request, *found)
        else:
            # Not acking makes the gateway re-route it at once (it fails un-ACKed
            # forwards when it processes our PAUSE).
            self.metrics.requests_rejected_total.labels(reason="paused").inc()
            event(log, "request.not_acked", level=logging.DEBUG, conn_id=session.id,
                  request_id=request_id, reason="paused")

    def _start_body(self, step: Step) -> None:
        outcome = self._executor.check_served(step.request)
        if outcome is not None:
            self._body_done(step, outcome)
        else:
            self._bodies.start_soon(step)

    def _on_lease_extended(self, ack: LeaseExtended) -> None:
        step = self._ledger.steps.get(ack.request_id)
        if step is None:
            return
        if ack.new_lease_id:
            step.lease_id = ack.new_lease_id
            step.lease_deadline = time.monotonic() + lease_seconds(
                ack.new_lease_id, self._supervisor.extend_interval)
            self._extended.inc()
            self._fire(step, StepEvent.LEASE_EXTENDED)
        else:
            self.metrics.lease_extensions_total.labels(outcome="nack").inc()
            tracing.step_event(step, "lease.extension_failed")
            self._fire(step, StepEvent.LEASE_NACKED)

    def _body_done(self, step: Step, outcome: Outcome) -> None:
        """The SDK answered: build the reply; the ledger sends it."""
        request = step.request
        duration = time.monotonic() - step.started_at
        label = outcome.label
        self.metrics.step_finished(request.function_slug, label, duration)
        tracing.step_outcome(step, outcome)
        step.reply = build_reply(request, outcome)
        if log.isEnabledFor(logging.DEBUG):
            event(log, "step.finished", level=logging.DEBUG, request_id=request.request_id,
                  function=request.function_slug, outcome=label,
                  duration=round(duration, 3))
        self._fire(step, StepEvent.BODY_DONE)

    # ----- actions out (the rest are the parts' own methods) -----------------------------

    def _spawn_flush(self, step: Step) -> None:
        if self._tg is None or self._loop is None:  # the worker has stopped
            return
        task = self._loop.create_task(self._delivery.run_flush(step))
        self._flushes.add(task)
        task.add_done_callback(self._flush_ended)

    def _flush_ended(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the engine: stop with a non-zero exit rather than run on in an
        # unknown state.
        exc = task.exception()
        log.error("a reply flush failed", exc_info=exc)
        self._drain.fatal = exc
        self.abort()

    def _lease_expired(self, step: Step) -> None:
        """No confirmation for a whole lease: the gateway gave this copy up (lease_clock.py)."""
        tracing.step_event(step, "lease.expired")
        self._fire(step, StepEvent.LEASE_EXPIRED)

    def _cancel_flushes(self) -> set[asyncio.Task[None]]:
        for task in self._flushes:
            task.cancel()
        return set(self._flushes)

    def _remember(self, step: Step, session: Session | None) -> None:
        if step.reply is not None:
            self._ledger.remember(step.request.request_id, step.reply, time.monotonic())

    def _ack_again(self, step: Step, session: Session | None) -> None:
        # The same dispatch again (our ACK got lost): confirm it, never run it twice.
        if session is not None and session.conn.accepts_work:
            session.send_now(WorkerConnection.ack, step.request)

    def _log_lease_lost(self, step: Step, why: str) -> None:
        # Another copy holds the lease (a re-route race, or ours expired): that copy's
        # reply is the one Inngest uses. Logged before CANCEL_BODY: the cancellation
        # reaches the user loop at once and unwinds the stack the name is read from.
        request = step.request
        event(log, why, level=logging.WARNING,
              request_id=request.request_id, run_id=request.run_id,
              function=request.function_slug, step_id=self._drain.step_name(step),
              ran_for=round(time.monotonic() - step.started_at, 3))

    def _count_lease_lost(self, step: Step, session: Session | None) -> None:
        self.metrics.steps_total.labels(function=step.request.function_slug,
                                        outcome="lease_lost").inc()
