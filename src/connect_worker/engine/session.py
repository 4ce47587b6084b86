"""One WebSocket lifetime: open, handshake, read, heartbeat, close.

A session never reconnects itself; when its socket ends (or the gateway says it
is closing) the worker's supervisor opens a new one. Frames go through the
sans-I/O ``WorkerConnection``; decoded events go to the worker. websockets
exceptions are mapped here and nowhere else: ``send`` returns False instead of
raising, so callers decide what a lost frame means (a reply goes to the flush).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import websockets
from anyio.abc import TaskStatus
from websockets.asyncio.client import ClientConnection, connect

from ..errors import GatewayError, RemoteProtocolError, SyncError, TransportError
from ..ops.logs import event
from ..protocol import (
    ConnectionReady,
    GatewayClosing,
    GatewayEvent,
    GatewayHeartbeat,
    State,
    SyncFailed,
    WorkerConnection,
)
from .gateway_api import StartResult

if TYPE_CHECKING:
    from ..ops.metrics import WorkerMetrics

log = logging.getLogger(__name__)

SUBPROTOCOL = "v0.connect.inngest.com"
# The gateway reads at most 8 MiB from a worker; its own requests carry <= 4 MiB of
# payload, so 8 MiB bounds what we accept too.
MAX_FRAME_BYTES = 8 * 1024 * 1024
# Two unanswered heartbeats mean the socket is dead even if TCP has not noticed.
MAX_UNANSWERED_HEARTBEATS = 2


class EventSink(Protocol):
    """What a session hands decoded gateway events to (the worker)."""

    async def handle_event(self, session: Session, event: GatewayEvent) -> None: ...

    def session_closed(self, session: Session) -> None: ...


class Session:
    """A handshaken WebSocket to one gateway."""

    def __init__(
        self,
        start: StartResult,
        ws: ClientConnection,
        conn: WorkerConnection,
        *,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.start = start
        self.conn = conn
        self._ws = ws
        self._metrics = metrics
        self.closed = anyio.Event()
        self.gateway_closing = anyio.Event()
        self._unanswered = 0
        self._heartbeat_sent_at = 0.0

    @property
    def id(self) -> str:
        return self.start.connection_id

    @property
    def ready(self) -> ConnectionReady:
        assert self.conn.ready is not None, "session used before its handshake"
        return self.conn.ready

    @classmethod
    async def open(
        cls,
        start: StartResult,
        connect_request: Any,
        *,
        handshake_timeout: float,
        metrics: WorkerMetrics | None = None,
    ) -> Session:
        """Connect, answer HELLO with WORKER_CONNECT, wait for CONNECTION_READY."""
        try:
            ws = await connect(
                start.gateway_endpoint,
                subprotocols=[websockets.Subprotocol(SUBPROTOCOL)],
                max_size=MAX_FRAME_BYTES,
                open_timeout=handshake_timeout,
                # Connect has its own heartbeats; websockets' pings would only add noise.
                ping_interval=None,
                close_timeout=2,
                compression=None,
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise TransportError(f"cannot open the gateway WebSocket: {exc}") from exc
        session = cls(start, ws, WorkerConnection(), metrics=metrics)
        try:
            with anyio.fail_after(handshake_timeout):
                await session._handshake(connect_request)
        except TimeoutError:
            await session.abort()
            raise TransportError("the gateway handshake timed out") from None
        except BaseException:
            await session.abort()
            raise
        return session

    async def _handshake(self, connect_request: Any) -> None:
        while self.conn.ready is None:
            frame = await self._recv_handshake_frame()
            try:
                received = self.conn.receive(frame)
            except RemoteProtocolError as exc:
                raise GatewayError(f"unexpected frame during the handshake: {exc}") from exc
            if isinstance(received, SyncFailed):
                raise SyncError(f"the gateway could not sync the apps: {received.code}: "
                                f"{received.message}")
            if self.conn.state is State.SENDING_CONNECT:  # HELLO arrived: answer it once
                connect_request.connection_id = self.id
                connect_request.auth_data.session_token = self.start.session_token
                connect_request.auth_data.sync_token = self.start.sync_token
                await self._send_or_raise(lambda conn: conn.connect(connect_request))

    async def _recv_handshake_frame(self) -> bytes:
        try:
            frame = await self._ws.recv()
        except websockets.ConnectionClosed as exc:
            reason = exc.rcvd.reason if exc.rcvd else ""
            code = exc.rcvd.code if exc.rcvd else 1006
            raise GatewayError(f"the gateway closed the socket during the handshake "
                               f"({code} {reason})") from exc
        if isinstance(frame, str):
            raise GatewayError("the gateway sent a text frame during the handshake")
        return frame

    async def _send_or_raise(self, build: Callable[[WorkerConnection], bytes]) -> None:
        if not await self.send(build):
            raise TransportError("the gateway socket closed during the handshake")

    async def send(self, build: Callable[[WorkerConnection], bytes]) -> bool:
        """Build one frame with the protocol object and send it.

        False when the socket is gone or being closed (the caller picks the fallback).
        Building happens only after that check, so a heartbeat or an extension racing
        with ``close()`` is not a protocol violation, just a frame not sent.
        """
        if self.closed.is_set() or self.conn.state is State.CLOSED:
            return False
        frame = build(self.conn)
        try:
            await self._ws.send(frame)
        except (websockets.ConnectionClosed, OSError):
            self.closed.set()
            return False
        return True

    async def run(self, sink: EventSink, *, task_status: TaskStatus[None]) -> None:
        """Read frames and send heartbeats until the socket ends."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat)
            task_status.started()
            try:
                await self._read(sink)
            finally:
                self.closed.set()
                tg.cancel_scope.cancel()
                sink.session_closed(self)

    async def _read(self, sink: EventSink) -> None:
        try:
            async for frame in self._ws:
                if isinstance(frame, str):
                    event(log, "frame.ignored", level=logging.WARNING, conn_id=self.id,
                          reason="text frame")
                    continue
                try:
                    received = self.conn.receive(frame)
                except RemoteProtocolError as exc:
                    # One bad frame is that frame's problem, not the connection's.
                    event(log, "frame.ignored", level=logging.WARNING, conn_id=self.id,
                          reason=str(exc))
                    continue
                if isinstance(received, GatewayHeartbeat):
                    self._on_heartbeat_answer()
                elif isinstance(received, GatewayClosing):
                    event(log, "gateway.closing", conn_id=self.id,
                          gateway_group=self.start.gateway_group)
                    self.gateway_closing.set()
                await sink.handle_event(self, received)
        except websockets.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            reason = exc.rcvd.reason if exc.rcvd else ""
            if self.conn.state is not State.CLOSED:
                event(log, "connection.lost", level=logging.WARNING, conn_id=self.id,
                      code=code, reason=reason)

    def _on_heartbeat_answer(self) -> None:
        self._unanswered = 0
        if self._metrics is not None and self._heartbeat_sent_at:
            self._metrics.heartbeat_rtt_seconds.observe(time.monotonic() - self._heartbeat_sent_at)

    async def _heartbeat(self) -> None:
        while not self.closed.is_set():
            if self._unanswered >= MAX_UNANSWERED_HEARTBEATS:
                event(log, "heartbeat.missed", level=logging.WARNING, conn_id=self.id,
                      unanswered=self._unanswered)
                await self.abort()
                return
            self._unanswered += 1
            self._heartbeat_sent_at = time.monotonic()
            if not await self.send(WorkerConnection.heartbeat):
                return
            await anyio.sleep(self.ready.heartbeat_interval)

    async def close(self, reason: str = "WORKER_SHUTDOWN") -> None:
        """Close with code 1000 and ``reason``; never raises."""
        if self.conn.state is not State.CLOSED:
            self.conn.close()
        with anyio.move_on_after(3, shield=True):
            try:
                await self._ws.close(1000, reason)
            except (websockets.ConnectionClosed, OSError):
                pass
        self.closed.set()

    async def abort(self) -> None:
        """Drop the socket without a close handshake (it is dead or misbehaving)."""
        if self.conn.state is not State.CLOSED:
            self.conn.close()
        transport = self._ws.transport
        if transport is not None:
            transport.abort()
        self.closed.set()
