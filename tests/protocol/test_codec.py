"""codec: gateway frames -> typed events, worker calls -> frames, garbage -> RemoteProtocolError.

Gateway frames are built with the protobuf classes (``gateway_peer``) and worker frames
are read back with them, so every assertion here is about bytes on the wire.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from connect_worker.errors import RemoteProtocolError
from connect_worker.protocol import codec, pb
from connect_worker.protocol.events import (
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

from . import gateway_peer as peer
from .gateway_peer import Kind

FAST = settings(max_examples=150, deadline=None)
FUZZ = settings(max_examples=400, deadline=None)


def decode_or_protocol_error(data: bytes) -> GatewayEvent | None:
    """The codec's whole contract for hostile input: an event, or RemoteProtocolError."""
    try:
        return codec.decode(data)
    except RemoteProtocolError:
        return None


# --- gateway -> worker: every kind round-trips -----------------------------------------------


@FAST
@given(fields=peer.executor_request_fields())
def test_executor_request_round_trip(fields: dict[str, Any]) -> None:
    data = peer.executor_request_data(**fields)
    event = codec.decode(peer.frame(Kind.GATEWAY_EXECUTOR_REQUEST, data.SerializeToString()))
    assert event == ExecutorRequest(**fields)
    assert isinstance(event, ExecutorRequest)
    assert type(event.request_payload) is bytes
    assert type(event.system_trace_ctx) is bytes
    assert type(event.user_trace_ctx) is bytes


def test_executor_request_step_id_presence_is_kept() -> None:
    unset = codec.decode(peer.executor_request(step_id=None))
    empty = codec.decode(peer.executor_request(step_id=""))
    assert isinstance(unset, ExecutorRequest)
    assert isinstance(empty, ExecutorRequest)
    assert unset.step_id is None
    assert empty.step_id == ""


def test_executor_request_without_request_id_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError):
        codec.decode(peer.executor_request(request_id=""))


@FAST
@given(
    heartbeat=peer.go_durations(),
    extend=peer.go_durations(),
    status=peer.go_durations(),
)
def test_connection_ready_round_trip(
    heartbeat: tuple[str, float], extend: tuple[str, float], status: tuple[str, float]
) -> None:
    event = codec.decode(peer.connection_ready(heartbeat[0], extend[0], status[0]))
    assert isinstance(event, ConnectionReady)
    # A zero heartbeat or lease interval falls back to the gateway's defaults (10 s / 30 s).
    want_heartbeat = heartbeat[1] or codec.DEFAULT_HEARTBEAT_INTERVAL
    want_extend = extend[1] or codec.DEFAULT_EXTEND_LEASE_INTERVAL
    assert math.isclose(event.heartbeat_interval, want_heartbeat, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(event.extend_lease_interval, want_extend, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(event.status_interval, status[1], rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("heartbeat", "extend", "status", "want"),
    [
        ("10s", "30s", "0s", (10.0, 30.0, 0.0)),  # today's gateway defaults
        ("1m0s", "500ms", "2s", (60.0, 0.5, 2.0)),  # the forms the Python SDK cannot parse
        ("", "", "", (10.0, 30.0, 0.0)),  # an older gateway: fields absent
        ("0s", "0", "0s", (10.0, 30.0, 0.0)),
        ("1h2m3.5s", "1.5h", "300us", (3723.5, 5400.0, 0.0003)),
    ],
)
def test_connection_ready_examples(
    heartbeat: str, extend: str, status: str, want: tuple[float, float, float]
) -> None:
    event = codec.decode(peer.connection_ready(heartbeat, extend, status))
    assert isinstance(event, ConnectionReady)
    got = (event.heartbeat_interval, event.extend_lease_interval, event.status_interval)
    assert got == pytest.approx(want)


@pytest.mark.parametrize("field", ["heartbeat", "extend", "status"])
@pytest.mark.parametrize("value", ["-1s", "10", "ten seconds", "1x", " 1s"])
def test_connection_ready_bad_interval_is_a_remote_error(field: str, value: str) -> None:
    kwargs = {field: value}
    with pytest.raises(RemoteProtocolError):
        codec.decode(peer.connection_ready(**kwargs))


@pytest.mark.parametrize("field", ["heartbeat", "extend", "status"])
def test_connection_ready_overflowing_interval_is_a_remote_error(field: str) -> None:
    # Go's ParseDuration rejects anything above ~2562047h (int64 nanoseconds); ours must not
    # hand the session an infinite interval (float("1" + "0" * 400) is inf).
    kwargs = {field: "1" + "0" * 400 + "s"}
    with pytest.raises(RemoteProtocolError):
        codec.decode(peer.connection_ready(**kwargs))


@FAST
@given(code=peer.text, message=peer.text, data=st.none() | peer.blobs)
def test_sync_failed_round_trip(code: str, message: str, data: bytes | None) -> None:
    error = pb.SystemError(code=code, message=message)
    if data is not None:
        error.data = data
    event = codec.decode(peer.frame(Kind.SYNC_FAILED, error.SerializeToString()))
    assert event == SyncFailed(code=code, message=message)


@FAST
@given(request_id=peer.text, new_lease_id=st.none() | peer.text, echo=peer.text)
def test_lease_ack_round_trip(request_id: str, new_lease_id: str | None, echo: str) -> None:
    ack = pb.WorkerRequestExtendLeaseAckData(
        request_id=request_id, account_id=echo, env_id=echo, app_id=echo, function_slug=echo
    )
    if new_lease_id is not None:
        ack.new_lease_id = new_lease_id
    event = codec.decode(peer.frame(Kind.WORKER_REQUEST_EXTEND_LEASE_ACK, ack.SerializeToString()))
    # An absent (or empty) new_lease_id is the gateway's NACK: the lease is lost.
    assert event == LeaseExtended(request_id=request_id, new_lease_id=new_lease_id or None)


def test_lease_nack() -> None:
    assert codec.decode(peer.lease_ack("r1", None)) == LeaseExtended("r1", None)
    assert codec.decode(peer.lease_ack("r1", "")) == LeaseExtended("r1", None)
    assert codec.decode(peer.lease_ack("r1", "L9")) == LeaseExtended("r1", "L9")


@FAST
@given(request_id=peer.text)
def test_reply_ack_round_trip(request_id: str) -> None:
    assert codec.decode(peer.reply_ack(request_id)) == ReplyAck(request_id=request_id)


@FAST
@given(
    case=st.sampled_from(
        [
            (Kind.GATEWAY_HELLO, Hello()),
            (Kind.GATEWAY_HEARTBEAT, GatewayHeartbeat()),
            (Kind.GATEWAY_CLOSING, GatewayClosing()),
        ]
    ),
    payload=peer.blobs,
)
def test_payloadless_kinds_ignore_any_payload(
    case: tuple[int, GatewayEvent], payload: bytes
) -> None:
    kind, want = case
    assert codec.decode(peer.frame(kind, payload)) == want


def test_empty_frame_is_hello() -> None:
    # A ConnectMessage with kind 0 and no payload serializes to zero bytes.
    assert peer.hello() == b""
    assert codec.decode(b"") == Hello()


@pytest.mark.parametrize("kind", [*peer.WORKER_TO_GATEWAY, 16, 99, 1000, 2**31 - 1, -1])
def test_unknown_and_worker_only_kinds_are_unknown_messages(kind: int) -> None:
    assert codec.decode(peer.frame(kind, b"\x0a\x03abc")) == UnknownMessage(kind=int(kind))


def test_worker_frames_decode_as_unknown() -> None:
    # What we send, echoed back at us, is never mistaken for a gateway message.
    req = peer.request_event()
    for data in (
        codec.encode_worker_connect(peer.worker_connect_request()),
        codec.encode_ready(),
        codec.encode_pause(),
        codec.encode_heartbeat(),
        codec.encode_request_ack(req),
        codec.encode_extend_lease(req, "L2"),
        codec.encode_reply(b"\x0a\x01x"),
        codec.encode_status(["a"], shutdown_requested=True),
    ):
        assert isinstance(codec.decode(data), UnknownMessage)


def test_every_gateway_kind_is_decoded_to_a_typed_event() -> None:
    frames = {
        Kind.GATEWAY_HELLO: peer.hello(),
        Kind.SYNC_FAILED: peer.sync_failed(),
        Kind.GATEWAY_CONNECTION_READY: peer.connection_ready(),
        Kind.GATEWAY_EXECUTOR_REQUEST: peer.executor_request(),
        Kind.WORKER_REQUEST_EXTEND_LEASE_ACK: peer.lease_ack(),
        Kind.WORKER_REPLY_ACK: peer.reply_ack(),
        Kind.GATEWAY_HEARTBEAT: peer.gateway_heartbeat(),
        Kind.GATEWAY_CLOSING: peer.gateway_closing(),
    }
    assert set(frames) == set(peer.GATEWAY_TO_WORKER)
    # Every kind of the schema is classified as one direction or the other.
    assert set(peer.GATEWAY_TO_WORKER) | set(peer.WORKER_TO_GATEWAY) == set(
        pb.GatewayMessageType.values()
    )
    for kind, data in frames.items():
        assert not isinstance(codec.decode(data), UnknownMessage), Kind.Name(kind)


# --- worker -> gateway: encoders echo the request ---------------------------------------------


def _echo_fields(req: ExecutorRequest) -> dict[str, Any]:
    return {
        "request_id": req.request_id,
        "account_id": req.account_id,
        "env_id": req.env_id,
        "app_id": req.app_id,
        "function_slug": req.function_slug,
        "system_trace_ctx": req.system_trace_ctx,
        "user_trace_ctx": req.user_trace_ctx,
        "run_id": req.run_id,
    }


def _fields_of(message: Any, names: Any) -> dict[str, Any]:
    return {name: getattr(message, name) for name in names}


@FAST
@given(req=peer.executor_requests())
def test_encode_request_ack(req: ExecutorRequest) -> None:
    kind, payload = peer.read_worker_frame(codec.encode_request_ack(req))
    assert kind == Kind.WORKER_REQUEST_ACK
    ack = pb.WorkerRequestAckData.FromString(payload)
    want = _echo_fields(req)
    assert _fields_of(ack, want) == want
    assert ack.HasField("step_id") == (req.step_id is not None)
    if req.step_id is not None:
        assert ack.step_id == req.step_id


@FAST
@given(req=peer.executor_requests(), lease_id=peer.text)
def test_encode_extend_lease(req: ExecutorRequest, lease_id: str) -> None:
    kind, payload = peer.read_worker_frame(codec.encode_extend_lease(req, lease_id))
    assert kind == Kind.WORKER_REQUEST_EXTEND_LEASE
    data = pb.WorkerRequestExtendLeaseData.FromString(payload)
    want = {**_echo_fields(req), "lease_id": lease_id}
    assert _fields_of(data, want) == want
    assert data.HasField("step_id") == (req.step_id is not None)
    if req.step_id is not None:
        assert data.step_id == req.step_id


@FAST
@given(req=peer.executor_requests(), lease_id=peer.text)
def test_hand_encoded_frames_match_the_protobuf_classes(req: ExecutorRequest,
                                                        lease_id: str) -> None:
    """The codec encodes outgoing frames without protobuf messages; the bytes are equal."""
    echo = codec.request_echo(req)
    ack = pb.WorkerRequestAckData(**_echo_fields(req), step_id=req.step_id)
    extend = pb.WorkerRequestExtendLeaseData(
        **_echo_fields(req), step_id=req.step_id, lease_id=lease_id
    )
    for frame, kind, message in (
        (codec.encode_request_ack(req, echo), Kind.WORKER_REQUEST_ACK, ack),
        (codec.encode_extend_lease(req, lease_id, echo), Kind.WORKER_REQUEST_EXTEND_LEASE,
         extend),
    ):
        want = pb.ConnectMessage(kind=kind, payload=message.SerializeToString())
        assert frame == want.SerializeToString()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16_383, 16_384, 70_000])
def test_hand_encoded_envelope_matches_for_every_length(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert codec.encode_reply(payload) == pb.ConnectMessage(
        kind=Kind.WORKER_REPLY, payload=payload
    ).SerializeToString()


@FAST
@given(sdk_response=st.binary(max_size=256))
def test_encode_reply_carries_the_bytes_verbatim(sdk_response: bytes) -> None:
    assert peer.read_worker_frame(codec.encode_reply(sdk_response)) == (
        Kind.WORKER_REPLY,
        sdk_response,
    )


@FAST
@given(ids=st.lists(peer.text, max_size=5), shutdown=st.booleans())
def test_encode_status(ids: list[str], shutdown: bool) -> None:
    kind, payload = peer.read_worker_frame(codec.encode_status(ids, shutdown))
    assert kind == Kind.WORKER_STATUS
    data = pb.WorkerStatusData.FromString(payload)
    assert list(data.in_flight_request_ids) == ids
    assert data.shutdown_requested is shutdown


@pytest.mark.parametrize(
    ("encode", "kind"),
    [
        (codec.encode_ready, Kind.WORKER_READY),
        (codec.encode_pause, Kind.WORKER_PAUSE),
        (codec.encode_heartbeat, Kind.WORKER_HEARTBEAT),
    ],
)
def test_payloadless_worker_frames(encode: Any, kind: int) -> None:
    assert peer.read_worker_frame(encode()) == (kind, b"")


def test_encode_worker_connect() -> None:
    request = peer.worker_connect_request()
    kind, payload = peer.read_worker_frame(codec.encode_worker_connect(request))
    assert kind == Kind.WORKER_CONNECT
    assert pb.WorkerConnectRequestData.FromString(payload) == request


@FAST
@given(
    req=peer.executor_requests(),
    status=st.sampled_from(list(pb.SDKResponseStatus.values())),
    body=peer.blobs,
    no_retry=st.booleans(),
    retry_after=st.none() | st.just("") | peer.text,
    sdk_version=peer.text,
    request_version=st.integers(0, 2**32 - 1),
)
def test_build_sdk_response(
    req: ExecutorRequest,
    status: int,
    body: bytes,
    no_retry: bool,
    retry_after: str | None,
    sdk_version: str,
    request_version: int,
) -> None:
    raw = codec.build_sdk_response(
        req,
        status=status,
        body=body,
        no_retry=no_retry,
        retry_after=retry_after,
        sdk_version=sdk_version,
        request_version=request_version,
    )
    response = pb.SDKResponse.FromString(raw)
    assert (response.request_id, response.account_id, response.env_id, response.app_id) == (
        req.request_id,
        req.account_id,
        req.env_id,
        req.app_id,
    )
    assert response.run_id == req.run_id
    assert response.status == status
    assert response.body == body
    assert response.no_retry is no_retry
    assert response.sdk_version == sdk_version
    assert response.request_version == request_version
    assert response.HasField("retry_after") == (retry_after is not None)
    if retry_after is not None:
        assert response.retry_after == retry_after
    # The flush endpoint rejects an empty system_trace_ctx: empty becomes "{}".
    assert response.system_trace_ctx == (req.system_trace_ctx or b"{}")
    assert response.user_trace_ctx == (req.user_trace_ctx or b"{}")
    # The reply frame carries exactly these bytes (the same ones the flush endpoint takes).
    assert peer.read_worker_frame(codec.encode_reply(raw)) == (Kind.WORKER_REPLY, raw)


def test_build_sdk_response_defaults_empty_trace_ctx() -> None:
    event = codec.decode(peer.executor_request(system_trace_ctx=b"", user_trace_ctx=b""))
    assert isinstance(event, ExecutorRequest)
    raw = codec.build_sdk_response(
        event,
        status=pb.SDKResponseStatus.DONE,
        body=b"{}",
        no_retry=False,
        retry_after=None,
        sdk_version="connect-worker:v0.1.0",
        request_version=2,
    )
    response = pb.SDKResponse.FromString(raw)
    assert response.system_trace_ctx == b"{}"
    assert response.user_trace_ctx == b"{}"
    assert not response.HasField("retry_after")


# --- garbage: an event or RemoteProtocolError, never anything else ----------------------------


@FUZZ
@given(data=st.binary(max_size=512))
@example(data=b"\xff")
@example(data=b"\x08")  # truncated varint
@example(data=b"\x12\x05ab")  # length prefix longer than the frame
@example(data=b"\x0b" * 2000)  # deeply nested groups
@example(data=b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01")  # overlong varint
def test_arbitrary_bytes(data: bytes) -> None:
    decode_or_protocol_error(data)


def _valid_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        peer.executor_request_fields().map(lambda f: peer.executor_request(**f)),
        st.tuples(peer.go_durations(), peer.go_durations()).map(
            lambda d: peer.connection_ready(d[0][0], d[1][0])
        ),
        st.tuples(peer.text, peer.text).map(lambda t: peer.sync_failed(*t)),
        st.tuples(peer.text, st.none() | peer.text).map(lambda t: peer.lease_ack(*t)),
        peer.text.map(peer.reply_ack),
    )


@FUZZ
@given(data=_valid_frames(), cut=st.integers(min_value=0))
def test_truncated_valid_frames(data: bytes, cut: int) -> None:
    decode_or_protocol_error(data[: cut % max(len(data), 1)])


@FUZZ
@given(kind=st.sampled_from(peer.KINDS_WITH_PAYLOAD), payload=st.binary(max_size=256))
@example(kind=Kind.GATEWAY_EXECUTOR_REQUEST, payload=b"\x0a\x02\xff\xfe")  # invalid UTF-8
@example(kind=Kind.GATEWAY_CONNECTION_READY, payload=b"\x0a\x02\xff\xfe")
@example(kind=Kind.SYNC_FAILED, payload=b"\x0a\x02\xc3\x28")
@example(kind=Kind.WORKER_REPLY_ACK, payload=b"\x0a\x01\x80")
def test_invalid_payload_for_kind(kind: int, payload: bytes) -> None:
    decode_or_protocol_error(peer.frame(kind, payload))


@pytest.mark.parametrize("kind", peer.KINDS_WITH_PAYLOAD)
def test_invalid_utf8_is_a_remote_error(kind: int) -> None:
    # Field 1 of every one of these payloads is a string; 0xff is never valid UTF-8.
    with pytest.raises(RemoteProtocolError):
        codec.decode(peer.frame(kind, b"\x0a\x02\xff\xfe"))


@FUZZ
@given(heartbeat=st.text(max_size=12), extend=st.text(max_size=12), status=st.text(max_size=12))
def test_arbitrary_interval_strings(heartbeat: str, extend: str, status: str) -> None:
    strings = [s.encode("utf-8", "surrogatepass") for s in (heartbeat, extend, status)]
    # Build the payload by hand: protobuf refuses to serialize lone surrogates, a gateway might.
    payload = b"".join(
        bytes([(number << 3) | 2]) + _varint(len(value)) + value
        for number, value in enumerate(strings, start=1)
    )
    event = decode_or_protocol_error(peer.frame(Kind.GATEWAY_CONNECTION_READY, payload))
    if event is not None:
        assert isinstance(event, ConnectionReady)
        # Whatever the gateway sends, the session gets usable timer intervals.
        assert 0 < event.heartbeat_interval < math.inf
        assert 0 < event.extend_lease_interval < math.inf
        assert 0 <= event.status_interval < math.inf


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
