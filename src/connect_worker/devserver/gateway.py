"""The Connect gateway: one WebSocket server per gateway group.

Restates the behaviour of the real gateway (pkg/connect/gateway.go and
gateway_msg_*.go, spec §2-§5.4): handshake validation with its exact close
codes, per-connection phases, readiness, heartbeats, pause, drain, forwarding
with a pending ACK, lease extension and reply persistence. Frames are handled in
wire order on one task per connection (the real gateway splits control and data
frames across goroutines; ``faults.delay_request_ack`` reproduces that race).

Frames and injected faults are the layer below (wire.py); this module is the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from ..protocol import constants, pb
from . import logfmt
from .browser import refusal
from .core import Core
from .handshake import INTERNAL, HandshakeError, handshake, intervals, parse_apps
from .state import ConnectionInfo, ConnStatus, Phase, SyncRecord
from .ulid import is_ulid
from .wire import GatewayConnection, Wire, kind_name
from .wire import parse as _parse

log = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol(constants.SUBPROTOCOL)
MAX_FRAME = constants.MAX_FRAME_BYTES
Kind = pb.GatewayMessageType

# Close reasons (syscodes) the real gateway uses after the handshake, spec §5.4.3.
ACK_INVALID = "connect_worker_request_ack_invalid_payload"
EXTEND_INVALID = "connect_worker_request_extend_lease_invalid_payload"
GATEWAY_CLOSING = "connect_gateway_closing"


class Gateway:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.state = core.state
        self.config = core.config
        self.live: dict[str, GatewayConnection] = {}
        self.urls: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.draining_groups: set[str] = set()
        self.wire = Wire(self.state, self.config.write_timeout)
        # request_id -> instance owning the lease of a request forwarded twice
        # (Faults.dual_dispatch): extensions from the other copy are NACKed. An instance,
        # not a connection: the owner may extend over a newer connection after a drop.
        self.dual_owners: dict[str, str] = {}
        self._servers: list[Server] = []
        self._handlers: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------

    async def start(self, host: str, ports: dict[str, int]) -> None:
        for group in self.config.gateway_groups:
            server = await serve(
                self._make_handler(group),
                host,
                ports.get(group, 0),
                subprotocols=[SUBPROTOCOL],
                process_request=self._make_process_request(group),
                max_size=MAX_FRAME,
                ping_interval=None,
                close_timeout=2,
            )
            self._servers.append(server)
            port = next(iter(server.sockets)).getsockname()[1]
            self.ports[group] = port
            self.urls[group] = f"ws://{host}:{port}/v0/connect"

    async def close(self) -> None:
        for conn in list(self.live.values()):
            conn.ws.transport.abort()
        for server in self._servers:
            server.close(close_connections=False)
        for task in [*self._handlers, *self.wire.background]:
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await server.wait_closed()
        self._servers.clear()

    def _make_process_request(
        self, group: str
    ) -> Callable[[ServerConnection, Request], Response | None]:
        def process_request(connection: ServerConnection, request: Request) -> Response | None:
            path = request.path.split("?", 1)[0]
            if path == "/ready":
                if group in self.draining_groups:
                    return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
                return connection.respond(HTTPStatus.OK, "ok\n")
            if path != "/v0/connect":
                return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
            # A page may open a WebSocket to any site: the same Host/Origin checks as the API.
            headers = {k.lower(): v for k, v in request.headers.raw_items()}
            refused = refusal("GET", headers, self.core.config.allowed_hosts)
            if refused is not None:
                return connection.respond(HTTPStatus.FORBIDDEN, refused + "\n")
            if self.state.faults.gateway_down():
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "restarting\n")
            return None

        return process_request

    def _make_handler(self, group: str) -> Callable[[ServerConnection], Awaitable[None]]:
        async def handler(ws: ServerConnection) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                await self._serve(ws, group)
            finally:
                self._handlers.discard(task)

        return handler

    # -- sending ---------------------------------------------------------------

    async def send(self, conn: GatewayConnection, kind: int, payload: bytes = b"", *,
                   request_id: str | None = None) -> bool:
        return await self.wire.write(
            conn.ws, kind, payload, conn_id=conn.info.conn_id, request_id=request_id,
            lock=conn.send_lock,
        )

    # -- handshake -------------------------------------------------------------

    async def _close(self, ws: ServerConnection, code: int, reason: str,
                     conn_id: str | None = None) -> None:
        await self.wire.close(ws, code, reason, conn_id)

    async def _serve(self, ws: ServerConnection, group: str) -> None:
        if group in self.draining_groups:
            await self._close(ws, 1001, GATEWAY_CLOSING)
            return
        if ws.subprotocol != SUBPROTOCOL:
            # The real gateway requires the subprotocol; the exact close it uses
            # was not verified (assumption: 1002 protocol error).
            await self._close(ws, 1002, "invalid subprotocol")
            return
        if not await self.wire.write(ws, Kind.GATEWAY_HELLO):
            return
        try:
            req, session = await handshake(ws, self.core)
            configs, hashes = parse_apps(req, session.env)
        except HandshakeError as exc:
            log.info("connection refused in handshake: close %d %s", exc.code, exc.reason)
            await self._close(ws, exc.code, exc.reason)
            return
        except ConnectionClosed:
            return

        info = ConnectionInfo(
            conn_id=req.connection_id,
            instance_id=req.instance_id,
            gateway_group=group,
            env=session.env,
            connect_request=req,
            start_headers=dict(session.start_call.headers),
            manual_readiness=req.worker_manual_readiness_ack,
            apps=[a.app_name for a in req.apps],
            app_version={
                a.app_name: a.app_version for a in req.apps if a.HasField("app_version")
            },
            functions={},
            group_hashes=hashes,
            max_worker_concurrency=(
                req.max_worker_concurrency if req.HasField("max_worker_concurrency") else None
            ),
        )
        conn = GatewayConnection(info, ws, session)
        self.state.connections[info.conn_id] = info
        self.live[info.conn_id] = conn
        self.core.leases.set_capacity(info.instance_id, info.max_worker_concurrency)
        self.state.notify()
        log.info("connection opened: %s, gateway %s, functions %s", logfmt.who(info), group,
                 [f["id"] for fns in configs.values() for f in fns])
        try:
            if not await self._sync(conn, configs):
                return
            if not await self.send(conn, Kind.GATEWAY_CONNECTION_READY,
                                   intervals(self.config).SerializeToString()):
                return
            if not info.manual_readiness:
                self._mark_ready(conn)
            watchdog = asyncio.create_task(self._heartbeat_watchdog(conn))
            conn.tasks.add(watchdog)
            await self.wire.read(conn, self._handle)
        finally:
            await self._disconnected(conn)

    async def _sync(
        self, conn: GatewayConnection, configs: dict[str, list[dict[str, Any]]]
    ) -> bool:
        """Store the function configs of every app (the in-process /fn/register)."""
        failure = await self.wire.sync_failure()
        if failure is not None:
            code, message = failure
            log.info("sync failed (injected): %s: %s %s", logfmt.who(conn.info), code, message)
            await self.send(conn, Kind.SYNC_FAILED,
                            pb.SystemError(code=code, message=message).SerializeToString())
            await self._close(conn.ws, 1008, code, conn.info.conn_id)
            return False
        now = time.time()
        for app, functions in configs.items():
            conn.info.functions[app] = [f["id"] for f in functions]
            group = conn.info.group_hashes[app]
            if group in self.state.groups:
                # An existing, synced worker group is reused without a sync.
                continue
            self.state.groups[group] = now
            new = {f["id"]: f for f in functions}
            changed = self.state.functions.get(app) != new
            self.state.functions[app] = new
            self.state.syncs.append(SyncRecord(now, app, group, conn.info.conn_id, changed))
        self.state.notify()
        return True

    def _mark_ready(self, conn: GatewayConnection) -> None:
        if conn.info.phase in (Phase.HANDSHAKING, Phase.NEW):
            conn.info.set_phase(Phase.READY)
            conn.info.status = ConnStatus.READY
            self.state.notify()
            log.info("connection ready: %s", logfmt.who(conn.info))

    # -- frames from the worker -------------------------------------------------

    async def _handle(self, conn: GatewayConnection, msg: pb.ConnectMessage) -> None:
        info = conn.info
        kind = msg.kind
        if kind == Kind.WORKER_HEARTBEAT:
            self.state.record("in", "WORKER_HEARTBEAT", info.conn_id)
            info.last_heartbeat = time.monotonic()
            info.heartbeats += 1
            if info.phase in (Phase.READY, Phase.DRAINING):
                if info.paused or info.gateway_closing_sent:
                    info.status = ConnStatus.DRAINING
                await self.send(conn, Kind.GATEWAY_HEARTBEAT)
            self.state.notify()
        elif kind == Kind.WORKER_PAUSE:
            self.state.record("in", "WORKER_PAUSE", info.conn_id)
            info.paused = True
            info.set_phase(Phase.DRAINING)
            if info.status in (ConnStatus.CONNECTED, ConnStatus.READY):
                info.status = ConnStatus.DRAINING
            conn.fail_pending()
            self.state.notify()
            log.info("connection paused (WORKER_PAUSE, draining): %s", logfmt.who(info))
        elif kind == Kind.WORKER_READY:
            self.state.record("in", "WORKER_READY", info.conn_id)
            if info.gateway_group in self.draining_groups:
                await self._close(conn.ws, 1001, GATEWAY_CLOSING, info.conn_id)
            elif info.phase is Phase.HANDSHAKING:
                self._mark_ready(conn)
        elif kind == Kind.WORKER_REQUEST_ACK:
            ack = pb.WorkerRequestAckData()
            if not _parse(ack, msg.payload):
                self.state.record("in", "WORKER_REQUEST_ACK", info.conn_id)
                await self._close(conn.ws, 1008, ACK_INVALID, info.conn_id)
                return
            self.state.record("in", "WORKER_REQUEST_ACK", info.conn_id, ack.request_id)
            await self.wire.request_ack(conn, ack.request_id, self._complete_ack)
        elif kind == Kind.WORKER_REQUEST_EXTEND_LEASE:
            ext = pb.WorkerRequestExtendLeaseData()
            ok = _parse(ext, msg.payload)
            self.state.record("in", "WORKER_REQUEST_EXTEND_LEASE", info.conn_id,
                              ext.request_id if ok else None)
            if not ok or not is_ulid(ext.lease_id):
                await self._close(conn.ws, 1008, EXTEND_INVALID, info.conn_id)
                return
            await self._extend(conn, ext)
        elif kind == Kind.WORKER_REPLY:
            resp = pb.SDKResponse()
            ok = _parse(resp, msg.payload)
            self.state.record("in", "WORKER_REPLY", info.conn_id, resp.request_id if ok else None)
            if not ok:
                # handleSdkReply fails, and handleWorkerReply closes the socket.
                self.state.error(f"undecodable WORKER_REPLY on {info.conn_id}")
                await self._close(conn.ws, 1011, INTERNAL, info.conn_id)
                return
            await self.wire.reply(conn, resp, self._reply)
        elif kind == Kind.WORKER_STATUS:
            status = pb.WorkerStatusData()
            _parse(status, msg.payload)
            # The real gateway only logs these; record what they said for tests.
            self.state.record("in", "WORKER_STATUS", info.conn_id, detail=(
                f"in_flight={','.join(status.in_flight_request_ids)} "
                f"shutdown={status.shutdown_requested}"
            ))
        else:
            self.state.record("in", kind_name(kind), info.conn_id, detail="ignored")

    def _complete_ack(self, conn: GatewayConnection, request_id: str) -> None:
        """Complete the pending forward of ``request_id`` on the connection the ACK came in
        on (completePendingAck is per connection handler). A late ACK, for a forward that
        already failed when its connection left READY, is ignored even when the request
        has since been re-routed to another connection: the re-route race of §5.2. (A
        request forwarded to two connections at once, Faults.dual_dispatch, has a pending
        ACK on each.)"""
        fut = conn.pending.get(request_id)
        if fut is not None and not fut.done():
            fut.set_result(True)
            return
        self.state.record("in", "ACK_IGNORED", conn.info.conn_id, request_id,
                          detail="no pending forward on this connection")

    async def _extend(self, conn: GatewayConnection, ext: pb.WorkerRequestExtendLeaseData) -> None:
        owner = self.dual_owners.get(ext.request_id, conn.info.instance_id)
        if self.wire.nacks_extension(ext.request_id) or owner != conn.info.instance_id:
            new_id = None
        else:
            new_id = self.core.leases.extend(ext.request_id, ext.lease_id, conn.info.instance_id)
        self.state.notify()
        ack = pb.WorkerRequestExtendLeaseAckData(
            request_id=ext.request_id,
            account_id=ext.account_id,
            env_id=ext.env_id,
            app_id=ext.app_id,
            function_slug=ext.function_slug,
        )
        if new_id is not None:
            ack.new_lease_id = new_id
        payload = ack.SerializeToString()

        async def write() -> None:
            if conn.info.phase in (Phase.READY, Phase.DRAINING):
                await self.send(conn, Kind.WORKER_REQUEST_EXTEND_LEASE_ACK, payload,
                                request_id=ext.request_id)

        await self.wire.extend_ack(conn, ext.request_id, write)

    async def _reply(self, conn: GatewayConnection, resp: pb.SDKResponse) -> None:
        """Persist a WORKER_REPLY that reached the gateway (wire.reply) and ACK it."""
        record = self.core.persist_reply(resp, "ws", conn.info.conn_id)
        log.info("reply by socket from %s: %s", conn.info.instance_id, logfmt.reply(resp))
        if self.wire.withholds_reply_ack(resp.request_id):
            log.info("WORKER_REPLY_ACK withheld (fault) for request %s", resp.request_id)
            return
        payload = pb.WorkerReplyAckData(request_id=resp.request_id).SerializeToString()

        async def write() -> None:
            if conn.info.phase in (Phase.READY, Phase.DRAINING, Phase.DISCONNECTING):
                record.acked = await self.send(conn, Kind.WORKER_REPLY_ACK, payload,
                                               request_id=resp.request_id)
                self.state.notify()

        await self.wire.reply_ack(conn, write)

    # -- forwarding (rpc.go Forward) -------------------------------------------

    async def forward(self, conn_id: str, request: pb.GatewayExecutorRequestData) -> bool:
        """Write the request and wait for WORKER_REQUEST_ACK; False on any failure."""
        conn = self.live.get(conn_id)
        if conn is None or conn.info.phase is not Phase.READY:
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        conn.pending[request.request_id] = fut  # registered before the write
        try:
            if not await self.send(conn, Kind.GATEWAY_EXECUTOR_REQUEST,
                                   request.SerializeToString(), request_id=request.request_id):
                return False
            try:
                async with asyncio.timeout(self.config.effective_ack_timeout):
                    return await fut
            except TimeoutError:
                return False
        finally:
            conn.pending.pop(request.request_id, None)

    # -- heartbeats, drain, disconnect -----------------------------------------

    async def _heartbeat_watchdog(self, conn: GatewayConnection) -> None:
        limit = self.config.heartbeat_miss_close
        while True:
            wait = conn.info.last_heartbeat + limit - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait + 0.01)
                continue
            self.state.record("out", "DROP", conn.info.conn_id,
                              detail="CONSECUTIVE_HEARTBEATS_MISSED")
            log.info("no heartbeat for %.0f s: dropping %s", limit, logfmt.who(conn.info))
            conn.info.close_class = "CONSECUTIVE_HEARTBEATS_MISSED"
            conn.ws.transport.abort()
            return

    async def drop_socket(self, conn_id: str) -> None:
        conn = self.live.get(conn_id)
        if conn is None:
            return
        self.state.record("out", "DROP", conn_id, detail="injected")
        log.info("dropping the socket (fault): %s", logfmt.who(conn.info))
        conn.ws.transport.abort()
        await self._wait_closed(conn)

    async def _wait_closed(self, conn: GatewayConnection) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await conn.closed.wait()

    async def gateway_closing(self, conn_id: str) -> None:
        """Real gateway drain for one connection (§5.4.2)."""
        conn = self.live.get(conn_id)
        if conn is None:
            return
        info = conn.info
        info.set_phase(Phase.DRAINING)
        info.gateway_closing_sent = True
        conn.fail_pending()
        self.state.notify()
        log.info("GATEWAY_CLOSING to %s (closing in %.0f s at most)", logfmt.who(info),
                 self.config.drain_window)
        await self.send(conn, Kind.GATEWAY_CLOSING)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.drain_window):
                await conn.closed.wait()
        if conn.closed.is_set():
            return
        if info.status is not ConnStatus.DISCONNECTING:
            info.status = ConnStatus.DRAINING
        self.state.notify()
        await self._close(conn.ws, 1001, GATEWAY_CLOSING, conn_id)
        await self._wait_closed(conn)

    async def drain_group(self, group: str) -> None:
        """Drain a whole gateway group: refuse upgrades, GATEWAY_CLOSING everywhere."""
        self.draining_groups.add(group)
        targets = [c.info.conn_id for c in self.live.values() if c.info.gateway_group == group]
        await asyncio.gather(*(self.gateway_closing(cid) for cid in targets))

    async def restart(self, down_for: float) -> None:
        """Restart like a crashed gateway: drop every socket (no close frame), refuse
        upgrades and /v0/connect/start for ``down_for`` seconds."""
        self.state.faults.gateway_down_until = time.monotonic() + down_for
        self.state.record("out", "GATEWAY_RESTART", detail=f"down for {down_for:.2f} s")
        conns = list(self.live.values())
        for conn in conns:
            conn.info.close_class = "GATEWAY_RESTART"
            conn.ws.transport.abort()
        for conn in conns:
            await self._wait_closed(conn)

    async def send_raw(self, conn_id: str, data: bytes | str) -> None:
        conn = self.live.get(conn_id)
        if conn is None:
            raise KeyError(conn_id)
        async with conn.send_lock:
            await conn.ws.send(data)
        self.state.record("out", "RAW", conn_id, detail=f"{len(data)} {type(data).__name__}")

    async def send_kind(self, conn_id: str, kind: int, payload: bytes = b"") -> bool:
        conn = self.live.get(conn_id)
        if conn is None:
            raise KeyError(conn_id)
        return await self.send(conn, kind, payload)

    async def _disconnected(self, conn: GatewayConnection) -> None:
        info = conn.info
        info.set_phase(Phase.DISCONNECTING)
        info.status = ConnStatus.DISCONNECTING
        conn.fail_pending()
        self.wire.end(conn.ws)
        for task in list(conn.tasks):
            task.cancel()
        ws = conn.ws
        closed_by_worker: bool | None = None
        rcvd, sent = ws.protocol.close_rcvd, ws.protocol.close_sent
        if ws.protocol.close_rcvd_then_sent is not None:
            closed_by_worker = ws.protocol.close_rcvd_then_sent
        elif rcvd is not None:
            closed_by_worker = True
        elif sent is not None:
            closed_by_worker = False
        if closed_by_worker and rcvd is not None:
            info.close_code, info.close_reason = rcvd.code, rcvd.reason
            if rcvd.code == 1000 and rcvd.reason == "WORKER_SHUTDOWN":
                info.close_class = "WORKER_SHUTDOWN"
            elif not rcvd.reason:
                info.close_class = "UNEXPECTED"
            else:
                info.close_class = rcvd.reason
        elif closed_by_worker is False and sent is not None:
            info.close_code, info.close_reason = sent.code, sent.reason
            info.close_class = f"GATEWAY:{sent.reason}"
        else:
            info.close_code, info.close_reason = 1006, ""
            if info.close_class is None:
                info.close_class = "UNEXPECTED"
        self.state.record("in", "CLOSED", info.conn_id,
                          detail=f"{info.close_code} {info.close_reason!r} {info.close_class}")
        self.live.pop(info.conn_id, None)
        info.status = ConnStatus.DISCONNECTED
        info.set_phase(Phase.CLOSED)
        info.closed_at = time.time()
        log.info("connection closed: %s, close %s %s", logfmt.who(info), info.close_code,
                 info.close_class)
        # A worker group disappears with its last connection (§5.5).
        remaining = {
            h for c in self.live.values() for h in c.info.group_hashes.values()
        }
        for h in info.group_hashes.values():
            if h not in remaining:
                self.state.groups.pop(h, None)
        conn.closed.set()
        self.state.notify()
