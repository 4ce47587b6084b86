"""Test helpers: a ``devserver`` pytest fixture and a hand-scripted raw worker.

Use in your own tests (``conftest.py``)::

    from connect_worker.devserver.testing import devserver  # noqa: F401  (the fixture)

    async def test_my_function(devserver):
        ...  # start your worker against devserver.api_url, then
        run_ids = await devserver.send_event("my/event", {"x": 1})
        run = await devserver.wait_for_run(run_ids[0])

``ScriptedWorker`` speaks the Connect protocol by hand (protobuf over a raw
``websockets`` client) so tests can exercise exact frames and misbehaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from ..protocol import constants, pb
from ..protocol.durations import parse_go_duration
from .config import DevServerConfig
from .server import DevServer

Kind = pb.GatewayMessageType
SUBPROTOCOL = Subprotocol(constants.SUBPROTOCOL)


def fast_config(**changes: Any) -> DevServerConfig:
    """The fixture's config: 1 s heartbeats/extensions, 4 s leases, quick retries."""
    return DevServerConfig.fast(**changes)


#: Races of the real gateway the fixture models by default (see ``realistic_races``).
REALISTIC_RACES: dict[str, Any] = {
    # A WORKER_REPLY is handled 50 ms after it is read, and lost if the socket closed
    # meanwhile (the real gateway hands it to another goroutine; a close cancels it).
    # Workers that close right after their last reply, without its ACK, lose it.
    "reply_close_race": 0.05,
}


def realistic_races(dev: DevServer) -> DevServer:
    """Turn on the races in ``REALISTIC_RACES`` (for a DevServer made by hand)."""
    for name, value in REALISTIC_RACES.items():
        setattr(dev.faults, name, value)
    return dev


def devserver_fixture(*, races: bool = True, **changes: Any) -> Any:
    """Make a pytest fixture yielding a running DevServer with ``fast_config(**changes)``
    and, unless ``races=False``, the realistic races on::

        slow_leases = devserver_fixture(lease_duration=10.0)   # in a conftest / test module
    """

    @pytest_asyncio.fixture
    async def _devserver() -> AsyncIterator[DevServer]:
        async with DevServer(fast_config(**changes)) as dev:
            yield realistic_races(dev) if races else dev

    return _devserver


#: A running DevServer with fast timings and the realistic races, closed after the test.
devserver = devserver_fixture()


def hash_step_id(step_id: str) -> str:
    """The SDKs' hashed step ID (SHA-1 hex of the user's step ID)."""
    return hashlib.sha1(step_id.encode()).hexdigest()


def function_config(app: str, fn_id: str, events: list[str], retries: int | None = None
                    ) -> dict[str, Any]:
    """A function config shaped like the Python SDK's (slug ``<app>-<fn_id>``)."""
    slug = f"{app}-{fn_id}"
    step: dict[str, Any] = {
        "id": "step",
        "name": "step",
        "runtime": {"type": "ws", "url": f"wss://connect?fnId={slug}&stepId=step"},
    }
    if retries is not None:
        step["retries"] = {"attempts": retries}
    return {"id": slug, "name": fn_id, "steps": {"step": step},
            "triggers": [{"event": e} for e in events]}


Replier = Callable[[pb.GatewayExecutorRequestData], pb.SDKResponse | None]


def step_script(steps: list[str], output: Any = "done") -> Replier:
    """A replier for a function that runs ``steps`` one by one, then returns ``output``.

    Each discovery call runs the first step not yet in the memo (StepRun with
    data ``"<step>-result"``); when all are memoized it returns DONE.
    """

    def reply(req: pb.GatewayExecutorRequestData) -> pb.SDKResponse:
        body = json.loads(req.request_payload)
        memo = body["steps"]
        for name in steps:
            sid = hash_step_id(name)
            if sid not in memo:
                op = {"op": "StepRun", "id": sid, "name": name, "displayName": name,
                      "opts": None, "data": f"{name}-result"}
                return make_reply(req, pb.SDKResponseStatus.NOT_COMPLETED, [op])
        return make_reply(req, pb.SDKResponseStatus.DONE, output)

    return reply


def make_reply(
    req: pb.GatewayExecutorRequestData, status: int, body: Any, **fields: Any
) -> pb.SDKResponse:
    return pb.SDKResponse(
        request_id=req.request_id,
        account_id=req.account_id,
        env_id=req.env_id,
        app_id=req.app_id,
        status=status,  # type: ignore[arg-type]
        body=json.dumps(body).encode(),
        sdk_version="scripted:v0",
        request_version=2,
        system_trace_ctx=req.system_trace_ctx,
        user_trace_ctx=req.user_trace_ctx,
        run_id=req.run_id,
        **fields,
    )


def scripted_worker(
    dev: DevServer,
    *,
    app: str = "test-app",
    fn_ids: tuple[str, ...] = ("fn",),
    events: tuple[str, ...] = ("test/evt",),
    retries: int | None = None,
    **kwargs: Any,
) -> ScriptedWorker:
    """A ScriptedWorker for ``dev`` serving ``<app>-<fn_id>`` functions triggered by ``events``."""
    functions = [function_config(app, f, list(events), retries) for f in fn_ids]
    return ScriptedWorker(dev.api_url, app=app, functions=functions, **kwargs)


@dataclass
class Received:
    kind: int
    payload: bytes
    consumed: bool = False

    def parse(self, message_type: type[Any]) -> Any:
        msg = message_type()
        msg.ParseFromString(self.payload)
        return msg


@dataclass
class ScriptedWorker:
    """A worker driven step by step from a test.

    ``replier``: if set, every GATEWAY_EXECUTOR_REQUEST is ACKed and answered
    with ``replier(request)`` (None = ACK but never reply) automatically.
    """

    api_url: str
    app: str = "test-app"
    functions: list[dict[str, Any]] = field(default_factory=list)
    instance_id: str = "scripted-1"
    manual_readiness: bool = False
    max_worker_concurrency: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    replier: Replier | None = None
    auto_ack: bool = True
    auto_heartbeat: bool = False
    ws: ClientConnection | None = None
    start: pb.StartResponse | None = None
    ready: pb.GatewayConnectionReadyData | None = None
    inbox: list[Received] = field(default_factory=list)
    requests: list[pb.GatewayExecutorRequestData] = field(default_factory=list)
    errors: list[Exception] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _cursor: int = 0

    async def __aenter__(self) -> ScriptedWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None and self.ws.protocol.close_rcvd is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.ws.close(1000, "WORKER_SHUTDOWN")
        await self.stop()

    # -- connection ----------------------------------------------------------

    async def start_session(self, exclude_gateways: list[str] | None = None) -> pb.StartResponse:
        async with httpx.AsyncClient() as http:
            res = await http.post(
                f"{self.api_url}{constants.START_PATH}",
                content=pb.StartRequest(
                    exclude_gateways=exclude_gateways or []
                ).SerializeToString(),
                headers={"content-type": "application/protobuf", **self.headers},
            )
        if res.status_code != 200:
            raise RuntimeError(f"start failed: {res.status_code}")
        start = pb.StartResponse()
        start.ParseFromString(res.content)
        self.start = start
        return start

    def connect_request(self, **overrides: Any) -> pb.WorkerConnectRequestData:
        assert self.start is not None
        fields: dict[str, Any] = {
            "connection_id": self.start.connection_id,
            "instance_id": self.instance_id,
            "auth_data": pb.AuthData(session_token=self.start.session_token,
                                     sync_token=self.start.sync_token),
            "capabilities": b'{"connect":"v1"}',
            "apps": [pb.AppConfiguration(app_name=self.app,
                                         functions=json.dumps(self.functions).encode())],
            "worker_manual_readiness_ack": self.manual_readiness,
            "framework": "connect",
            "sdk_language": "scripted",
            "sdk_version": "0.0.0",
        }
        if self.max_worker_concurrency is not None:
            fields["max_worker_concurrency"] = self.max_worker_concurrency
        fields.update(overrides)
        return pb.WorkerConnectRequestData(**fields)

    async def open(self, url: str | None = None, *, subprotocol: bool = True) -> ClientConnection:
        """Open the WebSocket (no handshake); start the background reader."""
        target = url or (self.start.gateway_endpoint if self.start else "")
        self.ws = await connect(
            target, subprotocols=[SUBPROTOCOL] if subprotocol else None,
            max_size=constants.MAX_FRAME_BYTES, ping_interval=None, close_timeout=2,
        )
        self._spawn(self._reader(self.ws))
        return self.ws

    async def connect(self, **overrides: Any) -> pb.GatewayConnectionReadyData:
        """start + WebSocket + HELLO + WORKER_CONNECT + CONNECTION_READY."""
        if self.start is None:
            await self.start_session()
        await self.open()
        await self.expect(Kind.GATEWAY_HELLO)
        await self.send(Kind.WORKER_CONNECT, self.connect_request(**overrides))
        frame = await self.expect(Kind.GATEWAY_CONNECTION_READY)
        ready: pb.GatewayConnectionReadyData = frame.parse(pb.GatewayConnectionReadyData)
        self.ready = ready
        if self.auto_heartbeat:
            self._spawn(self._heartbeats())
        return ready

    @property
    def conn_id(self) -> str:
        assert self.start is not None
        return self.start.connection_id

    async def close(self, code: int = 1000, reason: str = "WORKER_SHUTDOWN") -> None:
        if self.ws is not None:
            await self.ws.close(code, reason)
        await self.stop()

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame."""
        if self.ws is not None:
            self.ws.transport.abort()
        await self.stop()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def close_info(self) -> tuple[int | None, str | None]:
        """(code, reason) of the close frame the gateway sent, if any."""
        if self.ws is None or self.ws.protocol.close_rcvd is None:
            return None, None
        return self.ws.protocol.close_rcvd.code, self.ws.protocol.close_rcvd.reason

    async def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:  # noqa: ASYNC109
        assert self.ws is not None
        async with asyncio.timeout(timeout):
            await self.ws.wait_closed()
        return self.close_info()

    # -- frames --------------------------------------------------------------

    async def send(self, kind: int, message: Any = None) -> None:
        assert self.ws is not None
        payload = message.SerializeToString() if message is not None else b""
        await self.ws.send(pb.ConnectMessage(kind=kind, payload=payload).SerializeToString())  # type: ignore[arg-type]

    async def send_raw(self, data: bytes | str) -> None:
        assert self.ws is not None
        await self.ws.send(data)

    async def expect(
        self,
        kind: int,
        predicate: Callable[[Received], bool] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> Received:
        """The next not-yet-consumed frame of ``kind`` (others stay in the inbox)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for i in range(len(self.inbox)):
                item = self.inbox[i]
                if not item.consumed and item.kind == kind and (
                    predicate is None or predicate(item)
                ):
                    item.consumed = True
                    return item
            remaining = deadline - loop.time()
            if remaining <= 0 or (self.ws is not None and self.ws.protocol.close_rcvd is not None
                                  and not self._reader_alive()):
                names = [Kind.Name(r.kind) for r in self.inbox]
                raise TimeoutError(
                    f"no {Kind.Name(kind)} (inbox: {names}, close: {self.close_info()})"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    def received(self, kind: int) -> list[Received]:
        return [r for r in self.inbox if r.kind == kind]

    def _reader_alive(self) -> bool:
        return any(t.get_name() == "reader" and not t.done() for t in self._tasks)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Any, name: str | None = None) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        if name:
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reader(self, ws: ClientConnection) -> None:
        task = asyncio.current_task()
        if task is not None:
            task.set_name("reader")
        try:
            async for frame in ws:
                if not isinstance(frame, bytes):
                    continue
                msg = pb.ConnectMessage()
                msg.ParseFromString(frame)
                item = Received(msg.kind, msg.payload)
                self.inbox.append(item)
                if msg.kind == Kind.GATEWAY_EXECUTOR_REQUEST:
                    req = item.parse(pb.GatewayExecutorRequestData)
                    self.requests.append(req)
                    if self.auto_ack:
                        await self.ack(req)
                    if self.replier is not None:
                        try:
                            reply = self.replier(req)
                        except Exception as exc:  # a broken test replier: record, keep reading
                            self.errors.append(exc)
                            reply = None
                        if reply is not None:
                            await self.send(Kind.WORKER_REPLY, reply)
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self._notify()

    async def _heartbeats(self) -> None:
        interval = 1.0
        if self.ready is not None:
            interval = parse_go_duration(self.ready.heartbeat_interval or "10s")
        while True:
            with contextlib.suppress(ConnectionClosed):
                await self.send(Kind.WORKER_HEARTBEAT)
            await asyncio.sleep(interval)

    # -- worker actions ------------------------------------------------------

    async def ack(self, req: pb.GatewayExecutorRequestData) -> None:
        await self.send(Kind.WORKER_REQUEST_ACK, pb.WorkerRequestAckData(
            request_id=req.request_id, account_id=req.account_id, env_id=req.env_id,
            app_id=req.app_id, function_slug=req.function_slug, step_id=req.step_id,
            system_trace_ctx=req.system_trace_ctx, user_trace_ctx=req.user_trace_ctx,
            run_id=req.run_id,
        ))

    async def extend(self, req: pb.GatewayExecutorRequestData, lease_id: str | None = None
                     ) -> pb.WorkerRequestExtendLeaseAckData:
        """Send an extension and wait for its ACK (new_lease_id empty = NACK)."""
        await self.send(Kind.WORKER_REQUEST_EXTEND_LEASE, pb.WorkerRequestExtendLeaseData(
            request_id=req.request_id, account_id=req.account_id, env_id=req.env_id,
            app_id=req.app_id, function_slug=req.function_slug,
            lease_id=lease_id if lease_id is not None else req.lease_id,
            system_trace_ctx=req.system_trace_ctx, user_trace_ctx=req.user_trace_ctx,
            run_id=req.run_id,
        ))
        ack = await self.expect(
            Kind.WORKER_REQUEST_EXTEND_LEASE_ACK,
            lambda r: r.parse(pb.WorkerRequestExtendLeaseAckData).request_id == req.request_id,
        )
        result: pb.WorkerRequestExtendLeaseAckData = ack.parse(pb.WorkerRequestExtendLeaseAckData)
        return result

    async def reply(self, response: pb.SDKResponse, *, wait_ack: bool = True) -> None:
        await self.send(Kind.WORKER_REPLY, response)
        if wait_ack:
            await self.expect(
                Kind.WORKER_REPLY_ACK,
                lambda r: r.parse(pb.WorkerReplyAckData).request_id == response.request_id,
            )

    async def next_request(self, timeout: float = 5.0) -> pb.GatewayExecutorRequestData:  # noqa: ASYNC109
        item = await self.expect(Kind.GATEWAY_EXECUTOR_REQUEST, timeout=timeout)
        result: pb.GatewayExecutorRequestData = item.parse(pb.GatewayExecutorRequestData)
        return result
