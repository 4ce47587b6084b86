"""Sessions and their supervision: opening one WebSocket after another (start ->
handshake -> READY, or PAUSE when draining) with backoff, which errors are fatal, the
current and the live session, GATEWAY_CLOSING (replace first, retire the old socket once
the new one is active) and WORKER_STATUS reports.

A session never reconnects itself; this loop does. Sessions come and go under the steps:
a GATEWAY_CLOSING or a dropped socket never touches user code; the worker learns of each
change through ``on_socket_ready`` / ``on_gateway_closing`` and ``Session.run``'s sink.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import (
    AuthError,
    GatewayError,
    LocalProtocolError,
    ProtocolError,
    SyncError,
    TransportError,
)
from ..ops import tracing
from ..ops.logs import event
from ..ops.logs import set_context as set_log_context
from ..protocol import WorkerConnection, pb
from ..protocol.state import State
from .executor import SDK_LANGUAGE, SDK_VERSION, AppSpec
from .session import EventSink, Session
from .timers import Changes, backoff_delays
from .unreachable import UnreachableHint

if TYPE_CHECKING:
    from ..config import Config
    from ..ops.metrics import WorkerMetrics
    from .gateway_api import GatewayAPI

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
# SYNC_FAILED this many times in a row means our function configuration is rejected:
# exiting (non-zero) makes the failure visible and lets the platform's restart policy
# decide, instead of a worker that is alive but never routable.
MAX_CONSECUTIVE_SYNC_FAILURES = 5


def is_fatal(exc: BaseException, consecutive_sync_failures: int = 0) -> bool:
    """Whether reconnecting cannot help (the supervisor stops and the process exits): a
    refused key, SYNC_FAILED again and again, or a frame our own state machine refused
    to send (a bug in the engine, which a new socket would only repeat)."""
    if isinstance(exc, AuthError | LocalProtocolError):
        return True
    return isinstance(exc, SyncError) and (
        consecutive_sync_failures >= MAX_CONSECUTIVE_SYNC_FAILURES
    )


async def _first_of(*events: anyio.Event) -> None:
    """Return as soon as any of ``events`` is set."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            for ev in events:
                tg.start_soon(_set_then_cancel, ev, scope)


async def _set_then_cancel(ev: anyio.Event, scope: anyio.CancelScope) -> None:
    await ev.wait()
    scope.cancel()


class Supervisor:
    """Opens sessions forever; knows which one is current and which can carry frames."""

    def __init__(
        self,
        config: Config,
        metrics: WorkerMetrics,
        changes: Changes,
        apps: Sequence[AppSpec],
        *,
        in_flight: Callable[[], list[str]],
        on_socket_ready: Callable[[], None],
        on_gateway_closing: Callable[[], None],
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._changes = changes
        self._apps = apps
        self._in_flight = in_flight  # request ids in flight (WORKER_STATUS)
        self._on_socket_ready = on_socket_ready
        self._on_gateway_closing = on_gateway_closing
        self.current: Session | None = None
        self.sessions: list[Session] = []
        self.draining = False
        self._unreachable = UnreachableHint(config)
        # The newest session's; short until one says (the lease watch wakes this often).
        self.extend_interval = 1.0

    def live_session(self) -> Session | None:
        """The newest session that can carry extensions and replies."""
        for session in reversed(self.sessions):
            if session.conn.live and not session.closed.is_set():
                return session
        return None

    @property
    def ready(self) -> bool:
        """Routable right now: a session is ACTIVE and we are not draining."""
        current = self.current
        return (
            not self.draining
            and current is not None
            and current.conn.state is State.ACTIVE
            and not current.closed.is_set()
        )

    async def run(self, api: GatewayAPI, sink: EventSink, tg: anyio.abc.TaskGroup,
                  steps_in_flight: Callable[[], bool]) -> None:
        """Reconnect forever; raises only what ``is_fatal`` says cannot be retried."""
        exclude: list[str] = []
        delays = backoff_delays(self._config.reconnect_min_backoff,
                                self._config.reconnect_max_backoff)
        sync_failures = 0
        extend_interval = 0.0  # told by the gateway in each CONNECTION_READY
        while True:
            try:
                start = await api.start(exclude)
                session = await Session.open(
                    start, self._connect_request(),
                    handshake_timeout=HANDSHAKE_TIMEOUT, metrics=self._metrics,
                )
            except (TransportError, GatewayError, ProtocolError) as exc:
                sync_failures = sync_failures + 1 if isinstance(exc, SyncError) else 0
                self._unreachable.failed(exc)
                if is_fatal(exc, sync_failures):
                    raise
                delay = next(delays)
                if steps_in_flight() and extend_interval:
                    # Leases are only extended over a socket: while steps are in flight
                    # the backoff must not outgrow them (the soak saw leases lapse
                    # behind a 30 s cap when the gateway came back after 3 s).
                    delay = min(delay, extend_interval / 4)
                event(log, "connection.retry", level=logging.WARNING, error=str(exc),
                      retry_in=round(delay, 3), draining=self.draining)
                reason = "sync_failed" if isinstance(exc, SyncError) else "start_failed"
                self._metrics.reconnects_total.labels(reason=reason).inc()
                await anyio.sleep(delay)
                continue
            delays = backoff_delays(self._config.reconnect_min_backoff,
                                    self._config.reconnect_max_backoff)
            self._unreachable.connected()
            sync_failures = 0
            extend_interval = session.ready.extend_lease_interval
            tracing.session_started(session)
            await tg.start(session.run, sink)
            await self._activate(session, tg)
            await _first_of(session.closed, session.gateway_closing)
            if session.gateway_closing.is_set():
                # The gateway failed every forward whose ACK it had not read yet and
                # re-routes them: ask about unconfirmed steps now, over this socket
                # (it still carries extensions), not after the next handshake.
                self._on_gateway_closing()
                # Replace first, retire the old socket once the new one is active.
                exclude = [session.start.gateway_group] if session.start.gateway_group else []
                self._metrics.reconnects_total.labels(reason="gateway_closing").inc()
                event(log, "connection.replace", conn_id=session.id, draining=self.draining)
            else:
                exclude = []
                self._metrics.reconnects_total.labels(reason="socket_closed").inc()
                event(log, "connection.reconnect", level=logging.WARNING, conn_id=session.id,
                      draining=self.draining)

    async def _activate(self, session: Session, tg: anyio.abc.TaskGroup) -> None:
        """Make ``session`` the current one: READY (or PAUSE), then move work onto it."""
        old = [s for s in self.sessions if s is not session]
        self.sessions.append(session)
        if self.draining:
            sent = await session.send(WorkerConnection.pause)
            self._metrics.set_connection_state("paused")
            event(log, "drain.pause_on_reconnect", conn_id=session.id, sent=sent)
        else:
            await session.send(WorkerConnection.send_ready)
            self._metrics.set_connection_state("ready")
        self.current = session
        self.extend_interval = session.ready.extend_lease_interval
        if session.ready.status_interval > 0:
            tg.start_soon(self._report_status, session)
        set_log_context(conn_id=session.id)
        event(log, "connection.ready", conn_id=session.id,
              gateway_group=session.start.gateway_group,
              paused=self.draining, heartbeat_interval=session.ready.heartbeat_interval,
              extend_lease_interval=session.ready.extend_lease_interval)
        # Every lease is extended at once on the new socket: the time without a
        # connection (a gateway restart, our reconnect backoff) ate into each lease, and
        # waiting for the next extend tick could let one lapse (the soak saw four steps
        # run again that way). It is also the ownership check of steps never confirmed
        # (ACKed just before the old socket left READY: the gateway may have re-routed
        # them). Replies still waiting for an ACK go out again.
        with session.corked():
            self._on_socket_ready()
        for stale in old:
            self.sessions.remove(stale)
            if not stale.closed.is_set():
                tg.start_soon(stale.close, "GATEWAY_DRAINING")
        self._changes.notify()

    def closed(self, session: Session) -> None:
        """Forget ``session`` (its socket is gone, whatever the reason)."""
        if session in self.sessions:
            self.sessions.remove(session)
        if self.current is session:
            self.current = None
            self._metrics.set_connection_state("disconnected")

    async def pause(self) -> None:
        """Stop being routable: every handshaken session gets WORKER_PAUSE."""
        for session in list(self.sessions):
            if session.conn.state in (State.CONNECTED, State.ACTIVE):
                sent = await session.send(WorkerConnection.pause)
                event(log, "drain.pause", conn_id=session.id, sent=sent)
        self._metrics.set_connection_state("paused")

    async def close_all(self) -> None:
        for session in list(self.sessions):
            await session.close("WORKER_SHUTDOWN")

    async def _report_status(self, session: Session) -> None:
        """WORKER_STATUS at the interval the gateway asked for (it only logs them today)."""
        while not session.closed.is_set():
            await anyio.sleep(session.ready.status_interval)
            await session.send(partial(
                WorkerConnection.status, in_flight_request_ids=self._in_flight(),
                shutdown_requested=self.draining,
            ))

    def _connect_request(self) -> Any:
        config = self._config
        request = pb.WorkerConnectRequestData(
            instance_id=config.instance_id,
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
        if config.env:
            request.environment = config.env
        if config.max_worker_concurrency:
            request.max_worker_concurrency = config.max_worker_concurrency
        for app in self._apps:
            app_config = request.apps.add(app_name=app.app_name, functions=app.functions_json)
            if app.app_version:
                app_config.app_version = app.app_version
        return request
