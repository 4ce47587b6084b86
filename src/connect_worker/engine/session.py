"""One WebSocket lifetime: open, handshake, read, heartbeat, close.

A session never reconnects itself; when its socket ends (or the gateway says it
is closing) the worker's supervisor opens a new one. Frames go through the
sans-I/O ``WorkerConnection``; decoded events go to the worker. websockets
exceptions are mapped here and nowhere else: ``send`` returns False instead of
raising, so callers decide what a lost frame means (a reply goes to the flush).

The per-step traffic (requests in; ACKs, replies and lease extensions out) takes a
synchronous path through websockets' connection object (``_Connection``): incoming
bytes are split into frames here and binary frames are handed to the worker inside
the read callback; frames go out with one ``transport.write`` (the pattern of
websockets' ``broadcast``), several frames of one read batch in one write. That skips
websockets' frame parser, its receive queue, its per-message futures and its async
send context, which were most of the engine's CPU per step. Everything else (the
opening handshake, TLS, proxies, pings, the closing handshake, fragmented or text
frames) stays websockets', which is handed whole frames.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import websockets
from anyio.abc import TaskStatus
from websockets.asyncio.client import ClientConnection, connect
from websockets.frames import Opcode
from websockets.protocol import State as WsState

try:  # websockets' C masking; the pure-Python one where the extension is not built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

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
from ..protocol.constants import MAX_FRAME_BYTES, SUBPROTOCOL
from .gateway_api import StartResult

if TYPE_CHECKING:
    from ..ops.metrics import WorkerMetrics

log = logging.getLogger(__name__)

# Two unanswered heartbeats mean the socket is dead even if TCP has not noticed.
MAX_UNANSWERED_HEARTBEATS = 2


class EventSink(Protocol):
    """What a session hands decoded gateway events to (the worker).

    ``handle_event`` runs inside the socket's read callback: it must not block or await
    (it may send with ``Session.send_now``). An exception from it ends the session and
    is raised from ``Session.run``.
    """

    def handle_event(self, session: Session, event: GatewayEvent) -> None: ...

    def session_closed(self, session: Session) -> None: ...


_HEAD_7 = struct.Struct("!BB")
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")
_FIN = 0x80
_FIN_BINARY = 0x82
_MASKED = 0x80
_MASK_POOL_BYTES = 4096
# A read callback handles at most this much at once (about 150 executor requests, a few
# ms); the rest of a large read (a burst of dispatches) goes through later callbacks, so
# heartbeats and timers are not held up behind thousands of frames.
READ_CHUNK_BYTES = 64 * 1024
# An HTTP response head longer than this is handed to websockets as it is (it rejects it).
MAX_RESPONSE_HEAD_BYTES = 64 * 1024


class _Masks:
    """Masking keys for client frames from os.urandom, 1024 keys per system call."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        at = self._at
        if at >= len(self._pool):
            self._pool, at = os.urandom(_MASK_POOL_BYTES), 0
        self._at = at + 4
        return self._pool[at : at + 4]


_masks = _Masks()


def client_frame(payload: bytes) -> bytes:
    """One masked, final binary frame (RFC 6455 §5.2) carrying ``payload``."""
    length = len(payload)
    if length < 126:
        head = _HEAD_7.pack(_FIN_BINARY, _MASKED | length)
    elif length < 65536:
        head = _HEAD_16.pack(_FIN_BINARY, _MASKED | 126, length)
    else:
        head = _HEAD_64.pack(_FIN_BINARY, _MASKED | 127, length)
    mask = _masks.next()
    return head + mask + apply_mask(payload, mask)


class _Connection(ClientConnection):
    """websockets' client connection with a synchronous path for whole binary frames.

    Incoming bytes are split into frames here (``_receive``): each final, unmasked,
    unfragmented binary frame goes straight to ``on_frame`` (set once the session runs),
    inside the read callback. Everything else (the HTTP response, control frames, text
    and fragmented messages, frames before ``on_frame`` is set or after a close frame,
    anything malformed) is handed to websockets, always a whole frame at a time, so its
    parser only ever starts at a frame boundary and keeps every check of its own.
    ``write_binary`` is websockets' ``broadcast`` for one connection, with the writes of
    one read batch joined into one ``transport.write``.
    """

    on_frame: Callable[[bytes], None] | None = None
    _corked: list[bytes] | None = None
    _backlog: bytes = b""  # read, not handled yet (reading is paused meanwhile)
    # An incomplete frame (or HTTP response head): its chunks, their size, and the size
    # the frame needs in all once its header has been read (0 before).
    _pending: list[bytes] | None = None
    _pending_size = 0
    _pending_needed = 0
    # False once the stream is handed to websockets unsplit (a rejected handshake, a
    # malformed frame, the end of the stream): from then on it is websockets' alone.
    _framing = True
    _fragmented = False  # websockets holds the first frames of a fragmented message

    def data_received(self, data: bytes) -> None:
        if self._backlog:
            self._backlog += data  # (reading is paused: only data already in flight)
            return
        if len(data) > READ_CHUNK_BYTES:
            self._backlog = data[READ_CHUNK_BYTES:]
            data = data[:READ_CHUNK_BYTES]
            self.transport.pause_reading()
            self.loop.call_soon(self._feed_backlog)
        with self.corked():
            self._receive(data)

    def _feed_backlog(self) -> None:
        data = self._backlog[:READ_CHUNK_BYTES]
        self._backlog = self._backlog[READ_CHUNK_BYTES:]
        if self._backlog:
            self.loop.call_soon(self._feed_backlog)
        elif not self.transport.is_closing():
            self.transport.resume_reading()
        if data:
            with self.corked():
                self._receive(data)

    def _feed_all(self) -> None:
        """Handle the whole backlog now, and give websockets any incomplete frame (the
        stream is ending: it judges a truncated frame)."""
        data, self._backlog = self._backlog, b""
        with self.corked():
            if data:
                self._receive(data)
            if self._pending is not None:
                rest = b"".join(self._pending)
                self._pending, self._pending_size, self._framing = None, 0, False
                super().data_received(rest)

    def eof_received(self) -> None:
        self._feed_all()
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._feed_all()
        super().connection_lost(exc)

    def _receive(self, data: bytes) -> None:
        """Split ``data`` into frames: binary messages to ``on_frame``, the rest to
        websockets (see the class docstring)."""
        pending = self._pending
        if pending is not None:
            pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._pending_needed:
                return  # a large frame still arriving: join its chunks once, at the end
            data = b"".join(pending)
            self._pending, self._pending_size = None, 0
        if not self._framing:
            super().data_received(data)
            return
        protocol = self.protocol
        if protocol.state is WsState.CONNECTING:
            data = self._receive_response(data)
            if not data:
                return
        on_frame = self.on_frame
        pos, size, needed = 0, len(data), 0
        while size - pos >= 2:
            first, second = data[pos], data[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - start < 2:
                    break
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            if second & _MASKED or length > MAX_FRAME_BYTES:
                # A server may not mask; too large: websockets fails the connection.
                self._framing = False
                super().data_received(data[pos:])
                return
            end = start + length
            if end > size:
                needed = end - pos
                break
            if (first == _FIN_BINARY and on_frame is not None and not self._fragmented
                    and protocol.state is WsState.OPEN):
                on_frame(data[start:end])
            else:
                opcode = first & 0x0F
                if opcode in (Opcode.TEXT, Opcode.BINARY):  # starts a message
                    self._fragmented = not first & _FIN
                elif opcode == Opcode.CONT and first & _FIN:  # ends one
                    self._fragmented = False
                super().data_received(data[pos:end])
            pos = end
        if pos < size:
            self._pending = [data[pos:]]
            self._pending_size = size - pos
            self._pending_needed = needed

    def _receive_response(self, data: bytes) -> bytes:
        """Give websockets the HTTP response head; return the bytes after it (frames)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_RESPONSE_HEAD_BYTES:
                self._framing = False  # websockets rejects it
                super().data_received(data)
            else:
                self._pending, self._pending_size, self._pending_needed = [data], len(data), 0
            return b""
        end += 4
        super().data_received(data[:end])
        rest = data[end:]
        if self.protocol.state is not WsState.OPEN:  # rejected: the rest is a body
            self._framing = False
            if rest:
                super().data_received(rest)
            return b""
        return rest

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Hold frames written inside the block and write them in one go at its end."""
        if self._corked is not None:  # already corked by an outer block
            yield
            return
        self._corked = []
        try:
            yield
        finally:
            self.uncork()

    def write_binary(self, payload: bytes) -> bool:
        """Queue one binary message; False when the connection is not open.

        Outside a ``corked`` block, frames written during one event-loop iteration go
        out together at the start of the next (replies finishing in one batch: one
        system call).
        """
        if self.protocol.state is not WsState.OPEN:
            return False
        corked = self._corked
        if corked is None:
            corked = self._corked = []
            self.loop.call_soon(self.uncork)
        corked.append(client_frame(payload))
        return True

    def uncork(self) -> None:
        """Write what is held now."""
        out, self._corked = self._corked, None
        if out and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


class Session:
    """A handshaken WebSocket to one gateway."""

    def __init__(
        self,
        start: StartResult,
        ws: _Connection,
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
        self._sink: EventSink | None = None
        self._failure: BaseException | None = None

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
                create_connection=_Connection,
            )
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise TransportError(f"cannot open the gateway WebSocket: {exc}") from exc
        assert isinstance(ws, _Connection)
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
                await self._send_or_raise(WorkerConnection.connect, connect_request)

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

    async def _send_or_raise(self, build: Callable[..., bytes], *args: Any) -> None:
        if not self.send_now(build, *args):
            raise TransportError("the gateway socket closed during the handshake")

    def send_now(self, build: Callable[..., bytes], *args: Any) -> bool:
        """Build one frame with ``build(self.conn, *args)`` and write it, without waiting.

        False when the socket is gone or being closed (the caller picks the fallback).
        Building happens only after that check, so a heartbeat or an extension racing
        with ``close()`` is not a protocol violation, just a frame not sent. There is no
        backpressure: what is in flight (steps, their replies) bounds what is buffered,
        and a gateway that stops reading misses heartbeats and loses the socket.
        """
        if self.closed.is_set() or self.conn.state is State.CLOSED:
            return False
        ws = self._ws
        if ws.protocol.state is not WsState.OPEN:
            return False
        return ws.write_binary(build(self.conn, *args))

    async def send(self, build: Callable[..., bytes], *args: Any) -> bool:
        """``send_now`` for callers in a task (kept awaitable for them)."""
        return self.send_now(build, *args)

    def corked(self) -> Any:
        """A context in which frames sent are written to the socket together at its end."""
        return self._ws.corked()

    async def run(self, sink: EventSink, *, task_status: TaskStatus[None]) -> None:
        """Read frames and send heartbeats until the socket ends."""
        self._sink = sink
        # From here on whole binary frames are handled in the read callback; frames
        # queued before (and fragmented or text ones) come through ``_read``.
        self._ws.on_frame = self._on_frame
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._heartbeat)
            task_status.started()
            try:
                await self._read()
            finally:
                self._ws.on_frame = None
                self.closed.set()
                tg.cancel_scope.cancel()
                sink.session_closed(self)
        if self._failure is not None:
            raise self._failure

    def _on_frame(self, frame: bytes) -> None:
        """One binary frame from the gateway (in the read callback: never blocks)."""
        if self._failure is not None:
            return
        try:
            received = self.conn.receive(frame)
        except RemoteProtocolError as exc:
            # One bad frame is that frame's problem, not the connection's.
            event(log, "frame.ignored", level=logging.WARNING, conn_id=self.id,
                  reason=str(exc))
            return
        kind = type(received)
        if kind is GatewayHeartbeat:
            self._on_heartbeat_answer()
        elif kind is GatewayClosing:
            event(log, "gateway.closing", conn_id=self.id,
                  gateway_group=self.start.gateway_group)
            self.gateway_closing.set()
        assert self._sink is not None
        try:
            self._sink.handle_event(self, received)
        except Exception as exc:
            # A bug in the engine: end this session; ``run`` raises it (as it did when
            # frames were handled in the reader task).
            self._failure = exc
            transport = self._ws.transport
            if transport is not None:
                transport.abort()

    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                if isinstance(frame, str):
                    event(log, "frame.ignored", level=logging.WARNING, conn_id=self.id,
                          reason="text frame")
                    continue
                self._on_frame(frame)
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
            event(log, "heartbeat.sent", level=logging.DEBUG, conn_id=self.id)
            await anyio.sleep(self.ready.heartbeat_interval)

    async def close(self, reason: str = "WORKER_SHUTDOWN") -> None:
        """Close with code 1000 and ``reason``; never raises."""
        if self.conn.state is not State.CLOSED:
            self.conn.close()
        self._ws.uncork()  # frames sent before the close frame go out before it
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
