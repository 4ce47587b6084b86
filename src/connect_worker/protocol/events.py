"""Typed events decoded from gateway frames.

Each gateway-to-worker message kind becomes one frozen dataclass; the session
dispatches on the class. ``UnknownMessage`` carries kinds this build does not
know, so a newer gateway can add kinds without breaking us (the official
client drops the connection on them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Hello:
    """GATEWAY_HELLO: the gateway accepted the socket; send WORKER_CONNECT now."""


@dataclass(frozen=True, slots=True)
class ConnectionReady:
    """GATEWAY_CONNECTION_READY with its intervals parsed to seconds."""

    heartbeat_interval: float
    extend_lease_interval: float
    status_interval: float


@dataclass(frozen=True, slots=True)
class SyncFailed:
    """SYNC_FAILED: the gateway could not register our apps; it closes the socket next."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ExecutorRequest:
    """GATEWAY_EXECUTOR_REQUEST: one step (or discovery call) to run."""

    request_id: str
    account_id: str
    env_id: str
    app_id: str
    app_name: str
    function_id: str
    function_slug: str
    step_id: str | None
    request_payload: bytes
    system_trace_ctx: bytes
    user_trace_ctx: bytes
    run_id: str
    lease_id: str
    job_id: str


@dataclass(frozen=True, slots=True)
class LeaseExtended:
    """WORKER_REQUEST_EXTEND_LEASE_ACK; ``new_lease_id`` None means NACK (lease lost)."""

    request_id: str
    new_lease_id: str | None


@dataclass(frozen=True, slots=True)
class ReplyAck:
    """WORKER_REPLY_ACK: the gateway persisted our reply for ``request_id``."""

    request_id: str


@dataclass(frozen=True, slots=True)
class GatewayHeartbeat:
    """GATEWAY_HEARTBEAT: the gateway answered one of our heartbeats."""


@dataclass(frozen=True, slots=True)
class GatewayClosing:
    """GATEWAY_CLOSING: the gateway is draining; move to a new connection."""


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A message kind this build does not know, or one only a worker may send."""

    kind: int


GatewayEvent = (
    Hello
    | ConnectionReady
    | SyncFailed
    | ExecutorRequest
    | LeaseExtended
    | ReplyAck
    | GatewayHeartbeat
    | GatewayClosing
    | UnknownMessage
)
