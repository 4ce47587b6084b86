"""The connection state machine: the table, every (state, input) pair, and WorkerConnection.

``EXPECTED`` below is written from the spec (docs/protocol.md §2, §5.1, §5.4) independently
of ``state.TRANSITIONS``; the table must agree with it pair by pair. The WorkerConnection
tests then check that the object follows the table and nothing else.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from connect_worker.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from connect_worker.protocol import (
    ConnectionReady,
    ExecutorRequest,
    GatewayClosing,
    GatewayHeartbeat,
    Hello,
    Input,
    LeaseExtended,
    ReplyAck,
    State,
    SyncFailed,
    UnknownMessage,
    WorkerConnection,
    pb,
)
from connect_worker.protocol.state import TRANSITIONS, next_state

from . import gateway_peer as peer
from .gateway_peer import Kind

S = State
I = Input  # noqa: E741

LIVE = frozenset({S.CONNECTED, S.ACTIVE, S.PAUSED})
# Allowed in every live state, including PAUSED: in-flight work must be kept alive and its
# replies delivered after WORKER_PAUSE (§5.4.1).
KEEPALIVE = frozenset(
    {
        I.RECV_LEASE_ACK,
        I.RECV_REPLY_ACK,
        I.RECV_HEARTBEAT,
        I.RECV_CLOSING,
        I.SEND_HEARTBEAT,
        I.SEND_EXTEND_LEASE,
        I.SEND_REPLY,
        I.SEND_STATUS,
    }
)
SPECIFIC: dict[tuple[State, Input], State] = {
    (S.AWAITING_HELLO, I.RECV_HELLO): S.SENDING_CONNECT,
    (S.SENDING_CONNECT, I.SEND_CONNECT): S.AWAITING_READY,
    (S.AWAITING_READY, I.RECV_CONNECTION_READY): S.CONNECTED,
    (S.AWAITING_READY, I.RECV_SYNC_FAILED): S.AWAITING_READY,  # the gateway closes next
    (S.CONNECTED, I.SEND_READY): S.ACTIVE,
    (S.CONNECTED, I.SEND_PAUSE): S.PAUSED,  # shutdown requested during the handshake
    (S.ACTIVE, I.SEND_PAUSE): S.PAUSED,
    (S.ACTIVE, I.RECV_EXECUTOR_REQUEST): S.ACTIVE,
    (S.PAUSED, I.RECV_EXECUTOR_REQUEST): S.PAUSED,  # crossed our PAUSE on the wire; not acked
    (S.ACTIVE, I.SEND_REQUEST_ACK): S.ACTIVE,
}


def expected_target(state: State, event: Input) -> State | None:
    if event is I.CLOSE:
        return S.CLOSED
    if event is I.RECV_UNKNOWN:
        return state
    if (state, event) in SPECIFIC:
        return SPECIFIC[(state, event)]
    if state in LIVE and event in KEEPALIVE:
        return state
    return None


def error_for(event: Input) -> type[ProtocolError]:
    """A forbidden receive is the gateway's fault; a forbidden send or close is ours."""
    return RemoteProtocolError if event.name.startswith("RECV_") else LocalProtocolError


ALL_PAIRS = list(itertools.product(State, Input))
PAIR_IDS = [f"{state.name}-{event.name}" for state, event in ALL_PAIRS]


# --- the table, pair by pair ---------------------------------------------------------------


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=PAIR_IDS)
def test_table_pair(state: State, event: Input) -> None:
    want = expected_target(state, event)
    assert TRANSITIONS.get((state, event)) is want
    if want is None:
        with pytest.raises(error_for(event)) as info:
            next_state(state, event)
        other = (
            LocalProtocolError if error_for(event) is RemoteProtocolError else RemoteProtocolError
        )
        assert not isinstance(info.value, other)
        assert event.value in str(info.value)
        assert state.value in str(info.value)
    else:
        assert next_state(state, event) is want


def test_table_has_only_state_input_keys() -> None:
    for (state, event), target in TRANSITIONS.items():
        assert isinstance(state, State)
        assert isinstance(event, Input)
        assert isinstance(target, State)


def test_every_input_is_a_send_a_receive_or_close() -> None:
    for event in Input:
        assert event.name.startswith(("RECV_", "SEND_")) or event is I.CLOSE, event
        assert event.value == event.name.lower()


def _reachable(start: State) -> set[State]:
    seen = {start}
    frontier = [start]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in seen:
                seen.add(target)
                frontier.append(target)
    return seen


def test_paused_never_goes_back_to_active() -> None:
    assert S.ACTIVE not in _reachable(S.PAUSED)
    assert S.CONNECTED not in _reachable(S.PAUSED)
    assert _reachable(S.PAUSED) == {S.PAUSED, S.CLOSED}


def test_close_from_anywhere_goes_to_closed_and_closed_is_final() -> None:
    for state in State:
        assert next_state(state, I.CLOSE) is S.CLOSED
    assert _reachable(S.CLOSED) == {S.CLOSED}


def test_executor_requests_are_only_ackable_in_active() -> None:
    assert {s for (s, e) in TRANSITIONS if e is I.SEND_REQUEST_ACK} == {S.ACTIVE}
    assert {s for (s, e) in TRANSITIONS if e is I.SEND_READY} == {S.CONNECTED}


def test_every_state_is_reachable_and_every_input_is_used() -> None:
    assert _reachable(S.AWAITING_HELLO) == set(State)
    assert {e for (_, e) in TRANSITIONS} == set(Input)


def test_unknown_messages_never_change_state() -> None:
    for state in State:
        assert next_state(state, I.RECV_UNKNOWN) is state


# --- WorkerConnection: drive each input through the object -----------------------------------

REQUEST = peer.request_event()


def _path_to(state: State) -> list[Input]:
    return {
        S.AWAITING_HELLO: [],
        S.SENDING_CONNECT: [I.RECV_HELLO],
        S.AWAITING_READY: [I.RECV_HELLO, I.SEND_CONNECT],
        S.CONNECTED: [I.RECV_HELLO, I.SEND_CONNECT, I.RECV_CONNECTION_READY],
        S.ACTIVE: [I.RECV_HELLO, I.SEND_CONNECT, I.RECV_CONNECTION_READY, I.SEND_READY],
        S.PAUSED: [
            I.RECV_HELLO,
            I.SEND_CONNECT,
            I.RECV_CONNECTION_READY,
            I.SEND_READY,
            I.SEND_PAUSE,
        ],
        S.CLOSED: [I.RECV_HELLO, I.CLOSE],
    }[state]


# Receives: the frame a gateway would send, and the event type the connection returns.
RECEIVES: dict[Input, tuple[bytes, type]] = {
    I.RECV_HELLO: (peer.hello(), Hello),
    I.RECV_CONNECTION_READY: (peer.connection_ready("1m0s", "500ms", "0s"), ConnectionReady),
    I.RECV_SYNC_FAILED: (peer.sync_failed(), SyncFailed),
    I.RECV_EXECUTOR_REQUEST: (peer.executor_request(), ExecutorRequest),
    I.RECV_LEASE_ACK: (peer.lease_ack(), LeaseExtended),
    I.RECV_REPLY_ACK: (peer.reply_ack(), ReplyAck),
    I.RECV_HEARTBEAT: (peer.gateway_heartbeat(), GatewayHeartbeat),
    I.RECV_CLOSING: (peer.gateway_closing(), GatewayClosing),
    I.RECV_UNKNOWN: (peer.unknown(99), UnknownMessage),
}
# Sends: the call, and the kind of the frame it must return (None: close returns nothing).
SENDS: dict[Input, tuple[Callable[[WorkerConnection], Any], int | None]] = {
    I.SEND_CONNECT: (lambda c: c.connect(peer.worker_connect_request()), Kind.WORKER_CONNECT),
    I.SEND_READY: (lambda c: c.send_ready(), Kind.WORKER_READY),
    I.SEND_PAUSE: (lambda c: c.pause(), Kind.WORKER_PAUSE),
    I.SEND_HEARTBEAT: (lambda c: c.heartbeat(), Kind.WORKER_HEARTBEAT),
    I.SEND_REQUEST_ACK: (lambda c: c.ack(REQUEST), Kind.WORKER_REQUEST_ACK),
    I.SEND_EXTEND_LEASE: (
        lambda c: c.extend_lease(REQUEST, "L2"),
        Kind.WORKER_REQUEST_EXTEND_LEASE,
    ),
    I.SEND_REPLY: (lambda c: c.reply(b"\x0a\x01r"), Kind.WORKER_REPLY),
    I.SEND_STATUS: (lambda c: c.status(["r"], shutdown_requested=False), Kind.WORKER_STATUS),
    I.CLOSE: (lambda c: c.close(), None),
}


def test_drivers_cover_every_input() -> None:
    assert set(RECEIVES) | set(SENDS) == set(Input)
    assert not set(RECEIVES) & set(SENDS)


def apply(conn: WorkerConnection, event: Input) -> Any:
    """Feed one input to the connection the way the session would."""
    if event in RECEIVES:
        data, event_type = RECEIVES[event]
        result = conn.receive(data)
        assert type(result) is event_type
        return result
    call, kind = SENDS[event]
    result = call(conn)
    if kind is None:
        assert result is None
    else:
        assert peer.read_worker_frame(result)[0] == kind
    return result


def connection_in(state: State) -> WorkerConnection:
    conn = WorkerConnection()
    for event in _path_to(state):
        apply(conn, event)
    assert conn.state is state
    return conn


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=PAIR_IDS)
def test_connection_pair(state: State, event: Input) -> None:
    conn = connection_in(state)
    target = TRANSITIONS.get((state, event))
    if target is None:
        with pytest.raises(error_for(event)):
            apply(conn, event)
        assert conn.state is state  # a refused input changes nothing
    else:
        apply(conn, event)
        assert conn.state is target


@pytest.mark.parametrize("state", list(State))
def test_garbage_frame_raises_and_leaves_state_unchanged(state: State) -> None:
    conn = connection_in(state)
    before = (conn.state, conn.ready, conn.gateway_closing)
    with pytest.raises(RemoteProtocolError):
        conn.receive(peer.GARBAGE)
    with pytest.raises(RemoteProtocolError):
        conn.receive(peer.connection_ready("ten seconds"))
    assert (conn.state, conn.ready, conn.gateway_closing) == before


def _kind(data: bytes) -> int:
    return peer.read_worker_frame(data)[0]


def test_full_walk_through() -> None:
    conn = WorkerConnection()
    assert conn.state is S.AWAITING_HELLO
    assert not conn.live
    assert not conn.accepts_work
    assert conn.ready is None
    assert conn.gateway_closing is False

    assert conn.receive(peer.hello()) == Hello()
    assert conn.state is S.SENDING_CONNECT
    request = peer.worker_connect_request()
    kind, payload = peer.read_worker_frame(conn.connect(request))
    assert kind == Kind.WORKER_CONNECT
    assert payload == request.SerializeToString()
    assert conn.state is S.AWAITING_READY
    assert not conn.live

    ready = conn.receive(peer.connection_ready("10s", "30s", "0s"))
    assert ready == ConnectionReady(10.0, 30.0, 0.0)
    assert conn.ready == ready
    assert conn.state is S.CONNECTED
    assert conn.live
    assert not conn.accepts_work  # manual readiness: not routable until WORKER_READY

    assert _kind(conn.heartbeat()) == Kind.WORKER_HEARTBEAT
    assert _kind(conn.send_ready()) == Kind.WORKER_READY
    assert conn.state is S.ACTIVE
    assert conn.accepts_work
    assert conn.live

    req = conn.receive(peer.executor_request(request_id="R1", lease_id="L1"))
    assert isinstance(req, ExecutorRequest)
    assert conn.accepts_work
    kind, payload = peer.read_worker_frame(conn.ack(req))
    assert kind == Kind.WORKER_REQUEST_ACK
    assert pb.WorkerRequestAckData.FromString(payload).request_id == "R1"
    assert _kind(conn.extend_lease(req, req.lease_id)) == Kind.WORKER_REQUEST_EXTEND_LEASE
    assert conn.receive(peer.lease_ack("R1", "L2")) == LeaseExtended("R1", "L2")
    assert conn.receive(peer.gateway_heartbeat()) == GatewayHeartbeat()
    assert _kind(conn.heartbeat()) == Kind.WORKER_HEARTBEAT
    assert _kind(conn.status(["R1"], shutdown_requested=False)) == Kind.WORKER_STATUS

    # Drain: pause, then keep the in-flight request alive until its reply is acked.
    assert _kind(conn.pause()) == Kind.WORKER_PAUSE
    assert conn.state is S.PAUSED
    assert not conn.accepts_work
    assert conn.live
    with pytest.raises(LocalProtocolError):
        conn.send_ready()  # a paused connection never becomes routable again
    assert conn.state is S.PAUSED
    assert _kind(conn.extend_lease(req, "L2")) == Kind.WORKER_REQUEST_EXTEND_LEASE
    assert _kind(conn.heartbeat()) == Kind.WORKER_HEARTBEAT
    assert conn.receive(peer.gateway_heartbeat()) == GatewayHeartbeat()
    assert _kind(conn.reply(b"\x0a\x02R1")) == Kind.WORKER_REPLY
    assert conn.receive(peer.reply_ack("R1")) == ReplyAck("R1")
    assert _kind(conn.status([], shutdown_requested=True)) == Kind.WORKER_STATUS

    conn.close()
    assert conn.state is S.CLOSED
    assert not conn.live
    assert not conn.accepts_work
    with pytest.raises(LocalProtocolError):
        conn.heartbeat()
    with pytest.raises(LocalProtocolError):
        conn.reply(b"")
    with pytest.raises(RemoteProtocolError):
        conn.receive(peer.reply_ack("R1"))
    assert isinstance(conn.receive(peer.unknown(42)), UnknownMessage)
    conn.close()  # idempotent
    assert conn.state is S.CLOSED


@pytest.mark.parametrize(
    ("heartbeat", "extend", "status", "want"),
    [
        ("1m0s", "500ms", "0s", (60.0, 0.5, 0.0)),
        ("500ms", "1m0s", "2s", (0.5, 60.0, 2.0)),
        ("1h2m3.5s", "2m30s", "1.5s", (3723.5, 150.0, 1.5)),
    ],
)
def test_ready_intervals_are_parsed(
    heartbeat: str, extend: str, status: str, want: tuple[float, float, float]
) -> None:
    conn = connection_in(S.AWAITING_READY)
    conn.receive(peer.connection_ready(heartbeat, extend, status))
    assert conn.ready is not None
    got = (
        conn.ready.heartbeat_interval,
        conn.ready.extend_lease_interval,
        conn.ready.status_interval,
    )
    assert got == pytest.approx(want)


def test_executor_request_in_paused_is_received_but_not_accepted() -> None:
    conn = connection_in(S.PAUSED)
    event = conn.receive(peer.executor_request(request_id="late"))
    assert isinstance(event, ExecutorRequest)
    assert event.request_id == "late"
    assert conn.state is S.PAUSED
    assert not conn.accepts_work
    with pytest.raises(LocalProtocolError):
        conn.ack(event)
    assert conn.state is S.PAUSED


@pytest.mark.parametrize("state", [S.CONNECTED, S.ACTIVE, S.PAUSED])
def test_gateway_closing_sets_the_flag_and_keeps_the_state(state: State) -> None:
    conn = connection_in(state)
    assert conn.gateway_closing is False
    assert conn.receive(peer.gateway_closing()) == GatewayClosing()
    assert conn.gateway_closing is True
    assert conn.state is state
    # In-flight work keeps going on the old socket until the session moves it.
    assert _kind(conn.heartbeat()) == Kind.WORKER_HEARTBEAT
    assert _kind(conn.reply(b"")) == Kind.WORKER_REPLY
    conn.receive(peer.gateway_heartbeat())
    assert conn.gateway_closing is True


def test_closing_refused_before_the_handshake_does_not_set_the_flag() -> None:
    conn = connection_in(S.AWAITING_READY)
    with pytest.raises(RemoteProtocolError):
        conn.receive(peer.gateway_closing())
    assert conn.gateway_closing is False


def test_second_connection_ready_is_refused_and_keeps_the_first() -> None:
    conn = connection_in(S.ACTIVE)
    first = conn.ready
    with pytest.raises(RemoteProtocolError):
        conn.receive(peer.connection_ready("1s", "1s", "1s"))
    assert conn.ready == first
    assert conn.state is S.ACTIVE


def test_sync_failed_during_handshake() -> None:
    conn = connection_in(S.AWAITING_READY)
    assert conn.receive(peer.sync_failed("bad_fn", "nope")) == SyncFailed("bad_fn", "nope")
    assert conn.state is S.AWAITING_READY
    assert not conn.live
    conn.close()
    assert conn.state is S.CLOSED


def test_pause_during_handshake_skips_readiness() -> None:
    # Shutdown requested while reconnecting: WORKER_PAUSE instead of WORKER_READY (§5.4.2).
    conn = connection_in(S.CONNECTED)
    conn.pause()
    assert conn.state is S.PAUSED
    assert not conn.accepts_work
    assert conn.live


@pytest.mark.parametrize("state", list(State))
def test_properties_follow_the_state(state: State) -> None:
    conn = connection_in(state)
    assert conn.accepts_work is (state is S.ACTIVE)
    assert conn.live is (state in LIVE)


# --- a random walk: the table is the only source of truth ------------------------------------

_DURATION = st.sampled_from(["10s", "1m0s", "500ms", "0s", "", "1h2m3.5s", "2s", "1.5s"])


class ConnectionMachine(RuleBasedStateMachine):
    """Random inputs against a WorkerConnection and a model that only knows TRANSITIONS."""

    def __init__(self) -> None:
        super().__init__()
        self.conn = WorkerConnection()
        self.model = S.AWAITING_HELLO
        self.closing_seen = False
        self.ready: ConnectionReady | None = None

    def _frame_for(self, event: Input, data: st.DataObject) -> bytes:
        if event is I.RECV_CONNECTION_READY:
            return peer.connection_ready(
                data.draw(_DURATION), data.draw(_DURATION), data.draw(_DURATION)
            )
        if event is I.RECV_EXECUTOR_REQUEST:
            return peer.executor_request(**data.draw(peer.executor_request_fields()))
        if event is I.RECV_LEASE_ACK:
            return peer.lease_ack(data.draw(peer.text), data.draw(st.none() | peer.text))
        if event is I.RECV_REPLY_ACK:
            return peer.reply_ack(data.draw(peer.text))
        if event is I.RECV_SYNC_FAILED:
            return peer.sync_failed(data.draw(peer.text), data.draw(peer.text))
        if event is I.RECV_UNKNOWN:
            kind = data.draw(st.sampled_from([*peer.WORKER_TO_GATEWAY, 16, 99, 12345]))
            return peer.unknown(kind)
        return RECEIVES[event][0]

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        allowed = sorted(
            (e for (s, e) in TRANSITIONS if s is self.model and e is not I.CLOSE),
            key=lambda e: e.value,
        )
        # Half the time an input the table allows (so walks get past the handshake), half the
        # time any input at all (so refusals are exercised in every state).
        event = data.draw(
            st.sampled_from(allowed) | st.sampled_from(list(Input))
            if allowed
            else st.sampled_from(list(Input))
        )
        target = TRANSITIONS.get((self.model, event))
        if event in RECEIVES:
            frame = self._frame_for(event, data)

            def act() -> Any:
                return self.conn.receive(frame)
        else:

            def act() -> Any:
                return SENDS[event][0](self.conn)

        if target is None:
            with pytest.raises(error_for(event)):
                act()
            return
        result = act()
        self.model = target
        if event is I.RECV_CONNECTION_READY:
            self.ready = result
        if event is I.RECV_CLOSING:
            self.closing_seen = True
        if event in SENDS and SENDS[event][1] is not None:
            assert peer.read_worker_frame(result)[0] == SENDS[event][1]

    @rule(
        frame=st.sampled_from(
            [peer.GARBAGE, peer.connection_ready("-1s"), peer.executor_request(request_id="")]
        )
    )
    def garbage(self, frame: bytes) -> None:
        with pytest.raises(RemoteProtocolError):
            self.conn.receive(frame)

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert self.conn.state is self.model
        assert self.conn.accepts_work is (self.model is S.ACTIVE)
        assert self.conn.live is (self.model in LIVE)
        assert self.conn.gateway_closing is self.closing_seen
        assert self.conn.ready == self.ready


ConnectionMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestConnectionMachine = ConnectionMachine.TestCase
