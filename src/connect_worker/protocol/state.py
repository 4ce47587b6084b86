"""The worker-side connection state machine, as a table.

One WebSocket goes through::

    AWAITING_HELLO --recv HELLO--> SENDING_CONNECT --send CONNECT--> AWAITING_READY
    AWAITING_READY --recv CONNECTION_READY--> CONNECTED   (handshake done, not routable)
    CONNECTED --send READY--> ACTIVE                      (the gateway may route work here)
    CONNECTED | ACTIVE --send PAUSE--> PAUSED             (irreversible: never routable again)
    any --close--> CLOSED

Rule: every (state, input) pair not in ``TRANSITIONS`` is an error. A missing
*send* is our bug (LocalProtocolError); a missing *receive* is the gateway's
(RemoteProtocolError), which the session logs and ignores frame by frame.
Heartbeats, lease extensions and replies are allowed in CONNECTED, ACTIVE and
PAUSED: a paused connection must keep in-flight work alive until it is acked.
"""

from __future__ import annotations

from enum import Enum

from ..errors import LocalProtocolError, RemoteProtocolError


class State(Enum):
    # Members are singletons: identity hashing is C-level (Enum's own __hash__ is Python
    # code, and the table below is looked up for every frame).
    __hash__ = object.__hash__

    AWAITING_HELLO = "awaiting_hello"
    SENDING_CONNECT = "sending_connect"
    AWAITING_READY = "awaiting_ready"
    CONNECTED = "connected"
    ACTIVE = "active"
    PAUSED = "paused"
    CLOSED = "closed"


class Input(Enum):
    __hash__ = object.__hash__

    RECV_HELLO = "recv_hello"
    SEND_CONNECT = "send_connect"
    RECV_CONNECTION_READY = "recv_connection_ready"
    RECV_SYNC_FAILED = "recv_sync_failed"
    SEND_READY = "send_ready"
    SEND_PAUSE = "send_pause"
    RECV_EXECUTOR_REQUEST = "recv_executor_request"
    RECV_LEASE_ACK = "recv_lease_ack"
    RECV_REPLY_ACK = "recv_reply_ack"
    RECV_HEARTBEAT = "recv_heartbeat"
    RECV_CLOSING = "recv_closing"
    RECV_UNKNOWN = "recv_unknown"
    SEND_HEARTBEAT = "send_heartbeat"
    SEND_REQUEST_ACK = "send_request_ack"
    SEND_EXTEND_LEASE = "send_extend_lease"
    SEND_REPLY = "send_reply"
    SEND_STATUS = "send_status"
    CLOSE = "close"


S = State
I = Input  # noqa: E741
_LIVE = (S.CONNECTED, S.ACTIVE, S.PAUSED)

TRANSITIONS: dict[tuple[State, Input], State] = {
    (S.AWAITING_HELLO, I.RECV_HELLO): S.SENDING_CONNECT,
    (S.SENDING_CONNECT, I.SEND_CONNECT): S.AWAITING_READY,
    (S.AWAITING_READY, I.RECV_CONNECTION_READY): S.CONNECTED,
    # SYNC_FAILED is followed by a close from the gateway; the state stays until then.
    (S.AWAITING_READY, I.RECV_SYNC_FAILED): S.AWAITING_READY,
    (S.CONNECTED, I.SEND_READY): S.ACTIVE,
    (S.CONNECTED, I.SEND_PAUSE): S.PAUSED,
    (S.ACTIVE, I.SEND_PAUSE): S.PAUSED,
    # A request can cross our PAUSE on the wire; the session sees it and does not ack it.
    (S.ACTIVE, I.RECV_EXECUTOR_REQUEST): S.ACTIVE,
    (S.PAUSED, I.RECV_EXECUTOR_REQUEST): S.PAUSED,
    (S.ACTIVE, I.SEND_REQUEST_ACK): S.ACTIVE,
}
for _state in _LIVE:
    for _input in (
        I.RECV_LEASE_ACK,
        I.RECV_REPLY_ACK,
        I.RECV_HEARTBEAT,
        I.RECV_CLOSING,
        I.SEND_HEARTBEAT,
        I.SEND_EXTEND_LEASE,
        I.SEND_REPLY,
        I.SEND_STATUS,
    ):
        TRANSITIONS[(_state, _input)] = _state
for _state in State:
    # Unknown kinds are ignored in every state; close is always allowed and final.
    TRANSITIONS[(_state, I.RECV_UNKNOWN)] = _state
    TRANSITIONS[(_state, I.CLOSE)] = S.CLOSED


def next_state(state: State, event: Input) -> State:
    """Apply one input; raise the matching ProtocolError if the table forbids it."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        error = RemoteProtocolError if event.value.startswith("recv_") else LocalProtocolError
        raise error(f"{event.value} is not allowed in state {state.value}") from None
