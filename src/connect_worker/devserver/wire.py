"""The dev gateway's wire and its injected faults: one layer under the protocol handlers.

It owns the frames to and from each worker socket (encoding, decoding, the write
timeout, the timeline record of every frame) and every ``Faults`` knob that acts on
them: the slow wire (``frame_latency``: one delay line per direction), late and
withheld ACKs (``delay_request_ack``, ``delay_reply_ack``, ``withhold_reply_ack``,
``delay_extend_ack``, ``withhold_extend_ack``), refused extensions
(``nack_extensions``), lost replies (``drop_replies``, ``reply_close_race``) and
failed syncs (``sync_delay``, ``sync_failure``). The handlers in gateway.py ask this
layer and never read ``faults`` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ..protocol import pb
from . import logfmt
from .core import Session
from .state import ConnectionInfo, DevState, Phase, check

log = logging.getLogger(__name__)

Kind = pb.GatewayMessageType
T = TypeVar("T")

# Not a syscode: wsproto.Read's close reason for a frame that is not a ConnectMessage.
UNMARSHAL_FAILED = "failed to unmarshal Protobuf"


def kind_name(kind: int) -> str:
    try:
        return str(Kind.Name(kind))
    except ValueError:
        return f"UNKNOWN_{kind}"


def parse(message: Message, payload: bytes) -> bool:
    try:
        message.ParseFromString(payload)
    except (DecodeError, RuntimeWarning, ValueError):
        return False
    return True


@dataclass
class GatewayConnection:
    """A live worker socket."""

    info: ConnectionInfo
    ws: ServerConnection
    session: Session
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # request_id -> future resolved True by the ACK, False when the forward fails.
    pending: dict[str, asyncio.Future[bool]] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def fail_pending(self) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result(False)


class DelayLine(Generic[T]):
    """``faults.frame_latency`` in one direction: items come out in order, each at its
    due time, so a burst is not slowed down item by item. ``deliver`` returning False
    (the socket is gone) ends the line, and what was still on it is lost."""

    def __init__(self, deliver: Callable[[T], Awaitable[bool]]) -> None:
        self._deliver = deliver
        # (due, item); an item of None ends the line.
        self._queue: asyncio.Queue[tuple[float, T | None]] = asyncio.Queue()

    def put(self, item: T, latency: float) -> None:
        self._queue.put_nowait((time.monotonic() + latency, item))

    def end(self) -> None:
        self._queue.put_nowait((0.0, None))

    async def run(self) -> None:
        while True:
            due, item = await self._queue.get()
            try:
                if item is None:
                    return
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                if not await self._deliver(item):
                    return
            finally:
                self._queue.task_done()

    async def drained(self) -> None:
        await self._queue.join()


# An outbound frame: (frame, kind, conn_id, request_id).
_Frame = tuple[bytes, int, str | None, str | None]


class Wire:
    """Frames and faults for every socket of one gateway."""

    def __init__(self, state: DevState, write_timeout: float) -> None:
        self.state = state
        self.faults = state.faults
        self._write_timeout = write_timeout
        # Outbound delay lines (faults.frame_latency), per socket.
        self._outboxes: dict[ServerConnection, DelayLine[_Frame]] = {}
        # Tasks that outlive their connection (cancelled only when the gateway closes).
        self.background: set[asyncio.Task[None]] = set()

    # -- tasks -----------------------------------------------------------------

    def spawn(self, conn: GatewayConnection, coro: Coroutine[Any, Any, None]) -> None:
        """A task of ``conn``: cancelled when the connection ends."""
        task: asyncio.Task[None] = asyncio.create_task(coro)
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)

    def spawn_background(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task that outlives its connection (cancelled only when the gateway closes)."""
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _later(self, conn: GatewayConnection, delay: float,
                     action: Callable[[], Awaitable[None]]) -> None:
        """``action`` now, or ``delay`` seconds later on a task of ``conn``."""
        if delay <= 0:
            await action()
            return

        async def late() -> None:
            await asyncio.sleep(delay)
            await action()

        self.spawn(conn, late())

    # -- writing ---------------------------------------------------------------

    async def write(
        self,
        ws: ServerConnection,
        kind: int,
        payload: bytes = b"",
        *,
        conn_id: str | None = None,
        request_id: str | None = None,
        lock: asyncio.Lock | None = None,
    ) -> bool:
        frame = pb.ConnectMessage(kind=kind, payload=payload).SerializeToString()  # type: ignore[arg-type]
        latency = self.faults.frame_latency
        outbox = self._outboxes.get(ws)
        if latency > 0 or outbox is not None:
            # faults.frame_latency: the frame is on a slow wire. The caller goes on at once
            # (as after a write into the kernel's buffer); one sender per socket delivers
            # the frames in order, each ``latency`` after it was written.
            if outbox is None:
                outbox = self._outboxes[ws] = DelayLine(
                    lambda f: self._send_late(ws, *f))
                self.spawn_background(self._run_outbox(ws, outbox))
            outbox.put((frame, kind, conn_id, request_id), latency)
            return True
        try:
            if lock is not None:
                async with lock:
                    async with asyncio.timeout(self._write_timeout):
                        await ws.send(frame)
            else:
                async with asyncio.timeout(self._write_timeout):
                    await ws.send(frame)
        except (ConnectionClosed, TimeoutError, OSError):
            return False
        self.state.record("out", kind_name(kind), conn_id, request_id)
        return True

    async def _send_late(self, ws: ServerConnection, frame: bytes, kind: int,
                         conn_id: str | None, request_id: str | None) -> bool:
        try:
            async with asyncio.timeout(self._write_timeout):
                await ws.send(frame)
        except (ConnectionClosed, TimeoutError, OSError):
            return False  # what was still on the wire is lost with the socket
        self.state.record("out", kind_name(kind), conn_id, request_id)
        return True

    async def _run_outbox(self, ws: ServerConnection, outbox: DelayLine[_Frame]) -> None:
        try:
            await outbox.run()
        finally:
            self._outboxes.pop(ws, None)

    def end(self, ws: ServerConnection) -> None:
        """The socket ended: stop its late sender; what was still on the wire is lost."""
        outbox = self._outboxes.get(ws)
        if outbox is not None:
            outbox.end()

    async def close(self, ws: ServerConnection, code: int, reason: str,
                    conn_id: str | None = None) -> None:
        self.state.record("out", "CLOSE", conn_id, detail=f"{code} {reason}")
        with contextlib.suppress(Exception):
            await ws.close(code, reason)

    # -- reading ---------------------------------------------------------------

    async def read(self, conn: GatewayConnection,
                   handle: Callable[[GatewayConnection, pb.ConnectMessage], Awaitable[None]]
                   ) -> None:
        """Read frames until the socket ends; each decoded message goes to ``handle``,
        in wire order (through a delay line with faults.frame_latency)."""
        info = conn.info
        late: DelayLine[pb.ConnectMessage] | None = None

        async def deliver(msg: pb.ConnectMessage) -> bool:
            await handle(conn, msg)
            return True

        while True:
            try:
                frame = await conn.ws.recv()
            except ConnectionClosed:
                if late is not None:
                    # Frames read before the close were on the wire before it.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.faults.frame_latency + 2):
                            await late.drained()
                return
            if not isinstance(frame, bytes):
                # Binary frames only (assumption: close 1003 unsupported data).
                self.state.record("in", "TEXT_FRAME", info.conn_id)
                await self.close(conn.ws, 1003, "binary frames only", info.conn_id)
                return
            msg = pb.ConnectMessage()
            if not parse(msg, frame):
                # wsproto.Read closes the socket and the read loop ends.
                self.state.record("in", "UNDECODABLE", info.conn_id)
                self.state.error(f"undecodable frame on {info.conn_id}")
                await self.close(conn.ws, 1007, UNMARSHAL_FAILED, info.conn_id)
                return
            latency = self.faults.frame_latency
            if late is None and latency <= 0:
                await handle(conn, msg)
                continue
            if late is None:
                late = DelayLine(deliver)
                self.spawn(conn, late.run())
            late.put(msg, latency)

    # -- faults on the protocol's messages --------------------------------------

    async def sync_failure(self) -> tuple[str, str] | None:
        """The injected SYNC_FAILED (code, message) for this sync, after the sync delay."""
        if self.faults.sync_delay:
            await asyncio.sleep(self.faults.sync_delay)
        failure = self.faults.sync_failure
        if failure is not None and not self.faults.sync_failure_persistent:
            self.faults.sync_failure = None
        return failure

    async def request_ack(self, conn: GatewayConnection, request_id: str,
                          complete: Callable[[GatewayConnection, str], None]) -> None:
        """A WORKER_REQUEST_ACK is handled now, or ``delay_request_ack`` late (the real
        gateway reads control and data frames on different goroutines: a WORKER_PAUSE
        read just after the ACK can win)."""

        async def now() -> None:
            complete(conn, request_id)

        await self._later(conn, self.faults.delay_request_ack, now)

    def nacks_extension(self, request_id: str) -> bool:
        return check(self.faults.nack_extensions, request_id)

    async def extend_ack(self, conn: GatewayConnection, request_id: str,
                         write: Callable[[], Awaitable[None]]) -> None:
        """Write a lease extension's ACK: withheld, late or now."""
        if check(self.faults.withhold_extend_ack, request_id):
            return
        await self._later(conn, self.faults.delay_extend_ack, write)

    async def reply(self, conn: GatewayConnection, resp: pb.SDKResponse,
                    handle: Callable[[GatewayConnection, pb.SDKResponse], Awaitable[None]]
                    ) -> None:
        """A WORKER_REPLY read from the socket reaches ``handle`` unless lost: dropped, or
        (``reply_close_race``) handled that much later and lost if the socket closed
        meanwhile: the real gateway hands a read reply to a data goroutine, and a close
        cancels the run context first (§5.3)."""

        async def unless_dropped() -> None:
            if check(self.faults.drop_replies, resp.request_id):
                self.state.record("in", "REPLY_DROPPED", conn.info.conn_id, resp.request_id)
                log.info("reply dropped (fault): %s", logfmt.reply(resp))
                return
            await handle(conn, resp)

        race = self.faults.reply_close_race
        if race <= 0:
            await unless_dropped()
            return

        async def after_race() -> None:
            await asyncio.sleep(race)
            if conn.info.phase >= Phase.DISCONNECTING:
                self.state.record("in", "REPLY_DISCARDED", conn.info.conn_id, resp.request_id)
                return
            await unless_dropped()

        self.spawn_background(after_race())

    def withholds_reply_ack(self, request_id: str) -> bool:
        return check(self.faults.withhold_reply_ack, request_id)

    async def reply_ack(self, conn: GatewayConnection,
                        write: Callable[[], Awaitable[None]]) -> None:
        """Write a reply's ACK now or ``delay_reply_ack`` late."""
        await self._later(conn, self.faults.delay_reply_ack, write)
