"""The Connect handshake as the real gateway does it (spec §5.4): WORKER_CONNECT checked
with its exact close codes, the apps' function configs parsed, the worker group hash
(§5.5), and the timings GATEWAY_CONNECTION_READY announces.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from websockets.asyncio.server import ServerConnection

from ..protocol import pb
from ..protocol.durations import format_go_duration
from .config import DevServerConfig
from .core import ACCOUNT_ID, Core, Session
from .ulid import is_ulid
from .wire import Kind, kind_name
from .wire import parse as _parse

# Close reasons (syscodes) the real gateway uses, spec §5.4.3.
HELLO_TIMEOUT = "connect_worker_hello_timeout"
HELLO_INVALID_MSG = "connect_worker_hello_invalid_msg"
HELLO_INVALID_PAYLOAD = "connect_worker_hello_invalid_payload"
AUTH_FAILED = "connect_authentication_failed"
TOO_MANY_APPS = "connect_too_many_apps_per_connection"
INTERNAL = "connect_internal_error"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def worker_group_hash(
    env: str, req: pb.WorkerConnectRequestData, app: pb.AppConfiguration, functions: Any
) -> str:
    """account:env:language:version:platform:sha256(functions):app_version (§5.5)."""
    platform = req.platform if req.HasField("platform") and req.platform else "-"
    fn_hash = hashlib.sha256(_canonical(functions)).hexdigest()
    parts = [
        ACCOUNT_ID,
        env,
        req.sdk_language,
        req.sdk_version,
        platform,
        fn_hash,
        app.app_version if app.HasField("app_version") else "",
    ]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


class HandshakeError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def intervals(config: DevServerConfig) -> pb.GatewayConnectionReadyData:
    """GATEWAY_CONNECTION_READY's timings, as the real gateway formats them."""
    def fmt(seconds: float) -> str:
        if config.interval_format == "seconds":
            return f"{max(1, round(seconds))}s"
        return format_go_duration(seconds)

    return pb.GatewayConnectionReadyData(
        heartbeat_interval=fmt(config.heartbeat_interval),
        extend_lease_interval=fmt(config.extend_lease_interval),
        status_interval=fmt(config.status_interval) if config.status_interval
        else "0s",
    )

async def handshake(ws: ServerConnection,
                    core: Core) -> tuple[pb.WorkerConnectRequestData, Session]:
    """Read and check WORKER_CONNECT; HandshakeError with the real close code and reason."""
    try:
        async with asyncio.timeout(core.config.hello_timeout):
            frame = await ws.recv()
    except TimeoutError:
        raise HandshakeError(1008, HELLO_TIMEOUT) from None
    if not isinstance(frame, bytes):
        raise HandshakeError(1008, HELLO_INVALID_MSG)
    msg = pb.ConnectMessage()
    if not _parse(msg, frame):
        raise HandshakeError(1008, HELLO_INVALID_MSG)
    if msg.kind != Kind.WORKER_CONNECT:
        core.state.record("in", kind_name(msg.kind))
        raise HandshakeError(1008, HELLO_INVALID_MSG)
    req = pb.WorkerConnectRequestData()
    parsed = _parse(req, msg.payload)
    core.state.record("in", "WORKER_CONNECT", req.connection_id if parsed else None)
    if not parsed:
        raise HandshakeError(1008, HELLO_INVALID_PAYLOAD)
    if not is_ulid(req.connection_id) or not req.instance_id:
        raise HandshakeError(1008, HELLO_INVALID_PAYLOAD)
    session = core.verify_session(req.auth_data.session_token)
    if session is None:
        raise HandshakeError(1008, AUTH_FAILED)
    if len(req.apps) == 0:
        raise HandshakeError(1008, HELLO_INVALID_PAYLOAD)
    if len(req.apps) > core.config.max_apps_per_connection:
        raise HandshakeError(1008, TOO_MANY_APPS)
    return req, session

def parse_apps(
    req: pb.WorkerConnectRequestData, env: str
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    try:
        # The real sync unmarshals the capabilities unconditionally: empty fails too.
        json.loads(req.capabilities)
        configs: dict[str, list[dict[str, Any]]] = {}
        hashes: dict[str, str] = {}
        for app in req.apps:
            functions = json.loads(app.functions or b"[]")
            if not isinstance(functions, list) or not all(
                isinstance(f, dict) and isinstance(f.get("id"), str) for f in functions
            ):
                raise ValueError("functions must be a list of objects with an 'id'")
            configs[app.app_name] = functions
            hashes[app.app_name] = worker_group_hash(env, req, app, functions)
    except ValueError as exc:
        raise HandshakeError(1011, INTERNAL) from exc
    return configs, hashes
