"""The worker: supervisor, in-flight steps, reply delivery, lease extension and drain.

Task tree (an anyio task group for the long-lived tasks; steps are futures the worker
tracks and cancels at the drain deadline)::

    Worker.run
    ├─ supervisor      start -> WebSocket -> handshake -> READY (or PAUSE when draining);
    │                  reconnects forever with capped, jittered backoff; AuthError is fatal
    │   └─ session     reader + heartbeats, one per WebSocket (two briefly on GATEWAY_CLOSING)
    ├─ lease extender  every extend interval, each unfinished step's newest lease id,
    │                  over the newest live session; plus one early ownership check per
    │                  step (below)
    ├─ steps (no task each): ACKed in the read callback -> SDK on the user loop (a
    │                  future) -> reply sent from its callback -> ACK or flush (a task)
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
import gc
import logging
import os
import platform
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
from ..ops import tracing
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
from ..protocol.codec import build_sdk_response, request_echo
from ..protocol.state import State
from .drift import guard_from_config
from .executor import SDK_LANGUAGE, SDK_VERSION, App, Executor, Outcome, error_outcome
from .gateway_api import GatewayAPI
from .lease_clock import lease_seconds, watch_leases
from .session import Session
from .stacks import running_steps
from .unreachable import UnreachableHint
from .userloop import loop_factory

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
# Per-step deadlines (ownership checks, reply ACKs) share one timer that fires at most
# this often, so a deadline can be this late. See ``_Deadlines``.
DEADLINE_GRANULARITY = 0.05
# Lease extensions go out this many per socket write, with the event loop free between
# batches (10,000 steps in flight must not stall heartbeats or new requests).
EXTENSION_BATCH = 256
# Hand-back replies at the drain deadline get this long to be acknowledged (socket or
# flush) before the process exits: the platform's SIGKILL is close behind.
HAND_BACK_TIMEOUT = 1.5
# The hand-back reply's retry_after (seconds, the soonest Inngest accepts): without it
# Inngest's retry backoff applies, 15 s plus up to 30 s of jitter for a first retry
# (pkg/backoff), where the hand-back promises a retry within seconds.
HAND_BACK_RETRY_AFTER = "1"
# Delivered replies are kept this long (and at most this many) so a request the gateway
# forwards again after we delivered it is answered, not run again: it re-routes a forward
# it never saw ACKed for up to about the route wait (10 s) per attempt, three attempts.
DELIVERED_REPLY_TTL = 60.0
DELIVERED_REPLIES_KEPT = 1024
# How long the deadline waits for the gateway to confirm steps it never confirmed
# before handing them back (those it does not confirm are not handed back).
OWNERSHIP_ANSWER_TIMEOUT = 0.5
FLUSH_MAX_BACKOFF = 5.0
# Flushes in flight at once: when a socket with thousands of unacknowledged replies
# drops, they queue here instead of all at once in the HTTP client's pool.
FLUSH_CONCURRENCY = 8
# A reply whose ACK is late waits another reply_ack_timeout, up to this many in all,
# while the gateway is still acknowledging other replies on that socket: it is working
# through a burst, and flushing thousands of replies it is about to ACK only adds load.
REPLY_ACK_PATIENCE = 6

GC_DEFAULT_THRESHOLD = 700  # CPython's generation-0 threshold
GC_THRESHOLD = 10_000

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


@dataclass(eq=False, slots=True)
class Step:
    """An ACKed executor request, from ACK until its reply is delivered.

    No task per step: the SDK's outcome arrives in a future's callback, which sends the
    reply; the ACK wait after that is a deadline (``_Deadlines``), not a waiting task.
    """

    request: ExecutorRequest
    lease_id: str
    started_at: float
    echo: bytes  # codec.request_echo(request): the ACK's payload, reused by extensions
    # The SDK's run of the request on the user loop (None while queued behind
    # max_worker_concurrency); cancelling it cancels the user task.
    task: asyncio.Future[Outcome] | None = None
    reply: bytes | None = None
    outcome: str = "running"
    extending: bool = True
    # A successful extension proved the gateway counts this copy as the lease holder.
    confirmed: bool = False
    # When the lease lapses unless the gateway confirms it again (lease_clock.py).
    lease_deadline: float = 0.0
    sent_on: Session | None = None
    sent_at: float = 0.0  # when the reply last went out on a socket (monotonic)
    delivered: bool = False
    # The flush fallback is running for this reply.
    flushing: bool = False
    # Set when the reply is delivered or the socket that carried it closes; only the
    # hand-back (``_deliver``) and a flush between retries wait on it.
    wake: asyncio.Event | None = None


class _Deadlines:
    """Per-step deadlines a fixed delay after being set, checked by one timer.

    A timer per step (``call_later`` + ``cancel``) costs more than the rest of a short
    step's bookkeeping. Here setting a deadline is a deque append (the deque stays in
    deadline order because the delay is fixed), and one timer, firing at most every
    ``DEADLINE_GRANULARITY`` seconds, hands the due keys to ``on_due``, which checks
    whether each still matters (most steps are done long before).
    """

    def __init__(self, delay: float, on_due: Callable[[list[str]], None]) -> None:
        self.delay = delay
        self._on_due = on_due
        self._due: deque[tuple[float, str]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        # Bound on first use: asyncio.get_running_loop() costs a system call (getpid).
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, key: str) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        at = loop.time() + self.delay
        self._due.append((at, key))
        if self._timer is None:
            self._timer = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        due = self._due
        keys: list[str] = []
        while due and due[0][0] <= now:
            keys.append(due.popleft()[1])
        if due:
            self._timer = loop.call_at(max(due[0][0], now + DEADLINE_GRANULARITY), self._fire)
        if keys:
            self._on_due(keys)

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._loop = None


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
        # One per lease extension ACK: thousands per round with many steps in flight.
        self._extended = self.metrics.lease_extensions_total.labels(outcome="extended")
        self._executor = Executor(apps, app_version=config.app_version,
                                  new_loop=loop_factory(config.event_loop),
                                  drift=guard_from_config(config, apps, self.metrics))
        self._api: GatewayAPI | None = None
        self._unreachable = UnreachableHint(config)
        self._steps: dict[str, Step] = {}
        # Steps running in the SDK (futures) and reply flushes (tasks): the drain's to cancel.
        self._step_tasks: set[asyncio.Future[Any]] = set()
        self._running = 0  # steps in the SDK, for max_worker_concurrency
        self._queued: deque[Step] = deque()  # ACKed, waiting for max_worker_concurrency
        self._to_start: list[Step] = []  # ACKed in this loop iteration (_start_acked)
        # request id -> (delivered at, reply) for the newest delivered replies, oldest first
        self._delivered_replies: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._due_checks: list[Step] = []  # early ownership checks to send now
        self._checks_task: asyncio.Task[None] | None = None
        self._checks = _Deadlines(OWNERSHIP_CHECK_DELAY, self._check_ownership)
        self._acks = _Deadlines(config.reply_ack_timeout, self._acks_overdue)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_reply_ack_at = 0.0
        self._flush_slots: asyncio.Semaphore | None = None
        self._waiters = 0  # tasks in _wait_until (``_notify`` skips its work without them)
        # After the drain gave up on its steps, replies still unacknowledged stay so.
        self._closing = False
        self._current: Session | None = None
        self._sessions: list[Session] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop: anyio.Event | None = None
        self._changed: anyio.Event | None = None
        self._drain_scope: anyio.CancelScope | None = None
        self._stop_requested = False
        self._abort_requested = False
        self._draining = False
        self._last_ack_at = 0.0
        # The newest session's; short until one says (the lease watch wakes this often).
        self._extend_interval = 1.0
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
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._flush_slots = asyncio.Semaphore(FLUSH_CONCURRENCY)
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
        if self._changed is None:
            self._changed = anyio.Event()
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
              drain_timeout=self.config.drain_timeout,
              event_loop=type(self._loop).__module__.partition(".")[0])
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._supervise)
                tg.start_soon(self._extend_leases)
                tg.start_soon(watch_leases, self._steps.values, self._lease_expired,
                              lambda: self._extend_interval)
                await self._stop.wait()
                self.exit_code = await self._drain()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None
            self._checks.clear()
            self._acks.clear()
            self.metrics.set_connection_state("disconnected")
            with anyio.CancelScope(shield=True):
                await self._api.aclose()
            self._executor.stop()
        assert self.exit_code is not None
        return self.exit_code

    # ----- helpers -------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake everything waiting in ``_wait_until`` (usually nobody: skip the work)."""
        if self._waiters and self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            assert self._changed is not None
            self._waiters += 1
            try:
                await self._changed.wait()
            finally:
                self._waiters -= 1

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
        extend_interval = 0.0  # told by the gateway in each CONNECTION_READY
        while True:
            try:
                start = await self._api.start(exclude)
                session = await Session.open(
                    start, self._connect_request(),
                    handshake_timeout=HANDSHAKE_TIMEOUT, metrics=self.metrics,
                )
            except (TransportError, GatewayError, ProtocolError) as exc:
                sync_failures = sync_failures + 1 if isinstance(exc, SyncError) else 0
                self._unreachable.failed(exc)
                if is_fatal(exc, sync_failures):
                    raise
                delay = next(delays)
                if self._steps and extend_interval:
                    # Leases are only extended over a socket: while steps are in flight
                    # the backoff must not outgrow them (the soak saw leases lapse
                    # behind a 30 s cap when the gateway came back after 3 s).
                    delay = min(delay, extend_interval / 4)
                event(log, "connection.retry", level=logging.WARNING, error=str(exc),
                      retry_in=round(delay, 3), draining=self._draining)
                reason = "sync_failed" if isinstance(exc, SyncError) else "start_failed"
                self.metrics.reconnects_total.labels(reason=reason).inc()
                await anyio.sleep(delay)
                continue
            delays = backoff_delays(self.config.reconnect_min_backoff,
                                    self.config.reconnect_max_backoff)
            self._unreachable.connected()
            sync_failures = 0
            extend_interval = session.ready.extend_lease_interval
            tracing.session_started(session)
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
        self._extend_interval = session.ready.extend_lease_interval
        if session.ready.status_interval > 0:
            self._tg_start(self._report_status, session)
        set_log_context(conn_id=session.id)
        event(log, "connection.ready", conn_id=session.id,
              gateway_group=session.start.gateway_group,
              paused=self._draining, heartbeat_interval=session.ready.heartbeat_interval,
              extend_lease_interval=session.ready.extend_lease_interval)
        # Every lease is extended at once on the new socket: the time without a
        # connection (a gateway restart, our reconnect backoff) ate into each lease, and
        # waiting for the next extend tick could let one lapse (the soak saw four steps
        # run again that way). It is also the ownership check of steps never confirmed
        # (ACKed just before the old socket left READY: the gateway may have re-routed
        # them). Replies still waiting for an ACK go out again.
        steps = [step for step in self._steps.values() if not step.delivered]
        await self._send_extensions(session, steps)
        with session.corked():
            for step in steps:
                if step.reply is not None and not step.delivered:
                    self._send_reply(step, session)
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
        tracing.session_finished(session)
        if session in self._sessions:
            self._sessions.remove(session)
        if self._current is session:
            self._current = None
            self.metrics.set_connection_state("disconnected")
        for step in list(self._steps.values()):
            if step.sent_on is session and not step.delivered:
                # Its reply goes to the flush (and to the next session) now.
                if step.wake is not None:
                    step.wake.set()  # the hand-back's _deliver (or a flush) moves on
                else:
                    self._start_flush(step)
        self._notify()

    # ----- gateway events ------------------------------------------------------------

    def handle_event(self, session: Session, received: GatewayEvent) -> None:
        """One decoded frame, in the socket's read callback (see ``Session._on_frame``)."""
        kind = type(received)
        if kind is ExecutorRequest:
            self._on_request(session, received)  # type: ignore[arg-type]
        elif kind is ReplyAck:
            self._on_reply_ack(received)  # type: ignore[arg-type]
        elif kind is LeaseExtended:
            self._on_lease_extended(received)  # type: ignore[arg-type]
        # CONNECTION_READY is consumed by the handshake; heartbeats and GATEWAY_CLOSING
        # are handled by the session and the supervisor; unknown kinds are ignored.

    def _on_request(self, session: Session, request: ExecutorRequest) -> None:
        existing = self._steps.get(request.request_id)
        if existing is not None:
            # The same dispatch again (our ACK got lost): confirm it, never run it twice.
            if session.conn.accepts_work:
                session.send_now(WorkerConnection.ack, request)
            return
        delivered = self._delivered_replies.get(request.request_id)
        if delivered is not None:
            # Delivered already, yet forwarded again: the gateway never counted our ACK
            # and re-forwarded the request once this worker was routable again (the soak
            # saw steps run twice this way). Answer with the same reply; never run it.
            if session.conn.accepts_work:
                session.send_now(WorkerConnection.ack, request)
            session.send_now(WorkerConnection.reply, delivered[1])
            event(log, "request.redelivered", level=logging.WARNING, conn_id=session.id,
                  request_id=request.request_id, run_id=request.run_id,
                  delivered_ago=round(time.monotonic() - delivered[0], 3))
            return
        if self._draining or not session.conn.accepts_work:
            # Not acking makes the gateway re-route it at once (it fails un-ACKed
            # forwards when it processes our PAUSE).
            self.metrics.requests_rejected_total.labels(reason="paused").inc()
            event(log, "request.not_acked", level=logging.DEBUG, conn_id=session.id,
                  request_id=request.request_id, reason="paused")
            return
        echo = request_echo(request)
        if not session.send_now(WorkerConnection.ack, request, echo):
            return  # never acked: the gateway re-routes it
        now = time.monotonic()
        self._last_ack_at = now
        self.metrics.requests_acked_total.inc()
        step = Step(request, request.lease_id, now, echo)
        step.lease_deadline = now + lease_seconds(request.lease_id, self._extend_interval)
        self._steps[request.request_id] = step
        tracing.step_started(step)
        self._notify()
        self._checks.add(request.request_id)
        outcome = self._executor.check_served(request)
        if outcome is not None:
            self._finish(step, outcome)
            return
        # User code starts from the next loop iteration, with the steps ACKed in this
        # read: the ACKs (written when the read callback ends) are on the wire first.
        if not self._to_start:
            assert self._loop is not None
            self._loop.call_soon(self._start_acked)
        self._to_start.append(step)

    def _start_acked(self) -> None:
        steps, self._to_start = self._to_start, []
        limit = self.config.max_worker_concurrency
        for step in steps:
            if step.outcome == "lease_lost" or self._closing:
                continue
            if limit and self._running >= limit:
                self._queued.append(step)
            else:
                self._execute(step)

    def _step_done(self, task: asyncio.Future[Any]) -> None:
        self._step_tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A bug in the engine, not in user code (that becomes an error reply): stop with
        # a non-zero exit rather than run on in an unknown state.
        exc = task.exception()
        log.error("a step task failed", exc_info=exc)
        self._fatal = exc
        self.abort()

    def _check_ownership(self, request_ids: list[str]) -> None:
        """The early extensions that are due (see the module docstring and ``_Deadlines``)."""
        if self._tg is None:  # the worker has stopped
            return
        steps = self._steps
        due: list[Step] = []
        for request_id in request_ids:
            step = steps.get(request_id)
            if step is None or step.reply is not None or step.confirmed or not step.extending:
                continue
            if step.task is not None and step.task.done():
                continue  # cancelled or failed: nothing to check
            due.append(step)
        if due:
            self._queue_checks(due)

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
                await self._send_extensions(session, [
                    step for step in due
                    if step.reply is None and not step.confirmed and step.extending
                ])
        finally:
            self._checks_task = None

    async def _send_extensions(self, session: Session, steps: Sequence[Step]) -> None:
        """Extend the leases of ``steps``: ``EXTENSION_BATCH`` frames per socket write,
        the event loop free between batches."""
        for start in range(0, len(steps), EXTENSION_BATCH):
            if start:
                await asyncio.sleep(0)
            with session.corked():
                for step in steps[start : start + EXTENSION_BATCH]:
                    if step.delivered or not step.extending:
                        continue
                    if not session.send_now(
                        WorkerConnection.extend_lease, step.request, step.lease_id, step.echo
                    ):
                        return

    def _on_lease_extended(self, ack: LeaseExtended) -> None:
        step = self._steps.get(ack.request_id)
        if step is None:
            return
        if ack.new_lease_id:
            step.lease_id = ack.new_lease_id
            step.lease_deadline = time.monotonic() + lease_seconds(
                ack.new_lease_id, self._extend_interval)
            if not step.confirmed:
                step.confirmed = True
                self._notify()
            self._extended.inc()
            return
        self.metrics.lease_extensions_total.labels(outcome="nack").inc()
        tracing.step_event(step, "lease.extension_failed")
        # Another copy holds the lease (a re-route race, or ours expired): stop, and
        # send no reply; that copy's reply is the one Inngest uses.
        self._lose_lease(step, "step.lease_lost")

    def _lease_expired(self, step: Step) -> None:
        """No confirmation for a whole lease: the gateway gave this copy up (lease_clock.py)."""
        tracing.step_event(step, "lease.expired")
        self._lose_lease(step, "step.lease_expired")

    def _lose_lease(self, step: Step, why: str) -> None:
        step.extending = False
        self._notify()
        if step.reply is None and step.outcome != "lease_lost":
            request = step.request
            step.outcome = "lease_lost"
            # Read before cancelling: the cancellation reaches the user loop at once and
            # unwinds the stack the name is read from.
            name = self._step_name(step)
            if step.task is not None:
                step.task.cancel()  # _step_returned drops the step
            else:  # not started yet: it never starts
                self._lease_lost(step)
            event(log, why, level=logging.WARNING,
                  request_id=request.request_id, run_id=request.run_id,
                  function=request.function_slug, step_id=name,
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
        self._last_reply_ack_at = time.monotonic()
        tracing.step_event(step, "reply.acked")
        self._delivered(step)

    def _delivered(self, step: Step) -> None:
        if step.delivered:
            return
        step.delivered = True
        tracing.step_finished(step)
        if step.wake is not None:
            step.wake.set()
        self._steps.pop(step.request.request_id, None)
        if step.reply is not None:
            self._remember_delivered(step.request.request_id, step.reply)
        self._notify()

    def _remember_delivered(self, request_id: str, reply: bytes) -> None:
        """Keep the newest replies a while, for a request the gateway forwards again."""
        recent = self._delivered_replies
        now = time.monotonic()
        recent[request_id] = (now, reply)
        while recent:
            oldest_at = next(iter(recent.values()))[0]
            if len(recent) <= DELIVERED_REPLIES_KEPT and now - oldest_at < DELIVERED_REPLY_TTL:
                break
            recent.popitem(last=False)

    # ----- steps ---------------------------------------------------------------------

    def _execute(self, step: Step) -> None:
        """Start the step in the SDK; ``_step_returned`` gets its outcome."""
        self._running += 1
        future = self._executor.submit(step.request, partial(self._step_returned, step),
                                       self._loop)
        step.task = future
        self._step_tasks.add(future)

    def _step_returned(self, step: Step, future: asyncio.Future[Outcome]) -> None:
        self._step_tasks.discard(future)
        self._running -= 1
        while self._queued and not self._closing:
            queued = self._queued.popleft()
            if queued.outcome != "lease_lost":
                self._execute(queued)
                break
        if future.cancelled():
            if step.outcome == "lease_lost":
                self._lease_lost(step)
            return  # else the drain gave up on it (it reports the step)
        exc = future.exception()
        if exc is not None:
            request_id = step.request.request_id
            log.error("the SDK failed to run request %s", request_id, exc_info=exc)
            outcome = error_outcome("ExecutionError", "connect_worker could not run the step")
        else:
            outcome = future.result()
        self._finish(step, outcome)

    def _lease_lost(self, step: Step) -> None:
        request = step.request
        self._steps.pop(request.request_id, None)
        tracing.step_finished(step, "lease_lost")
        self.metrics.steps_total.labels(function=request.function_slug,
                                        outcome="lease_lost").inc()
        self._notify()

    def _finish(self, step: Step, outcome: Outcome) -> None:
        """The SDK answered: build the reply and send it."""
        request = step.request
        duration = time.monotonic() - step.started_at
        label = outcome.label
        self.metrics.step_finished(request.function_slug, label, duration)
        step.outcome = label
        tracing.step_outcome(step, outcome)
        step.reply = self._reply(request, outcome)
        if log.isEnabledFor(logging.DEBUG):
            event(log, "step.finished", level=logging.DEBUG, request_id=request.request_id,
                  function=request.function_slug, outcome=label,
                  duration=round(duration, 3))
        self._notify()
        self._send_or_flush(step)

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

    def _send_reply(self, step: Step, session: Session) -> bool:
        """Write the reply on ``session``; its ACK is then due within reply_ack_timeout."""
        reply = step.reply
        assert reply is not None
        if not session.conn.live:
            return False
        if session.send_now(WorkerConnection.reply, reply):
            step.sent_on = session
            step.sent_at = time.monotonic()
            self.metrics.replies_sent_total.inc()
            tracing.step_event(step, "reply.sent")
            if step.wake is None:  # the hand-back's _deliver waits for the ACK itself
                self._acks.add(step.request.request_id)
            return True
        return False

    def _send_or_flush(self, step: Step) -> None:
        """Send the reply on the newest live socket, else hand it to the flush at once."""
        session = self._live_session()
        if session is None or not self._send_reply(step, session):
            self._start_flush(step)

    def _acks_overdue(self, request_ids: list[str]) -> None:
        """Replies whose ACK did not come in time go to the flush (see REPLY_ACK_PATIENCE)."""
        steps = self._steps
        now = time.monotonic()
        patience = self._acks.delay
        progressing = now - self._last_reply_ack_at < patience
        for request_id in request_ids:
            step = steps.get(request_id)
            if step is None or step.reply is None or step.wake is not None:
                continue
            session = step.sent_on
            if (progressing and session is not None and session is self._live_session()
                    and now - step.sent_at < REPLY_ACK_PATIENCE * patience):
                self._acks.add(request_id)
            else:
                self._start_flush(step)

    def _start_flush(self, step: Step) -> None:
        if step.delivered or step.flushing or self._closing or self._tg is None:
            return
        assert self._loop is not None
        step.flushing = True
        task = self._loop.create_task(self._flush(step))
        self._step_tasks.add(task)
        task.add_done_callback(self._step_done)

    async def _deliver(self, step: Step, *, ack_timeout: float) -> None:
        """Get a hand-back reply acknowledged: socket first, flush when no ACK comes."""
        step.wake = asyncio.Event()
        session = self._live_session()
        if session is not None and self._send_reply(step, session):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ack_timeout):
                    await step.wake.wait()
        if not step.delivered:
            await self._flush(step)

    async def _flush_once(self, step: Step) -> bool:
        """POST the reply once (at most FLUSH_CONCURRENCY at a time); False if it was
        delivered meanwhile and not posted."""
        assert self._api is not None and self._flush_slots is not None
        async with self._flush_slots:
            if step.delivered or step.reply is None:
                return False
            await self._api.flush(step.reply)
            return True

    async def _flush(self, step: Step) -> None:
        """POST the reply to /v0/connect/flush until accepted or acknowledged another way."""
        assert self._api is not None and step.reply is not None
        step.flushing = True
        try:
            delays = backoff_delays(0.1, FLUSH_MAX_BACKOFF)
            while not step.delivered:
                try:
                    if not await self._flush_once(step):
                        break  # acknowledged on a socket while it waited for a slot
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
                tracing.step_event(step, "reply.flushed")
                event(log, "reply.flushed", request_id=step.request.request_id,
                      function=step.request.function_slug, draining=self._draining)
                self._delivered(step)
        finally:
            step.flushing = False

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
            await self._send_extensions(session, [
                step for step in self._steps.values() if step.extending and not step.delivered
            ])

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
        tracing.drain_started(self._steps.values())
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
        tracing.drain_finished(code)
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
                    f"{reason}. Inngest retries it.", retry_after=HAND_BACK_RETRY_AFTER,
                ))
                handed_back.append(step)
                tracing.step_event(step, "handed_back")
        self.metrics.steps_abandoned_total.inc(len(steps))
        # Unacknowledged replies that are not handed back stay unacknowledged: no more
        # flushes for them (the hand-back below delivers its own replies).
        self._closing = True
        self._acks.clear()
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
        await self._send_extensions(session, unconfirmed)
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
