"""``WorkerConnection``: the sans-I/O protocol object for one WebSocket.

Bytes in, typed events out; calls in, bytes out. No sockets, no clock, no tasks:
the session (``connect_worker.engine.session``) pumps frames through it. State changes go
through the table in ``state.py`` so an out-of-order frame is an error, never a
silent surprise.
"""

from __future__ import annotations

from typing import Any

from . import codec
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
from .state import Input, State, next_state

_RECEIVE_INPUT: dict[type, Input] = {
    Hello: Input.RECV_HELLO,
    ConnectionReady: Input.RECV_CONNECTION_READY,
    SyncFailed: Input.RECV_SYNC_FAILED,
    ExecutorRequest: Input.RECV_EXECUTOR_REQUEST,
    LeaseExtended: Input.RECV_LEASE_ACK,
    ReplyAck: Input.RECV_REPLY_ACK,
    GatewayHeartbeat: Input.RECV_HEARTBEAT,
    GatewayClosing: Input.RECV_CLOSING,
    UnknownMessage: Input.RECV_UNKNOWN,
}


class WorkerConnection:
    """Protocol state of one worker WebSocket."""

    def __init__(self) -> None:
        self.state = State.AWAITING_HELLO
        self.ready: ConnectionReady | None = None
        self.gateway_closing = False

    def _apply(self, event: Input) -> None:
        self.state = next_state(self.state, event)

    def receive(self, frame: bytes) -> GatewayEvent:
        """Decode one frame and advance the state; raises RemoteProtocolError."""
        event = codec.decode(frame)
        self._apply(_RECEIVE_INPUT[type(event)])
        if isinstance(event, ConnectionReady):
            self.ready = event
        elif isinstance(event, GatewayClosing):
            self.gateway_closing = True
        return event

    @property
    def accepts_work(self) -> bool:
        """True only while routable: a request that arrives otherwise must not be acked."""
        return self.state is State.ACTIVE

    @property
    def live(self) -> bool:
        """True once the handshake is done and until close: extensions and replies may go."""
        return self.state in (State.CONNECTED, State.ACTIVE, State.PAUSED)

    def connect(self, request: Any) -> bytes:
        self._apply(Input.SEND_CONNECT)
        return codec.encode_worker_connect(request)

    def send_ready(self) -> bytes:
        self._apply(Input.SEND_READY)
        return codec.encode_ready()

    def pause(self) -> bytes:
        self._apply(Input.SEND_PAUSE)
        return codec.encode_pause()

    def heartbeat(self) -> bytes:
        self._apply(Input.SEND_HEARTBEAT)
        return codec.encode_heartbeat()

    def ack(self, request: ExecutorRequest, echo: bytes | None = None) -> bytes:
        """``echo``: ``codec.request_echo(request)``, if the caller keeps it for extensions."""
        self._apply(Input.SEND_REQUEST_ACK)
        return codec.encode_request_ack(request, echo)

    def extend_lease(self, request: ExecutorRequest, lease_id: str,
                     echo: bytes | None = None) -> bytes:
        self._apply(Input.SEND_EXTEND_LEASE)
        return codec.encode_extend_lease(request, lease_id, echo)

    def reply(self, sdk_response: bytes) -> bytes:
        self._apply(Input.SEND_REPLY)
        return codec.encode_reply(sdk_response)

    def status(self, in_flight_request_ids: list[str], shutdown_requested: bool) -> bytes:
        self._apply(Input.SEND_STATUS)
        return codec.encode_status(in_flight_request_ids, shutdown_requested)

    def close(self) -> None:
        self._apply(Input.CLOSE)
