"""Bytes <-> events for the worker side of Connect; the only user of the protobuf classes
in the worker.

``decode`` raises :class:`RemoteProtocolError` for anything it cannot decode; callers
log it and drop that one frame. Encoders echo the identifying fields of the executor
request the way the gateway expects (§3.2 of the spec).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from google.protobuf.message import DecodeError

from ..errors import RemoteProtocolError
from . import pb
from .durations import parse_go_duration
from .events import (
    ConnectionReady,
    ExecutorRequest,
    GatewayClosing,
    GatewayEvent,
    GatewayHeartbeat,
    Hello,
    LeaseExtended,
    ReplyAck,
    SyncFailed,
    UnknownMessage,
)

# Plain ints, read once: protobuf's enum attribute lookup is slow on a hot path.
Kind = SimpleNamespace(**dict(pb.GatewayMessageType.items()))

# Defaults the gateway uses when a field is empty (consts.go); "0s" for status = off.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_EXTEND_LEASE_INTERVAL = 30.0


def _parse(message_type: Any, payload: bytes, what: str) -> Any:
    message = message_type()
    try:
        message.ParseFromString(payload)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise RemoteProtocolError(f"undecodable {what} payload ({len(payload)} bytes)") from exc
    return message


def _interval(text: str, default: float, name: str) -> float:
    if not text:
        return default
    try:
        seconds = parse_go_duration(text)
    except ValueError as exc:
        raise RemoteProtocolError(f"GATEWAY_CONNECTION_READY.{name}: {exc}") from exc
    if seconds < 0:
        raise RemoteProtocolError(f"GATEWAY_CONNECTION_READY.{name} is negative: {text!r}")
    return seconds


def _connection_ready(payload: bytes) -> ConnectionReady:
    data = _parse(pb.GatewayConnectionReadyData, payload, "GATEWAY_CONNECTION_READY")
    heartbeat = _interval(data.heartbeat_interval, DEFAULT_HEARTBEAT_INTERVAL, "heartbeat")
    extend = _interval(
        data.extend_lease_interval, DEFAULT_EXTEND_LEASE_INTERVAL, "extend_lease_interval"
    )
    status = _interval(data.status_interval, 0.0, "status_interval")
    # "0s" for heartbeats or extensions would mean a busy loop: use the gateway defaults.
    return ConnectionReady(
        heartbeat or DEFAULT_HEARTBEAT_INTERVAL, extend or DEFAULT_EXTEND_LEASE_INTERVAL, status
    )


def _sync_failed(payload: bytes) -> SyncFailed:
    error = _parse(pb.SystemError, payload, "SYNC_FAILED")
    return SyncFailed(code=error.code, message=error.message)


def _executor_request(payload: bytes) -> ExecutorRequest:
    req = _parse(pb.GatewayExecutorRequestData, payload, "GATEWAY_EXECUTOR_REQUEST")
    if not req.request_id:
        raise RemoteProtocolError("GATEWAY_EXECUTOR_REQUEST without request_id")
    return ExecutorRequest(
        request_id=req.request_id,
        account_id=req.account_id,
        env_id=req.env_id,
        app_id=req.app_id,
        app_name=req.app_name,
        function_id=req.function_id,
        function_slug=req.function_slug,
        step_id=req.step_id if req.HasField("step_id") else None,
        request_payload=req.request_payload,
        system_trace_ctx=req.system_trace_ctx,
        user_trace_ctx=req.user_trace_ctx,
        run_id=req.run_id,
        lease_id=req.lease_id,
        job_id=req.job_id,
    )


def _lease_extended(payload: bytes) -> LeaseExtended:
    ack = _parse(pb.WorkerRequestExtendLeaseAckData, payload, "EXTEND_LEASE_ACK")
    new_lease = ack.new_lease_id if ack.HasField("new_lease_id") else None
    return LeaseExtended(request_id=ack.request_id, new_lease_id=new_lease or None)


def _reply_ack(payload: bytes) -> ReplyAck:
    ack = _parse(pb.WorkerReplyAckData, payload, "WORKER_REPLY_ACK")
    return ReplyAck(request_id=ack.request_id)


_HELLO, _HEARTBEAT, _CLOSING = Hello(), GatewayHeartbeat(), GatewayClosing()
# kind -> payload decoder, for every gateway-to-worker kind; anything else is unknown.
_DECODERS: dict[int, Callable[[bytes], GatewayEvent]] = {
    Kind.GATEWAY_EXECUTOR_REQUEST: _executor_request,
    Kind.WORKER_REPLY_ACK: _reply_ack,
    Kind.WORKER_REQUEST_EXTEND_LEASE_ACK: _lease_extended,
    Kind.GATEWAY_HEARTBEAT: lambda _: _HEARTBEAT,
    Kind.GATEWAY_HELLO: lambda _: _HELLO,
    Kind.GATEWAY_CLOSING: lambda _: _CLOSING,
    Kind.GATEWAY_CONNECTION_READY: _connection_ready,
    Kind.SYNC_FAILED: _sync_failed,
}


def decode(frame: bytes) -> GatewayEvent:
    """Decode one binary WebSocket frame from the gateway."""
    envelope = _parse(pb.ConnectMessage, frame, "ConnectMessage")
    kind = envelope.kind
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return UnknownMessage(kind=kind)
    return decoder(envelope.payload)


_SMALL_VARINTS = [bytes((n,)) for n in range(128)]


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint (also used by ops/_otlp.py's hand-encoded spans)."""
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Outgoing frames are encoded by hand: the same bytes the protobuf classes produce
# (tests/protocol/test_codec.py compares them), without building a message per frame.
# ConnectMessage: kind = field 1 (varint), payload = field 2 (bytes).
_KIND_TAG, _PAYLOAD_TAG = b"\x08", b"\x12"
# WorkerRequestExtendLeaseData.lease_id: field 10, length-delimited.
_LEASE_ID_TAG = b"\x52"


def _check_wire_numbers() -> None:
    """The hand encoding above relies on these numbers: fail at import if they move."""
    envelope = pb.ConnectMessage.DESCRIPTOR.fields_by_name
    assert envelope["kind"].number == 1 and envelope["payload"].number == 2
    ack = pb.WorkerRequestAckData.DESCRIPTOR.fields_by_name
    extend = pb.WorkerRequestExtendLeaseData.DESCRIPTOR.fields_by_name
    assert extend["lease_id"].number == 10
    assert all(ack[name].number == extend[name].number for name in ack)
    assert max(ack[name].number for name in ack) < 10


_check_wire_numbers()


def _envelope(kind: int, payload: bytes = b"") -> bytes:
    head = _KIND_TAG + varint(kind) if kind else b""  # proto3 leaves out zero values
    if not payload:
        return head
    return b"".join((head, _PAYLOAD_TAG, varint(len(payload)), payload))


def encode_worker_connect(request: Any) -> bytes:
    """Wrap a filled ``pb.WorkerConnectRequestData``."""
    return _envelope(Kind.WORKER_CONNECT, request.SerializeToString())


def encode_ready() -> bytes:
    return _envelope(Kind.WORKER_READY)


def encode_pause() -> bytes:
    return _envelope(Kind.WORKER_PAUSE)


def encode_heartbeat() -> bytes:
    return _envelope(Kind.WORKER_HEARTBEAT)


def _echo(req: ExecutorRequest) -> dict[str, Any]:
    """The request fields an ACK and a lease extension carry back to the gateway."""
    fields: dict[str, Any] = {
        "request_id": req.request_id,
        "account_id": req.account_id,
        "env_id": req.env_id,
        "app_id": req.app_id,
        "function_slug": req.function_slug,
        "system_trace_ctx": req.system_trace_ctx,
        "user_trace_ctx": req.user_trace_ctx,
        "run_id": req.run_id,
    }
    if req.step_id is not None:
        fields["step_id"] = req.step_id
    return fields


def request_echo(req: ExecutorRequest) -> bytes:
    """The echoed request fields, serialized once per request: a WorkerRequestAckData
    payload, and the first part of every WorkerRequestExtendLeaseData (same field
    numbers, 1-9; lease_id is 10)."""
    return bytes(pb.WorkerRequestAckData(**_echo(req)).SerializeToString())


def encode_request_ack(req: ExecutorRequest, echo: bytes | None = None) -> bytes:
    return _envelope(Kind.WORKER_REQUEST_ACK, request_echo(req) if echo is None else echo)


def encode_extend_lease(req: ExecutorRequest, lease_id: str, echo: bytes | None = None) -> bytes:
    """``echo`` is ``request_echo(req)`` when the caller kept it (an extension per step
    every 30 s, thousands of steps: the echoed fields are encoded once)."""
    payload = request_echo(req) if echo is None else echo
    if lease_id:  # proto3 leaves out empty strings
        lease = lease_id.encode()
        payload = b"".join((payload, _LEASE_ID_TAG, varint(len(lease)), lease))
    return _envelope(Kind.WORKER_REQUEST_EXTEND_LEASE, payload)


def encode_reply(sdk_response: bytes) -> bytes:
    """Wrap a serialized ``SDKResponse`` (the same bytes the HTTP flush sends)."""
    return _envelope(Kind.WORKER_REPLY, sdk_response)


def encode_status(in_flight_request_ids: list[str], shutdown_requested: bool) -> bytes:
    data = pb.WorkerStatusData(
        in_flight_request_ids=in_flight_request_ids, shutdown_requested=shutdown_requested
    )
    return _envelope(Kind.WORKER_STATUS, data.SerializeToString())


def build_sdk_response(
    req: ExecutorRequest,
    *,
    status: Any,
    body: bytes,
    no_retry: bool,
    retry_after: str | None,
    sdk_version: str,
    request_version: int,
) -> bytes:
    """Serialize the reply for ``req``; the flush endpoint takes exactly these bytes."""
    response = pb.SDKResponse(
        request_id=req.request_id,
        account_id=req.account_id,
        env_id=req.env_id,
        app_id=req.app_id,
        status=status,
        body=body,
        no_retry=no_retry,
        sdk_version=sdk_version,
        request_version=request_version,
        # The flush endpoint rejects a reply whose system_trace_ctx is not a JSON object.
        system_trace_ctx=req.system_trace_ctx or b"{}",
        user_trace_ctx=req.user_trace_ctx or b"{}",
        run_id=req.run_id,
    )
    if retry_after is not None:
        response.retry_after = retry_after
    return bytes(response.SerializeToString())
