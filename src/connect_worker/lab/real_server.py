"""A running Inngest dev server seen the way the lab tools see our dev gateway.

``simulate-deploy``, ``soak`` and ``bench`` drive ``connect_worker.devserver.DevServer``:
they send events, wait on run statuses, and read what crossed the gateway (dispatches,
ACKs, replies, connections). ``RealServer`` answers the same members for an ``inngest
dev`` the user started (``--server URL``): events and runs through the server's own HTTP
API (``lab/inngest_dev.py``), and what crossed the gateway from a recording ``WsProxy``
that every worker connects through (``INNGEST_CONNECT_GATEWAY_URL``, see
:attr:`RealServer.worker_env`). Replies delivered through ``/v0/connect/flush`` bypass
the proxy; a tool tells the facade about its workers (:meth:`watch`) and their
``reply.flushed`` log lines count instead.

Only the faults the real server allows exist here: deploys and crashes (signals to the
workers), socket drops and stalls (the proxy). A fault of our dev gateway (GATEWAY_CLOSING,
withheld ACKs, a gateway restart, a flush outage, latency, slow ACKs) is refused up front
by the tool (:data:`REAL_SERVER_FAULTS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx

from ..devserver.state import ConnStatus, RunStatus
from ..protocol import pb
from .inngest_dev import EVENT_KEY, InngestDevServer
from .wsproxy import WsProxy

if TYPE_CHECKING:
    from .fleet import WorkerProcess

# The faults a tool may use against Inngest's server, and what each one does.
REAL_SERVER_FAULTS: dict[str, str] = {
    "deploy": "rolling deploy: replacement READY, then SIGTERM for the old process",
    "crash": "SIGKILL of a replica, then a restart",
    "drop": "the proxy cuts a replica's socket without a close frame",
    "stall": "the proxy holds every worker's frames for a while, then lets them through",
}
_STATUSES = {"Completed": RunStatus.COMPLETED, "Failed": RunStatus.FAILED,
             "Cancelled": RunStatus.CANCELLED}
# How often run statuses are read while anything waits on them.
POLL_SECONDS = 0.25
POLL_BATCH = 20  # reads at once


def refused_faults(kinds: list[str] | tuple[str, ...]) -> str | None:
    """The one-line error for faults Inngest's server cannot be made to do, or None."""
    refused = [k for k in kinds if k not in REAL_SERVER_FAULTS]
    if not refused:
        return None
    return (f"--server: Inngest's server cannot be made to do {', '.join(refused)} (only our "
            f"dev gateway can); faults it allows: {', '.join(REAL_SERVER_FAULTS)}")


@dataclass
class RunView:
    run_id: str
    status: RunStatus = RunStatus.RUNNING


@dataclass
class ConnView:
    """A worker connection as the proxy saw it (``conn_id`` is the proxy's number)."""

    conn_id: str
    instance_id: str
    status: ConnStatus = ConnStatus.CONNECTED
    paused: bool = False
    closed: bool = False
    manual: bool = True  # worker_manual_readiness_ack: routable after WORKER_READY only


@dataclass
class DispatchView:
    request_id: str
    job_id: str
    run_id: str
    conn_id: str
    sent_at: float  # wall clock
    acked_at: float | None = None
    replied_at: float | None = None


@dataclass
class ReplyView:
    request_id: str
    conn_id: str | None
    ts: float
    pid: int | None = None  # a flush: the worker process that logged it


@dataclass
class RealServer:
    """``async with RealServer(url) as server:``; ``url`` is the dev server's API origin."""

    url: str
    # A dev server started with --event-key wants it; one without takes any key.
    event_key: str = field(default_factory=lambda: os.environ.get("INNGEST_EVENT_KEY")
                           or EVENT_KEY)
    runs: dict[str, RunView] = field(default_factory=dict)
    proxy: WsProxy | None = None
    timeline: list[Any] = field(default_factory=list)  # nothing like it is observable
    _api: InngestDevServer | None = None
    _workers: list[WorkerProcess] = field(default_factory=list)
    _poller: asyncio.Task[None] | None = None
    # The views of the proxy's recording, folded in as frames arrive (_ingest).
    _seen: int = 0
    _conns: dict[int, ConnView] = field(default_factory=dict)
    _dispatches: dict[tuple[int, str], DispatchView] = field(default_factory=dict)
    _sent: dict[tuple[int, str], float] = field(default_factory=dict)
    _replies: list[ReplyView] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return self.url.rstrip("/")

    @property
    def worker_env(self) -> dict[str, str]:
        """What a worker needs to connect through the proxy."""
        assert self.proxy is not None
        return {"INNGEST_CONNECT_GATEWAY_URL": self.proxy.url}

    async def __aenter__(self) -> RealServer:
        api = self._api = InngestDevServer.running_at(self.api_url)
        try:
            start = await api.client.post("/v0/connect/start", content=b"")
            start.raise_for_status()
        except httpx.HTTPError as exc:
            await api.stop()
            raise RuntimeError(f"no Inngest dev server answers at {self.api_url}: "
                               f"{exc}") from None
        answer = pb.StartResponse()
        answer.ParseFromString(start.content)
        self.proxy = await WsProxy(answer.gateway_endpoint, name="real-server").__aenter__()
        self._poller = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self.proxy is not None:
            await self.proxy.__aexit__(None, None, None)
        if self._api is not None:
            await self._api.stop()

    def watch(self, worker: WorkerProcess) -> None:
        """Count ``worker``'s flushed replies as delivered."""
        self._workers.append(worker)

    # ----- events and runs ------------------------------------------------------------

    async def send_event(self, name: str, data: dict[str, Any] | None = None) -> list[str]:
        assert self._api is not None
        response = await self._api.client.post(f"/e/{self.event_key}",
                                               json=[{"name": name, "data": data or {}}])
        response.raise_for_status()
        (event_id,) = [str(i) for i in response.json().get("ids", [])]
        run_id = await self._api.wait_for_event_run(event_id, timeout=60)
        self.runs[run_id] = RunView(run_id)
        return [run_id]

    async def _poll(self) -> None:
        """Read the status of every run still going, a few at a time."""
        assert self._api is not None
        api = self._api

        async def read(view: RunView) -> None:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                status = _STATUSES.get((await api.run(view.run_id)).status)
                if status is not None:
                    view.status = status

        while True:
            going = [r for r in self.runs.values() if not r.status.terminal]
            for first in range(0, len(going), POLL_BATCH):
                await asyncio.gather(*(read(v) for v in going[first:first + POLL_BATCH]))
            await asyncio.sleep(POLL_SECONDS)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until ``predicate()`` holds. Checked every 0.1 s: the state is a remote server's
        (polled) and the proxy's recording; there is no event to wait on."""
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.1)

    async def wait_for_run(self, run_id: str, timeout: float = 30.0) -> RunView:  # noqa: ASYNC109
        view = self.runs.setdefault(run_id, RunView(run_id))
        await self.wait_for(lambda: view.status.terminal, timeout)
        return view

    # ----- what crossed the gateway (the proxy's recording) ----------------------------

    def _ingest(self) -> None:
        """Fold the frames recorded since the last call into the views below."""
        assert self.proxy is not None
        frames = self.proxy.frames
        for frame in frames[self._seen:]:
            conn, rid = frame.conn, frame.request_id
            if frame.kind == "WORKER_CONNECT":
                self._conns[conn] = ConnView(
                    str(conn), str(frame.fields.get("instance_id", "")),
                    manual=bool(frame.fields.get("worker_manual_readiness_ack")))
            elif frame.kind == "GATEWAY_EXECUTOR_REQUEST" and rid:
                self._dispatches[(conn, rid)] = DispatchView(
                    rid, str(frame.fields.get("job_id", "")), str(frame.fields.get("run_id", "")),
                    str(conn), frame.wall)
            elif frame.kind == "WORKER_REQUEST_ACK" and rid:
                dispatch = self._dispatches.get((conn, rid))
                if dispatch is not None and dispatch.acked_at is None:
                    dispatch.acked_at = frame.wall
            elif frame.kind == "WORKER_REPLY" and rid:
                self._sent.setdefault((conn, rid), frame.wall)
            elif frame.kind == "WORKER_REPLY_ACK" and rid and (conn, rid) in self._sent:
                self._replies.append(ReplyView(rid, str(conn), self._sent.pop((conn, rid))))
            view = self._conns.get(conn)
            if view is None:
                continue
            # Without manual readiness (the official client) CONNECTION_READY is enough.
            if not view.paused and (frame.kind == "WORKER_READY" or (
                    frame.kind == "GATEWAY_CONNECTION_READY" and not view.manual)):
                view.status = ConnStatus.READY
            elif frame.kind == "WORKER_PAUSE":
                view.paused, view.status = True, ConnStatus.DRAINING
            elif frame.kind in ("CLOSE", "DROP"):
                view.closed, view.status = True, ConnStatus.DISCONNECTED
        self._seen = len(frames)

    @property
    def connections(self) -> list[ConnView]:
        self._ingest()
        return list(self._conns.values())

    @property
    def live_connections(self) -> list[ConnView]:
        return [c for c in self.connections if not c.closed]

    async def wait_for_connection(self, predicate: Callable[[ConnView], bool] | None = None,
                                  timeout: float = 10.0) -> ConnView:  # noqa: ASYNC109
        def find() -> ConnView | None:
            return next((c for c in self.live_connections if c.status is ConnStatus.READY
                         and (predicate is None or predicate(c))), None)

        await self.wait_for(lambda: find() is not None, timeout)
        found = find()
        assert found is not None
        return found

    @property
    def dispatches(self) -> list[DispatchView]:
        self._ingest()
        delivered = {r.request_id: r.ts for r in [*self._replies, *self.flushes]}
        for dispatch in self._dispatches.values():
            dispatch.replied_at = delivered.get(dispatch.request_id)
        return list(self._dispatches.values())

    @property
    def replies(self) -> list[ReplyView]:
        """Replies the gateway acknowledged on a socket (WORKER_REPLY_ACK seen)."""
        self._ingest()
        return list(self._replies)

    @property
    def flushes(self) -> list[ReplyView]:
        """Replies the workers delivered through ``/v0/connect/flush`` (their logs)."""
        return [ReplyView(str(e.get("request_id")), None, _when(e.get("ts")), w.pid)
                for w in self._workers for e in w.events("reply.flushed")]

    # ----- faults ----------------------------------------------------------------------

    async def drop_socket(self, conn_id: str) -> None:
        assert self.proxy is not None
        self.proxy.drop(int(conn_id))

    def stall(self, seconds: float) -> None:
        """Hold every worker's frames for ``seconds`` (the gateway hears nothing)."""
        assert self.proxy is not None
        self.proxy.stall(seconds, direction="worker")


def _when(stamp: Any) -> float:
    """A log record's ``ts`` (ISO 8601) as epoch seconds; now if it has none."""
    if isinstance(stamp, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return time.time()
