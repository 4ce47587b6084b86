"""The step ledger: every ACKed request's lifecycle as one table. No I/O, no clock.

Owns each step's state from its ACK until it leaves the worker (reply delivered, lease
lost, or given up by the drain), and the memory of delivered replies. The worker feeds
it events (frames from the gateway, the body's outcome, what happened to a write, timer
ticks) and carries out the actions it returns; time is passed in. Like h11's and
websockets' state machines, it is the part that can be read whole and tested without
sockets: ``TRANSITIONS`` is the complete list, and an event a state does not list raises
``StepTransitionError`` (a bug in the engine, never something the gateway can cause:
every event a gateway frame triggers is listed for every live state).

A step's life::

    CONFIRMING ──lease extended──> OWNED + start body   (confirm-before-run, confirm.py)
      └──lease NACKed / lapsed──> LEASE_LOST (the body never ran)
    ACKED ──lease extended──> OWNED            (body queued or running in both)
      │ └──lease NACKed──> CANCELLING ──body cancelled──> LEASE_LOST   (no reply, ever)
      └──body done──> REPLY_SENT ──reply ACK──> DELIVERED
                        │  └──ACK overdue / socket lost / not written──> FLUSHING ──> DELIVERED
    drain: DEADLINE asks the gateway about unconfirmed steps, GIVE_UP ends every live step:
      OWNED ──> HANDING_BACK (a retryable error reply) ──> DELIVERED;  the rest ──> ABANDONED

The table is printed in docs/design.md by ``table_markdown`` (tests/engine/test_steps.py
holds the two equal; ``python -m connect_worker.engine.steps docs/design.md`` rewrites it).
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from ..protocol import ExecutorRequest


class StepState(Enum):
    # Identity hashing is C-level (Enum's __hash__ is Python): the table is hot.
    __hash__ = object.__hash__

    # ACKed with confirm-before-run: the body waits until an extension is granted.
    CONFIRMING = "confirming"
    ACKED = "acked"  # ACKed; body queued or running; the gateway has not confirmed our lease
    OWNED = "owned"  # the same, and an extension's answer proved the lease is ours
    CANCELLING = "cancelling"  # lease lost while queued/running: body cancelled, no reply
    REPLY_SENT = "reply_sent"  # the body's reply is written; waiting for WORKER_REPLY_ACK
    FLUSHING = "flushing"  # the reply is being POSTed to /v0/connect/flush
    HANDING_BACK = "handing_back"  # drain gave up on an owned step: error reply in delivery
    DELIVERED = "delivered"  # final: the gateway acknowledged the reply, or the flush took it
    LEASE_LOST = "lease_lost"  # final: another copy holds the lease; we sent nothing
    ABANDONED = "abandoned"  # final: the drain gave up on it (logged and counted)


class StepEvent(Enum):
    __hash__ = object.__hash__

    # From gateway frames: listed for every live state (a confused gateway cannot crash us).
    LEASE_EXTENDED = "lease_extended"  # an extension answered with a new lease id
    LEASE_NACKED = "lease_nacked"  # an extension answered without one: not our lease
    REPLY_ACKED = "reply_acked"  # WORKER_REPLY_ACK
    REDELIVERED = "redelivered"  # the same request forwarded again (our ACK was lost)
    GATEWAY_CLOSING = "gateway_closing"  # on the socket that carries the step
    # From sockets and the worker's own writes.
    SOCKET_READY = "socket_ready"  # a new session became current
    SOCKET_LOST = "socket_lost"  # the socket that carried this step's reply is gone
    REPLY_NOT_WRITTEN = "reply_not_written"  # no live socket took the reply
    FLUSHED = "flushed"  # /v0/connect/flush answered 200
    # From the body (the SDK on the user loop).
    BODY_DONE = "body_done"
    BODY_CANCELLED = "body_cancelled"
    # Timers.
    CHECK_DUE = "check_due"  # OWNERSHIP_CHECK_DELAY after the ACK
    # No confirmation for a whole lease by our own clock: the gateway gave this copy up
    # and retries the step elsewhere (lease_clock.py).
    LEASE_EXPIRED = "lease_expired"
    ACK_LATE = "ack_late"  # reply_ack_timeout passed, but the gateway is busy ACKing others
    ACK_OVERDUE = "ack_overdue"  # reply_ack_timeout passed and patience ran out
    DEADLINE = "deadline"  # the drain deadline (or a second signal)
    GIVE_UP = "give_up"  # the ownership answers after DEADLINE are in (or timed out)


class Action(Enum):
    __hash__ = object.__hash__

    EXTEND_NOW = "extend_now"  # send this step's lease extension now
    START_BODY = "start_body"  # the lease is confirmed: start the held body
    CANCEL_BODY = "cancel_body"  # cancel the body; BODY_CANCELLED follows
    # Write the reply (built from the body's outcome) on the newest live socket; once
    # written its ACK is due within reply_ack_timeout; no socket took it: REPLY_NOT_WRITTEN.
    SEND_REPLY = "send_reply"
    RESEND_REPLY = "resend_reply"  # write it again on the new socket (no event if it fails)
    ARM_ACK_TIMER = "arm_ack_timer"  # wait another reply_ack_timeout for the ACK
    FLUSH = "flush"  # POST the reply to /v0/connect/flush until accepted
    HAND_BACK = "hand_back"  # build a retryable error reply and deliver it
    # A delivery waiting on the step moves on: the hand-back's (ACKed, or its socket is
    # gone: on to the flush) or a flush between retries (ACKed on a socket).
    WAKE = "wake"
    ACK_AGAIN = "ack_again"  # ACK the repeated forward (never run it twice)
    REMEMBER = "remember"  # keep the delivered reply for a request forwarded again
    LOG_LEASE_LOST = "log_lease_lost"  # step.lease_lost (before the cancel unwinds its stack)
    LOG_LEASE_EXPIRED = "log_lease_expired"  # step.lease_expired (likewise)
    COUNT_LEASE_LOST = "count_lease_lost"
    LOG_ABANDONED = "log_abandoned"  # drain.step_abandoned, counted


class StepTransitionError(RuntimeError):
    """An event the step's state does not accept: a bug in the engine."""

    def __init__(self, state: StepState, event: StepEvent) -> None:
        super().__init__(f"step event {event.value} is not accepted in state {state.value}")
        self.state = state
        self.event = event


S, E, A = StepState, StepEvent, Action
LIVE = frozenset({S.CONFIRMING, S.ACKED, S.OWNED, S.CANCELLING, S.REPLY_SENT, S.FLUSHING,
                  S.HANDING_BACK})
FINAL = frozenset({S.DELIVERED, S.LEASE_LOST, S.ABANDONED})
# Steps whose lease the worker keeps extending (the extender's and a new socket's set).
EXTENDING = frozenset({S.CONFIRMING, S.ACKED, S.OWNED, S.REPLY_SENT, S.FLUSHING,
                       S.HANDING_BACK})
# Steps whose body has not produced a reply (the in-flight gauge; the hand-back's candidates).
RUNNING = frozenset({S.CONFIRMING, S.ACKED, S.OWNED, S.CANCELLING})

Row = tuple[StepState, tuple[Action, ...]]
_ = ()

# Every accepted (state, event). Rows that change nothing are listed too: an absent pair
# is a bug, and the reader sees that "nothing happens" was decided, not forgotten.
TRANSITIONS: dict[tuple[StepState, StepEvent], Row] = {}


def _rows(state: StepState, rows: dict[StepEvent, Row]) -> None:
    for event, row in rows.items():
        TRANSITIONS[state, event] = row


# Gateway frames every live state takes; the per-state tables below override them.
_GATEWAY_DEFAULTS: dict[StepEvent, tuple[Action, ...]] = {
    E.LEASE_EXTENDED: _, E.LEASE_NACKED: _, E.REPLY_ACKED: _,
    E.REDELIVERED: (A.ACK_AGAIN,), E.GATEWAY_CLOSING: _,
}
for _state in LIVE:
    for _event, _actions in _GATEWAY_DEFAULTS.items():
        TRANSITIONS[_state, _event] = (_state, _actions)
    # Timers are not cancelled per step (see timers.py): a stale tick is a no-op.
    TRANSITIONS[_state, E.CHECK_DUE] = (_state, _)
    TRANSITIONS[_state, E.LEASE_EXPIRED] = (_state, _)
    TRANSITIONS[_state, E.ACK_OVERDUE] = (_state, _)
    TRANSITIONS[_state, E.ACK_LATE] = (_state, _)
    TRANSITIONS[_state, E.DEADLINE] = (_state, _)

_rows(S.CONFIRMING, {
    # The body has not started: it starts only once the gateway grants an extension of
    # this request's lease. Of two copies holding the same lease id after a re-route,
    # only the first to extend gets one; the other never runs its body. Ask at once
    # (the worker sends the first extension right after the ACK), and again on each
    # chance an answer was lost.
    E.CHECK_DUE: (S.CONFIRMING, (A.EXTEND_NOW,)),
    E.GATEWAY_CLOSING: (S.CONFIRMING, (A.EXTEND_NOW,)),
    E.SOCKET_READY: (S.CONFIRMING, (A.EXTEND_NOW,)),
    E.DEADLINE: (S.CONFIRMING, (A.EXTEND_NOW,)),
    E.LEASE_EXTENDED: (S.OWNED, (A.START_BODY,)),
    E.LEASE_NACKED: (S.LEASE_LOST, (A.LOG_LEASE_LOST, A.COUNT_LEASE_LOST)),
    E.LEASE_EXPIRED: (S.LEASE_LOST, (A.LOG_LEASE_EXPIRED, A.COUNT_LEASE_LOST)),
    # Never confirmed, so it may have lost the race: no hand-back (an error reply could
    # beat the owner's answer), no body ran. The gateway retries once the lease lapses.
    E.GIVE_UP: (S.ABANDONED, (A.LOG_ABANDONED,)),
})
_rows(S.ACKED, {
    # Unconfirmed: a re-routed forward whose ACK was on the wire has two holders, and
    # only the first to extend keeps the lease. Ask early, and whenever a socket changes.
    E.CHECK_DUE: (S.ACKED, (A.EXTEND_NOW,)),
    E.GATEWAY_CLOSING: (S.ACKED, (A.EXTEND_NOW,)),
    E.SOCKET_READY: (S.ACKED, (A.EXTEND_NOW,)),
    E.DEADLINE: (S.ACKED, (A.EXTEND_NOW,)),
    E.LEASE_EXTENDED: (S.OWNED, _),
    E.LEASE_NACKED: (S.CANCELLING, (A.LOG_LEASE_LOST, A.CANCEL_BODY)),
    E.LEASE_EXPIRED: (S.CANCELLING, (A.LOG_LEASE_EXPIRED, A.CANCEL_BODY)),
    E.BODY_DONE: (S.REPLY_SENT, (A.SEND_REPLY,)),
    # Never confirmed: it may have lost a re-route race, and an error reply from it
    # could beat the real owner's answer into the reply buffer. No hand-back.
    E.GIVE_UP: (S.ABANDONED, (A.LOG_ABANDONED, A.CANCEL_BODY)),
})
_rows(S.OWNED, {
    # Each new socket extends every lease at once: the time without one ate into them.
    E.SOCKET_READY: (S.OWNED, (A.EXTEND_NOW,)),
    E.LEASE_EXTENDED: (S.OWNED, _),
    # Our lease expired (a long disconnect) and another copy took it.
    E.LEASE_NACKED: (S.CANCELLING, (A.LOG_LEASE_LOST, A.CANCEL_BODY)),
    E.LEASE_EXPIRED: (S.CANCELLING, (A.LOG_LEASE_EXPIRED, A.CANCEL_BODY)),
    E.BODY_DONE: (S.REPLY_SENT, (A.SEND_REPLY,)),
    # Handed back so Inngest retries at once rather than after the lease lapses.
    E.GIVE_UP: (S.HANDING_BACK, (A.LOG_ABANDONED, A.CANCEL_BODY, A.HAND_BACK)),
})
_rows(S.CANCELLING, {
    E.SOCKET_READY: (S.CANCELLING, _),
    E.BODY_CANCELLED: (S.LEASE_LOST, (A.COUNT_LEASE_LOST,)),
    E.GIVE_UP: (S.ABANDONED, (A.LOG_ABANDONED,)),
})
_rows(S.REPLY_SENT, {
    E.REPLY_ACKED: (S.DELIVERED, (A.REMEMBER,)),
    E.REPLY_NOT_WRITTEN: (S.FLUSHING, (A.FLUSH,)),
    E.SOCKET_LOST: (S.FLUSHING, (A.FLUSH,)),
    # The gateway is still working through a burst of ACKs: flushing now only adds load.
    E.ACK_LATE: (S.REPLY_SENT, (A.ARM_ACK_TIMER,)),
    E.ACK_OVERDUE: (S.FLUSHING, (A.FLUSH,)),
    E.SOCKET_READY: (S.REPLY_SENT, (A.EXTEND_NOW, A.RESEND_REPLY)),
    # Replies not acknowledged by now stay so: the process is about to exit.
    E.GIVE_UP: (S.ABANDONED, (A.LOG_ABANDONED,)),
})
_rows(S.FLUSHING, {
    E.REPLY_ACKED: (S.DELIVERED, (A.REMEMBER, A.WAKE)),  # (a flush between retries)
    E.FLUSHED: (S.DELIVERED, (A.REMEMBER,)),
    # Sent both ways: the gateway stores replies set-if-absent and ACKs duplicates.
    E.SOCKET_READY: (S.FLUSHING, (A.EXTEND_NOW, A.RESEND_REPLY)),
    E.SOCKET_LOST: (S.FLUSHING, _),
    E.REPLY_NOT_WRITTEN: (S.FLUSHING, _),
    E.GIVE_UP: (S.ABANDONED, (A.LOG_ABANDONED,)),
})
_rows(S.HANDING_BACK, {
    # Its delivery (socket, then flush) is one coroutine that watches the state.
    E.REPLY_ACKED: (S.DELIVERED, (A.WAKE,)),
    E.FLUSHED: (S.DELIVERED, (A.WAKE,)),
    E.SOCKET_READY: (S.HANDING_BACK, (A.EXTEND_NOW, A.RESEND_REPLY)),
    E.SOCKET_LOST: (S.HANDING_BACK, (A.WAKE,)),
    E.REPLY_NOT_WRITTEN: (S.HANDING_BACK, _),
    E.BODY_CANCELLED: (S.HANDING_BACK, _),
})
# Late news for a step that has left: a flush that was already posting, a cancelled body
# whose cancellation lands after the drain gave up, an ACK racing a flush.
for _state in FINAL:
    TRANSITIONS[_state, E.FLUSHED] = (_state, _)
    TRANSITIONS[_state, E.REPLY_ACKED] = (_state, _)
# A handed-back step's hand-back reply can be delivered before its body's cancellation
# lands (found by the random-order test).
TRANSITIONS[S.ABANDONED, E.BODY_CANCELLED] = (S.ABANDONED, _)
TRANSITIONS[S.DELIVERED, E.BODY_CANCELLED] = (S.DELIVERED, _)


@dataclass(eq=False, slots=True)
class Step:
    """One ACKed request: its state (the ledger's) and what the worker needs to act.

    ``task``, ``sent_on`` and ``wake`` are the worker's handles on I/O (the body's future,
    the socket that carried the reply, the hand-back's waiter); the state is only changed
    by ``Ledger.fire``.
    """

    request: ExecutorRequest
    lease_id: str
    started_at: float  # monotonic seconds at the ACK
    echo: bytes  # codec.request_echo(request): the ACK's payload, reused by extensions
    state: StepState = S.ACKED
    task: asyncio.Future[Any] | None = None  # the body (None while queued)
    reply: bytes | None = None
    sent_on: object | None = None  # the session that last carried the reply
    sent_at: float = 0.0
    wake: Any = None  # asyncio.Event while the hand-back delivery waits
    # When the lease lapses unless the gateway confirms it again (monotonic; lease_clock.py).
    lease_deadline: float = 0.0

    @property
    def extending(self) -> bool:
        """Whether the worker still extends this step's lease (lease_clock.Leased)."""
        return self.state in EXTENDING


class Arrival(Enum):
    """What an executor request that just arrived is, for the ledger."""

    NEW = "new"  # ACK it and run it
    NOT_ROUTABLE = "not_routable"  # draining or paused socket: no ACK, the gateway re-routes
    IN_FLIGHT = "in_flight"  # ours already (our ACK was lost): ACK again, never run twice
    DELIVERED = "delivered"  # answered already: ACK again and resend the stored reply


class Ledger:
    """Every step's state, the transitions between them, and the delivered replies."""

    def __init__(self, *, kept: int = 1024, ttl: float = 60.0) -> None:
        self.steps: dict[str, Step] = {}  # live steps by request id, in ACK order
        # request id -> (delivered at, reply), oldest first; bounded by ``kept`` and ``ttl``
        self._delivered: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._kept = kept
        self._ttl = ttl

    def arrive(self, request_id: str, *, routable: bool) -> Arrival:
        """Classify a forwarded request (before any ACK)."""
        if request_id in self.steps:
            return Arrival.IN_FLIGHT
        if request_id in self._delivered:
            return Arrival.DELIVERED
        return Arrival.NEW if routable else Arrival.NOT_ROUTABLE

    def open(self, request: ExecutorRequest, echo: bytes, now: float, *,
             confirm: bool = False) -> Step:
        """The ACK for a NEW request is written: the step exists, in ACKED (CONFIRMING
        with confirm-before-run: the worker then extends at once, START_BODY follows)."""
        step = Step(request, request.lease_id, now, echo,
                    S.CONFIRMING if confirm else S.ACKED)
        self.steps[request.request_id] = step
        return step

    def fire(self, step: Step, event: StepEvent) -> tuple[Action, ...]:
        """Apply ``event`` to ``step``; return what the worker must do, in order."""
        try:
            state, actions = TRANSITIONS[step.state, event]
        except KeyError:
            raise StepTransitionError(step.state, event) from None
        if state is not step.state:
            step.state = state
            if state in FINAL:
                self.steps.pop(step.request.request_id, None)
        return actions

    def remember(self, request_id: str, reply: bytes, now: float) -> None:
        """Keep a delivered reply (REMEMBER) while the gateway may forward it again."""
        recent = self._delivered
        recent[request_id] = (now, reply)
        while recent:
            oldest_at = next(iter(recent.values()))[0]
            if len(recent) <= self._kept and now - oldest_at < self._ttl:
                break
            recent.popitem(last=False)

    def delivered_reply(self, request_id: str, now: float) -> tuple[bytes, float] | None:
        """The stored reply of a delivered request and how long ago it was delivered."""
        found = self._delivered.get(request_id)
        if found is None:
            return None
        return found[1], now - found[0]

    def in_state(self, states: frozenset[StepState]) -> list[Step]:
        return [step for step in self.steps.values() if step.state in states]


def table_markdown() -> str:
    """The transition table as Markdown (printed in docs/design.md): one line per state
    and outcome, the events that lead to it joined."""
    grouped: dict[tuple[StepState, StepState, tuple[Action, ...]], list[StepEvent]] = {}
    for (state, event), (target, actions) in sorted(
        TRANSITIONS.items(), key=lambda item: (_order(item[0][0]), _order(item[0][1]))
    ):
        grouped.setdefault((state, target, actions), []).append(event)
    lines = ["| state | events | next state | actions |", "| --- | --- | --- | --- |"]
    for (state, target, actions), events in grouped.items():
        names = ", ".join(a.value for a in actions) or "-"
        same = "(same)" if target is state else f"**{target.value}**"
        lines.append(f"| {state.value} | {', '.join(e.value for e in events)} | {same} "
                     f"| {names} |")
    return "\n".join(lines) + "\n"


def _order(member: Enum) -> int:
    return list(type(member)).index(member)


BEGIN = "<!-- step-table: generated by connect_worker.engine.steps.table_markdown -->\n"
END = "<!-- step-table: end -->\n"


def with_table(text: str) -> str:
    """``text`` with the region between BEGIN and END replaced by the current table."""
    head, found, rest = text.partition(BEGIN)
    _old, found_end, tail = rest.partition(END)
    if not found or not found_end:
        raise ValueError("the step-table markers are missing")
    return head + BEGIN + table_markdown() + END + tail


if __name__ == "__main__":  # pragma: no cover
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as file:
            text = file.read()
        with open(path, "w", encoding="utf-8") as file:
            file.write(with_table(text))
