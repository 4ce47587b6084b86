"""A scripted gateway peer for protocol tests, plus Hypothesis strategies.

Frames are built with the real protobuf classes (``connect_worker.protocol.pb``),
exactly as a gateway would put them on the wire; worker frames are read back the
same way. Nothing here goes through ``codec`` so the tests check it independently.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from hypothesis import strategies as st

from connect_worker.protocol import pb
from connect_worker.protocol.events import ExecutorRequest

Kind = pb.GatewayMessageType

GATEWAY_TO_WORKER = (
    Kind.GATEWAY_HELLO,
    Kind.SYNC_FAILED,
    Kind.GATEWAY_CONNECTION_READY,
    Kind.GATEWAY_EXECUTOR_REQUEST,
    Kind.WORKER_REQUEST_EXTEND_LEASE_ACK,
    Kind.WORKER_REPLY_ACK,
    Kind.GATEWAY_HEARTBEAT,
    Kind.GATEWAY_CLOSING,
)
WORKER_TO_GATEWAY = (
    Kind.WORKER_CONNECT,
    Kind.WORKER_READY,
    Kind.WORKER_REQUEST_ACK,
    Kind.WORKER_REQUEST_EXTEND_LEASE,
    Kind.WORKER_REPLY,
    Kind.WORKER_PAUSE,
    Kind.WORKER_HEARTBEAT,
    Kind.WORKER_STATUS,
)
# Gateway kinds whose payload is a protobuf message (the others carry none).
KINDS_WITH_PAYLOAD = (
    Kind.SYNC_FAILED,
    Kind.GATEWAY_CONNECTION_READY,
    Kind.GATEWAY_EXECUTOR_REQUEST,
    Kind.WORKER_REQUEST_EXTEND_LEASE_ACK,
    Kind.WORKER_REPLY_ACK,
)


# --- gateway -> worker frames -------------------------------------------------------------


def frame(kind: int, payload: bytes = b"") -> bytes:
    return bytes(pb.ConnectMessage(kind=kind, payload=payload).SerializeToString())


def hello() -> bytes:
    return frame(Kind.GATEWAY_HELLO)


def connection_ready(heartbeat: str = "10s", extend: str = "30s", status: str = "0s") -> bytes:
    data = pb.GatewayConnectionReadyData(
        heartbeat_interval=heartbeat, extend_lease_interval=extend, status_interval=status
    )
    return frame(Kind.GATEWAY_CONNECTION_READY, data.SerializeToString())


def sync_failed(code: str = "sync_failed", message: str = "boom") -> bytes:
    return frame(Kind.SYNC_FAILED, pb.SystemError(code=code, message=message).SerializeToString())


REQUEST_DEFAULTS: dict[str, Any] = {
    "request_id": "01JREQ0000000000000000000",
    "account_id": "acct",
    "env_id": "env",
    "app_id": "app-uuid",
    "app_name": "my-app",
    "function_id": "fn-uuid",
    "function_slug": "my-app-my-fn",
    "step_id": "step",
    "request_payload": b'{"event":{}}',
    "system_trace_ctx": b'{"traceparent":"00-1-2-01"}',
    "user_trace_ctx": b"{}",
    "run_id": "01JRUN0000000000000000000",
    "lease_id": "01JLEASE00000000000000000",
    "job_id": "job-1",
}


def executor_request_data(**overrides: Any) -> Any:
    """A ``pb.GatewayExecutorRequestData``; ``step_id=None`` leaves the optional field unset."""
    fields = {**REQUEST_DEFAULTS, **overrides}
    if fields["step_id"] is None:
        del fields["step_id"]
    return pb.GatewayExecutorRequestData(**fields)


def executor_request(**overrides: Any) -> bytes:
    data = executor_request_data(**overrides)
    return frame(Kind.GATEWAY_EXECUTOR_REQUEST, data.SerializeToString())


def lease_ack(
    request_id: str = REQUEST_DEFAULTS["request_id"], new_lease_id: str | None = "L2"
) -> bytes:
    ack = pb.WorkerRequestExtendLeaseAckData(request_id=request_id, account_id="acct")
    if new_lease_id is not None:
        ack.new_lease_id = new_lease_id
    return frame(Kind.WORKER_REQUEST_EXTEND_LEASE_ACK, ack.SerializeToString())


def reply_ack(request_id: str = REQUEST_DEFAULTS["request_id"]) -> bytes:
    return frame(
        Kind.WORKER_REPLY_ACK, pb.WorkerReplyAckData(request_id=request_id).SerializeToString()
    )


def gateway_heartbeat() -> bytes:
    return frame(Kind.GATEWAY_HEARTBEAT)


def gateway_closing() -> bytes:
    return frame(Kind.GATEWAY_CLOSING)


def unknown(kind: int = 99) -> bytes:
    return frame(kind)


# A frame that cannot be decoded whatever the state: a string field holding invalid UTF-8.
GARBAGE = frame(Kind.GATEWAY_EXECUTOR_REQUEST, b"\x0a\x02\xff\xfe")


# --- worker -> gateway frames -------------------------------------------------------------


def read_worker_frame(data: bytes) -> tuple[int, bytes]:
    """Parse a worker frame the way the gateway does: (kind, payload)."""
    envelope = pb.ConnectMessage.FromString(data)
    return int(envelope.kind), bytes(envelope.payload)


def worker_connect_request() -> Any:
    return pb.WorkerConnectRequestData(
        connection_id="01JCONN000000000000000000",
        instance_id="host-1",
        auth_data=pb.AuthData(session_token="jwt", sync_token="hashed"),
        capabilities=b'{"connect":"v1"}',
        apps=[pb.AppConfiguration(app_name="my-app", functions=b"[]")],
        worker_manual_readiness_ack=True,
        framework="connect",
        sdk_version="0.5.19",
        sdk_language="py",
    )


def request_event(**overrides: Any) -> ExecutorRequest:
    return ExecutorRequest(**{**REQUEST_DEFAULTS, **overrides})


# --- strategies ---------------------------------------------------------------------------

# Protobuf strings must be valid UTF-8, so no lone surrogates.
text = st.text(st.characters(codec="utf-8"), max_size=24)
nonempty_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
blobs = st.binary(max_size=48)
trace_ctx = st.one_of(st.just(b""), st.just(b"{}"), st.just(b'{"traceparent":"00-a-b-01"}'), blobs)


def executor_request_fields() -> st.SearchStrategy[dict[str, Any]]:
    """Field values of one GATEWAY_EXECUTOR_REQUEST, as ``ExecutorRequest`` keywords."""
    return st.fixed_dictionaries(
        {
            "request_id": nonempty_text,  # the codec rejects an empty request_id
            "account_id": text,
            "env_id": text,
            "app_id": text,
            "app_name": text,
            "function_id": text,
            "function_slug": text,
            "step_id": st.none() | st.just("") | st.just("step") | text,
            "request_payload": blobs,
            "system_trace_ctx": trace_ctx,
            "user_trace_ctx": trace_ctx,
            "run_id": text,
            "lease_id": text,
            "job_id": text,
        }
    )


def executor_requests() -> st.SearchStrategy[ExecutorRequest]:
    return executor_request_fields().map(lambda fields: ExecutorRequest(**fields))


UNIT_SECONDS: dict[str, Fraction] = {
    "ns": Fraction(1, 10**9),
    "us": Fraction(1, 10**6),
    "\u00b5s": Fraction(1, 10**6),  # micro sign
    "\u03bcs": Fraction(1, 10**6),  # greek mu
    "ms": Fraction(1, 10**3),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}


@st.composite
def go_durations(draw: st.DrawFn, max_terms: int = 4) -> tuple[str, float]:
    """A non-negative Go duration string and its exact value in seconds (as a float)."""
    terms = draw(
        st.lists(
            st.tuples(
                st.integers(0, 5000),
                st.none() | st.text("0123456789", min_size=1, max_size=4),
                st.sampled_from(sorted(UNIT_SECONDS)),
            ),
            min_size=1,
            max_size=max_terms,
        )
    )
    text_parts = []
    total = Fraction(0)
    for whole, frac, unit in terms:
        number = str(whole) if frac is None else f"{whole}.{frac}"
        text_parts.append(number + unit)
        total += Fraction(number) * UNIT_SECONDS[unit]
    return "".join(text_parts), float(total)
