"""A WebSocket proxy between a worker and a Connect gateway, on 127.0.0.1, for tests.

A real gateway cannot be told to drop a socket or to stop hearing a worker; this proxy
can. Point a worker at it with ``INNGEST_CONNECT_GATEWAY_URL=<proxy.url>`` (connect_worker)
or the SDK's ``rewrite_gateway_endpoint`` (the official client): ``/v0/connect/start`` and
``/flush`` still go to the API directly, only the WebSocket passes through here.

It records every frame both ways with its time, decoded through the protocol's protobuf
classes (kind name, request id, fields), plus a ``CLOSE`` entry for each side's close; it
drops the sockets on command (no close frame: the other end sees a lost connection, as
after a network failure), optionally when a given kind of frame arrives; and it stalls
one direction (frames are held, in order, then forwarded on release or after a bounded
time), which is how a partition or a stopped gateway looks from the other side.

One proxied socket pair per worker connection; a worker that reconnects gets a new pair
(``Frame.conn`` numbers them).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import time
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlparse

from google.protobuf.message import DecodeError, Message
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from ..protocol import pb

SUBPROTOCOL = "v0.connect.inngest.com"
# A stall never lasts longer than this, whatever the caller asked (a test that forgets
# to release must not hang a socket forever).
MAX_STALL_SECONDS = 600.0

Side = Literal["worker", "gateway"]
# Who sent the frame; "proxy" marks the proxy's own actions (DROP, STALL, RELEASE).
Direction = Literal["worker", "gateway", "proxy"]

# kind name -> payload message (kinds without a payload are absent)
_PAYLOADS: dict[str, type[Message]] = {
    "WORKER_CONNECT": pb.WorkerConnectRequestData,
    "GATEWAY_CONNECTION_READY": pb.GatewayConnectionReadyData,
    "GATEWAY_EXECUTOR_REQUEST": pb.GatewayExecutorRequestData,
    "WORKER_REQUEST_ACK": pb.WorkerRequestAckData,
    "WORKER_REQUEST_EXTEND_LEASE": pb.WorkerRequestExtendLeaseData,
    "WORKER_REQUEST_EXTEND_LEASE_ACK": pb.WorkerRequestExtendLeaseAckData,
    "WORKER_REPLY": pb.SDKResponse,
    "WORKER_REPLY_ACK": pb.WorkerReplyAckData,
    "SYNC_FAILED": pb.SystemError,
    "WORKER_STATUS": pb.WorkerStatusData,
}


@dataclass
class Frame:
    """One frame (or close) seen by the proxy."""

    seq: int
    conn: int
    direction: Direction
    kind: str  # GatewayMessageType name, "UNKNOWN_<n>", "UNDECODABLE" or "CLOSE"
    fields: dict[str, Any]
    size: int
    at: float  # seconds since the proxy started (monotonic), when it arrived
    wall: float  # time.time() when it arrived
    forwarded_at: float | None = None  # like ``at``; None while held or if dropped

    @property
    def request_id(self) -> str | None:
        value = self.fields.get("request_id")
        return str(value) if value else None

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "conn": self.conn, "direction": self.direction,
                "kind": self.kind, "fields": self.fields, "size": self.size,
                "at": round(self.at, 4), "forwarded_at": None if self.forwarded_at is None
                else round(self.forwarded_at, 4)}


def _value(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            text = value.decode()
        except UnicodeDecodeError:
            return {"bytes": len(value)}
        try:
            return json.loads(text)
        except ValueError:
            return text
    if isinstance(value, Message):
        return _plain(value)
    return value


def _plain(message: Message) -> dict[str, Any]:
    """A message's set fields as plain values (JSON bytes decoded, enums by name)."""
    out: dict[str, Any] = {}
    for descriptor, value in message.ListFields():
        if isinstance(value, MutableSequence):  # a repeated field's container
            value = [_value(v) for v in value]
        elif descriptor.enum_type is not None:
            value = descriptor.enum_type.values_by_number[value].name
        else:
            value = _value(value)
        out[descriptor.name] = value
    return out


def describe(data: bytes) -> tuple[str, dict[str, Any]]:
    """(kind name, decoded payload fields) of one Connect frame."""
    envelope = pb.ConnectMessage()
    try:
        envelope.ParseFromString(data)
    except (DecodeError, RuntimeWarning, ValueError):
        return "UNDECODABLE", {}
    try:
        kind = pb.GatewayMessageType.Name(envelope.kind)
    except ValueError:
        return f"UNKNOWN_{envelope.kind}", {}
    payload_type = _PAYLOADS.get(kind)
    if payload_type is None or not envelope.payload:
        return kind, {}
    payload = payload_type()
    try:
        payload.ParseFromString(envelope.payload)
    except (DecodeError, RuntimeWarning, ValueError):
        return kind, {"undecodable_payload": len(envelope.payload)}
    return kind, _plain(payload)


def _require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the proxy only forwards to loopback addresses, not {host!r}")


@dataclass
class _Drop:
    kind: str
    direction: Side
    forward: bool


@dataclass(eq=False)
class _Link:
    conn: int
    worker: ServerConnection
    gateway: ClientConnection
    queues: dict[Side, asyncio.Queue[tuple[Frame, bytes]]] = field(default_factory=dict)
    dropped: bool = False


class WsProxy:
    """``async with WsProxy(upstream_ws_url) as proxy:`` then point the worker at
    ``proxy.url``."""

    def __init__(self, upstream: str, *, name: str = "proxy") -> None:
        _require_loopback(upstream)
        self.upstream = upstream
        self.name = name
        self.frames: list[Frame] = []
        self._seq = itertools.count()
        self._conns = itertools.count(1)
        self._links: dict[int, _Link] = {}
        self._open: dict[Side, asyncio.Event] = {}
        self._release_timers: dict[Side, asyncio.TimerHandle] = {}
        self._drops: list[_Drop] = []
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self.port = 0

    @property
    def url(self) -> str:
        path = urlparse(self.upstream).path or "/v0/connect"
        return f"ws://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> WsProxy:
        directions: tuple[Side, ...] = ("worker", "gateway")
        for direction in directions:
            gate = asyncio.Event()
            gate.set()
            self._open[direction] = gate
        self._server = await serve(
            self._handle, "127.0.0.1", 0, subprotocols=[Subprotocol(SUBPROTOCOL)],
            ping_interval=None, max_size=None, compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for timer in self._release_timers.values():
            timer.cancel()
        for gate in self._open.values():
            gate.set()
        for link in list(self._links.values()):
            self._abort(link)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ----- commands -------------------------------------------------------------------

    def drop(self, conn: int | None = None) -> int:
        """Cut every proxied connection (or only ``conn``) now, without close frames;
        returns how many."""
        links = [link for link in self._links.values()
                 if not link.dropped and conn in (None, link.conn)]
        for link in links:
            self._record(link.conn, "proxy", "DROP", {}, 0)
            self._abort(link)
        return len(links)

    def drop_on(self, kind: str, *, direction: Side = "worker",
                forward: bool = False) -> None:
        """Cut the connection the next time a ``kind`` frame arrives from ``direction``
        (once); ``forward`` decides whether that frame still reaches the other side."""
        self._drops.append(_Drop(kind, direction, forward))

    def stall(self, seconds: float | None = None, *, direction: Side = "worker") -> None:
        """Hold every frame ``direction`` sends, on every connection (new ones too), until
        :meth:`release` or ``seconds`` (at most ``MAX_STALL_SECONDS``)."""
        self._open[direction].clear()
        self._record(0, "proxy", "STALL", {"side": direction, "seconds": seconds}, 0)
        timer = self._release_timers.pop(direction, None)
        if timer is not None:
            timer.cancel()
        limit = min(MAX_STALL_SECONDS, seconds if seconds is not None else MAX_STALL_SECONDS)
        loop = asyncio.get_running_loop()
        self._release_timers[direction] = loop.call_later(limit, self.release, direction)

    def release(self, direction: Side = "worker") -> None:
        """Forward what a stall held, in order, and let frames through again."""
        timer = self._release_timers.pop(direction, None)
        if timer is not None:
            timer.cancel()
        if not self._open[direction].is_set():
            self._record(0, "proxy", "RELEASE", {"side": direction}, 0)
        self._open[direction].set()

    def stalled(self, direction: Side = "worker") -> bool:
        return not self._open[direction].is_set()

    # ----- what was seen --------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self._started

    def select(self, kind: str | None = None, direction: Direction | None = None,
               request_id: str | None = None) -> list[Frame]:
        return [f for f in self.frames
                if (kind is None or f.kind == kind)
                and (direction is None or f.direction == direction)
                and (request_id is None or f.request_id == request_id)]

    async def wait_for(self, predicate: Callable[[Frame], bool], timeout: float = 30.0,  # noqa: ASYNC109
                       what: str = "a frame") -> Frame:
        """The first recorded frame (past or future) that matches ``predicate``."""
        checked = 0
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.frames[checked:]:
                    if predicate(frame):
                        return frame
                checked = len(self.frames)
                changed = self._changed
                await changed.wait()
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait_kind(self, kind: str, *, direction: Direction | None = None,
                        request_id: str | None = None, after: float = -1.0,
                        timeout: float = 30.0) -> Frame:  # noqa: ASYNC109
        """The first ``kind`` frame that arrived after ``after`` (proxy seconds)."""
        return await self.wait_for(
            lambda f: f.kind == kind and f.at > after
            and (direction is None or f.direction == direction)
            and (request_id is None or f.request_id == request_id),
            timeout, f"{kind} from {direction or 'either side'}")

    async def wait_forwarded(self, frame: Frame, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until ``frame`` went out to the other side (a stall may be holding it)."""
        async with asyncio.timeout(timeout):
            while frame.forwarded_at is None:
                await self._changed.wait()

    # ----- plumbing -------------------------------------------------------------------

    def _pulse(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _record(self, conn: int, direction: Direction, kind: str, fields: dict[str, Any],
                size: int) -> Frame:
        frame = Frame(next(self._seq), conn, direction, kind, fields, size, self.now(),
                      time.time())
        self.frames.append(frame)
        self._pulse()
        return frame

    def _abort(self, link: _Link) -> None:
        link.dropped = True
        for ws in (link.worker, link.gateway):
            transport = ws.transport
            if transport is not None:
                transport.abort()

    async def _handle(self, worker: ServerConnection) -> None:
        conn = next(self._conns)
        try:
            gateway = await connect(self.upstream, subprotocols=[Subprotocol(SUBPROTOCOL)],
                                    ping_interval=None, max_size=None, compression=None,
                                    open_timeout=10)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            self._record(conn, "gateway", "CLOSE", {"code": 1011, "reason": str(exc)}, 0)
            await worker.close(1011, "proxy: gateway unreachable")
            return
        link = _Link(conn, worker, gateway)
        self._links[conn] = link
        pumps = [
            asyncio.create_task(self._pump(link, "worker", worker, gateway)),
            asyncio.create_task(self._pump(link, "gateway", gateway, worker)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # One side ended: end the other the same way (a close frame, or a cut).
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._links.pop(conn, None)
            await self._mirror_close(link)

    async def _mirror_close(self, link: _Link) -> None:
        sides: tuple[tuple[Side, Any, Any], ...] = (
            ("worker", link.worker, link.gateway), ("gateway", link.gateway, link.worker))
        for direction, ws, other in sides:
            code = ws.close_code
            if code is None:
                continue
            if not any(f.kind == "CLOSE" and f.conn == link.conn and f.direction == direction
                       for f in self.frames):
                self._record(link.conn, direction, "CLOSE",
                             {"code": int(code), "reason": ws.close_reason or ""}, 0)
            if link.dropped or code in (1005, 1006, 1015):
                self._abort(link)
            else:
                with contextlib.suppress(ConnectionClosed, OSError):
                    await asyncio.wait_for(other.close(code, ws.close_reason or ""), 5)
            return
        self._abort(link)

    async def _pump(self, link: _Link, direction: Side, source: Any, sink: Any) -> None:
        """Read ``source``, record, and forward to ``sink`` (through the stall gate)."""
        queue: asyncio.Queue[tuple[Frame, bytes]] = asyncio.Queue()
        link.queues[direction] = queue
        forwarder = asyncio.create_task(self._forward(link, direction, queue, sink))
        try:
            async for data in source:
                raw = data if isinstance(data, bytes) else data.encode()
                kind, fields = describe(raw)
                frame = self._record(link.conn, direction, kind, fields, len(raw))
                rule = next((d for d in self._drops
                             if d.kind == kind and d.direction == direction), None)
                if rule is not None:
                    self._drops.remove(rule)
                    self._record(link.conn, "proxy", "DROP", {"on": kind}, 0)
                    if rule.forward:
                        with contextlib.suppress(ConnectionClosed):
                            await sink.send(raw)
                        frame.forwarded_at = self.now()
                    self._abort(link)
                    return
                queue.put_nowait((frame, raw))
        except ConnectionClosed:
            pass
        finally:
            # What was read before a normal close still goes out (bounded); frames a
            # stall holds die with the connection, as they would in a partition.
            if not link.dropped and self._open[direction].is_set():
                drained = asyncio.create_task(queue.join())
                await asyncio.wait({drained, forwarder}, timeout=5,
                                   return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
            forwarder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forwarder
            code = source.close_code
            if code is not None and not any(
                    f.kind == "CLOSE" and f.conn == link.conn and f.direction == direction
                    for f in self.frames):
                self._record(link.conn, direction, "CLOSE",
                             {"code": int(code), "reason": source.close_reason or ""}, 0)

    async def _forward(self, link: _Link, direction: Side,
                       queue: asyncio.Queue[tuple[Frame, bytes]], sink: Any) -> None:
        gate = self._open[direction]
        while True:
            frame, raw = await queue.get()
            try:
                await gate.wait()
                if link.dropped:
                    return
                try:
                    await sink.send(raw)
                except ConnectionClosed:
                    return
                frame.forwarded_at = self.now()
                self._pulse()
            finally:
                queue.task_done()
