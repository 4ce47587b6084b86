"""The step ledger (engine/steps.py): its table, each race as events in a chosen order,
and Hypothesis over random orders holding the promise's invariants. No sockets, no loop."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from connect_worker.engine import steps
from connect_worker.engine.steps import (
    EXTENDING,
    FINAL,
    LIVE,
    TRANSITIONS,
    Action,
    Arrival,
    Ledger,
    Step,
    StepEvent,
    StepState,
    StepTransitionError,
)
from connect_worker.protocol import ExecutorRequest

S, E, A = StepState, StepEvent, Action
DESIGN = pathlib.Path(__file__).parents[2] / "docs" / "design.md"
GATEWAY_EVENTS = (E.LEASE_EXTENDED, E.LEASE_NACKED, E.REPLY_ACKED, E.REDELIVERED,
                  E.GATEWAY_CLOSING)
REPLIES = (A.SEND_REPLY, A.HAND_BACK)  # each builds a reply: at most one per request
SENDS = (A.SEND_REPLY, A.HAND_BACK, A.RESEND_REPLY, A.FLUSH)


def request(n: int = 1) -> ExecutorRequest:
    return ExecutorRequest(
        request_id=f"req-{n}", account_id="a", env_id="e", app_id="app", app_name="app",
        function_id="f", function_slug="app-f", step_id="s", request_payload=b"{}",
        system_trace_ctx=b"", user_trace_ctx=b"", run_id=f"run-{n}", lease_id=f"lease-{n}",
        job_id="",
    )


def opened(ledger: Ledger | None = None, n: int = 1, *,
           confirm: bool = False) -> tuple[Ledger, Step]:
    ledger = ledger or Ledger()
    assert ledger.arrive(f"req-{n}", routable=True) is Arrival.NEW
    return ledger, ledger.open(request(n), b"echo", now=100.0, confirm=confirm)


def run(ledger: Ledger, step: Step, *events: StepEvent) -> list[Action]:
    out: list[Action] = []
    for ev in events:
        out.extend(ledger.fire(step, ev))
    return out


# ----- the table ------------------------------------------------------------------------


def test_design_doc_prints_the_current_table() -> None:
    """docs/design.md's table is generated from TRANSITIONS; regenerate it with
    ``python -m connect_worker.engine.steps docs/design.md``."""
    text = DESIGN.read_text()
    assert steps.with_table(text) == text


def test_every_live_state_takes_every_gateway_event() -> None:
    """A frame from a confused gateway must never raise inside the read callback."""
    for state in LIVE:
        for ev in GATEWAY_EVENTS:
            assert (state, ev) in TRANSITIONS, (state, ev)


def test_an_event_a_state_does_not_take_raises_one_typed_error() -> None:
    ledger, step = opened()
    with pytest.raises(StepTransitionError) as raised:
        ledger.fire(step, E.FLUSHED)  # nothing was ever flushed
    assert raised.value.state is S.ACKED and raised.value.event is E.FLUSHED
    assert step.state is S.ACKED  # unchanged


def test_final_states_leave_the_ledger_and_take_no_new_work() -> None:
    for state in FINAL:
        targets = {TRANSITIONS[state, ev][0] for (s, ev) in TRANSITIONS if s is state}
        assert targets == {state}
        assert all(not TRANSITIONS[state, ev][1] for (s, ev) in TRANSITIONS if s is state)
    ledger, step = opened()
    run(ledger, step, E.BODY_DONE, E.REPLY_ACKED)
    assert step.state is S.DELIVERED and not ledger.steps


# ----- arrivals and the delivered-reply memory ---------------------------------------------


def test_arrivals() -> None:
    ledger, step = opened()
    assert ledger.arrive("req-1", routable=False) is Arrival.IN_FLIGHT
    assert ledger.arrive("req-2", routable=False) is Arrival.NOT_ROUTABLE
    run(ledger, step, E.BODY_DONE, E.REPLY_ACKED)
    ledger.remember("req-1", b"reply", now=101.0)
    assert ledger.arrive("req-1", routable=True) is Arrival.DELIVERED
    assert ledger.delivered_reply("req-1", now=103.0) == (b"reply", 2.0)


def test_delivered_memory_is_bounded_by_count_and_age() -> None:
    ledger = Ledger(kept=3, ttl=10.0)
    for n in range(5):
        ledger.remember(f"r{n}", b"x", now=float(n))
    assert [r for r in ("r0", "r1", "r2", "r3", "r4") if ledger.delivered_reply(r, 5.0)] == [
        "r2", "r3", "r4"]
    ledger.remember("r5", b"x", now=13.5)  # r2 (at 2.0) and r3 (3.0) are older than 10 s
    assert ledger.delivered_reply("r3", 13.5) is None
    assert ledger.delivered_reply("r4", 13.5) is not None


# ----- the races, each as events in the order that hurt -----------------------------------


def test_ack_in_flight_when_the_connection_stops_being_ready() -> None:
    """Our ACK was on the wire as the socket left READY: the gateway re-routed the forward,
    two copies hold one lease id. GATEWAY_CLOSING asks at once; the NACK cancels ours."""
    ledger, step = opened()
    assert run(ledger, step, E.GATEWAY_CLOSING) == [A.EXTEND_NOW]
    assert run(ledger, step, E.LEASE_NACKED) == [A.LOG_LEASE_LOST, A.CANCEL_BODY]
    assert step.state is S.CANCELLING
    assert run(ledger, step, E.BODY_CANCELLED) == [A.COUNT_LEASE_LOST]
    assert step.state is S.LEASE_LOST and not ledger.steps


def test_nack_after_the_body_started_sends_nothing_even_when_asked_to() -> None:
    ledger, step = opened()
    out = run(ledger, step, E.CHECK_DUE, E.LEASE_NACKED, E.SOCKET_READY, E.REPLY_ACKED,
              E.DEADLINE, E.GIVE_UP)
    assert not set(out) & set(SENDS)
    assert A.CANCEL_BODY in out and step.state is S.ABANDONED


def test_body_done_in_the_same_iteration_as_the_nack_is_impossible_by_construction() -> None:
    """Once cancelled, the body's future is cancelled: BODY_DONE cannot follow, and the
    ledger refuses it rather than send a reply for a lease it does not hold."""
    ledger, step = opened()
    run(ledger, step, E.LEASE_NACKED)
    with pytest.raises(StepTransitionError):
        ledger.fire(step, E.BODY_DONE)


def test_reply_ack_lost_goes_to_the_flush() -> None:
    ledger, step = opened()
    assert run(ledger, step, E.BODY_DONE) == [A.SEND_REPLY]
    assert run(ledger, step, E.ACK_LATE) == [A.ARM_ACK_TIMER]  # the gateway is busy
    assert run(ledger, step, E.ACK_OVERDUE) == [A.FLUSH]
    assert run(ledger, step, E.FLUSHED) == [A.REMEMBER]
    assert step.state is S.DELIVERED


def test_socket_drop_between_reply_and_ack_flushes_and_resends_once_each() -> None:
    ledger, step = opened()
    run(ledger, step, E.BODY_DONE)
    assert run(ledger, step, E.SOCKET_LOST) == [A.FLUSH]
    assert run(ledger, step, E.SOCKET_READY) == [A.EXTEND_NOW, A.RESEND_REPLY]
    assert run(ledger, step, E.SOCKET_LOST) == []  # the flush is already running
    assert run(ledger, step, E.REPLY_ACKED) == [A.REMEMBER, A.WAKE]
    assert run(ledger, step, E.FLUSHED) == []  # the POST that was in flight lands late
    assert step.state is S.DELIVERED


def test_reply_with_no_socket_at_all_goes_straight_to_the_flush() -> None:
    ledger, step = opened()
    assert run(ledger, step, E.BODY_DONE, E.REPLY_NOT_WRITTEN) == [A.SEND_REPLY, A.FLUSH]
    assert step.state is S.FLUSHING


def test_drain_during_a_lease_extension_keeps_the_answer() -> None:
    """The extension's answer arriving after DEADLINE still counts: the step is handed
    back (confirmed), not silently abandoned."""
    ledger, step = opened()
    assert run(ledger, step, E.DEADLINE) == [A.EXTEND_NOW]
    run(ledger, step, E.LEASE_EXTENDED)
    assert run(ledger, step, E.GIVE_UP) == [A.LOG_ABANDONED, A.CANCEL_BODY, A.HAND_BACK]
    assert step.state is S.HANDING_BACK
    assert run(ledger, step, E.BODY_CANCELLED, E.SOCKET_LOST) == [A.WAKE]
    assert run(ledger, step, E.FLUSHED) == [A.WAKE] and step.state is S.DELIVERED


def test_unconfirmed_step_at_the_deadline_is_abandoned_without_a_reply() -> None:
    ledger, step = opened()
    out = run(ledger, step, E.DEADLINE, E.GIVE_UP)
    assert out == [A.EXTEND_NOW, A.LOG_ABANDONED, A.CANCEL_BODY]
    assert run(ledger, step, E.BODY_CANCELLED) == [] and step.state is S.ABANDONED


def test_deadline_with_a_reply_unsent_is_logged_not_dropped_silently() -> None:
    ledger, step = opened()
    run(ledger, step, E.BODY_DONE, E.REPLY_NOT_WRITTEN)
    assert run(ledger, step, E.DEADLINE, E.GIVE_UP) == [A.LOG_ABANDONED]
    assert step.state is S.ABANDONED and not ledger.steps


def test_a_reply_still_unacknowledged_at_the_deadline_is_logged_and_given_up() -> None:
    ledger, step = opened()
    run(ledger, step, E.BODY_DONE, E.DEADLINE)
    assert step.state is S.REPLY_SENT
    assert run(ledger, step, E.GIVE_UP) == [A.LOG_ABANDONED]
    assert step.state is S.ABANDONED and not ledger.steps


def test_redelivery_of_an_in_flight_request_acks_again_and_never_runs_twice() -> None:
    ledger, step = opened()
    assert ledger.arrive("req-1", routable=True) is Arrival.IN_FLIGHT
    assert run(ledger, step, E.REDELIVERED) == [A.ACK_AGAIN]
    assert step.state is S.ACKED


def test_redelivery_of_a_delivered_request_resends_the_stored_reply() -> None:
    """The soak's case: the gateway never counted our ACK and forwarded the request again
    once this worker was routable, after the reply was delivered."""
    ledger, step = opened()
    assert run(ledger, step, E.BODY_DONE, E.REPLY_ACKED) == [A.SEND_REPLY, A.REMEMBER]
    ledger.remember("req-1", b"the reply", now=101.0)
    assert ledger.arrive("req-1", routable=True) is Arrival.DELIVERED
    assert ledger.delivered_reply("req-1", 102.0) == (b"the reply", 1.0)


def test_leases_are_extended_on_every_new_socket() -> None:
    """The soak's case: leases lapsed behind a reconnect; a new socket extends them all."""
    for events in ([], [E.LEASE_EXTENDED], [E.BODY_DONE], [E.BODY_DONE, E.SOCKET_LOST]):
        ledger, step = opened()
        run(ledger, step, *events)
        assert step.state in EXTENDING
        assert A.EXTEND_NOW in ledger.fire(step, E.SOCKET_READY)


def test_every_live_state_acks_a_repeated_forward_and_never_runs_it_again() -> None:
    for state in LIVE:
        ledger, step = opened()
        step.state = state
        assert ledger.fire(step, E.REDELIVERED) == (A.ACK_AGAIN,)
        assert step.state is state


@pytest.mark.parametrize("state", [S.ACKED, S.OWNED])
def test_a_running_step_replies_when_done_and_stops_silently_when_its_lease_is_lost(
    state: StepState,
) -> None:
    ledger, step = opened()
    step.state = state
    assert ledger.fire(step, E.BODY_DONE) == (A.SEND_REPLY,)
    ledger, step = opened()
    step.state = state
    assert ledger.fire(step, E.LEASE_NACKED) == (A.LOG_LEASE_LOST, A.CANCEL_BODY)


@pytest.mark.parametrize("state", [S.ACKED, S.OWNED])
def test_a_lease_lapsed_by_our_own_clock_stops_the_copy_silently(state: StepState) -> None:
    """lease_clock.py: no confirmation for a whole lease means the gateway gave this copy
    up; it stops like a NACKed one, and a late reply is never sent."""
    ledger, step = opened()
    step.state = state
    assert ledger.fire(step, E.LEASE_EXPIRED) == (A.LOG_LEASE_EXPIRED, A.CANCEL_BODY)
    assert run(ledger, step, E.SOCKET_READY, E.BODY_CANCELLED) == [A.COUNT_LEASE_LOST]
    assert step.state is S.LEASE_LOST


def test_every_unacknowledged_reply_goes_out_again_on_a_new_socket() -> None:
    for state in (S.REPLY_SENT, S.FLUSHING, S.HANDING_BACK):
        ledger, step = opened()
        step.state = state
        assert ledger.fire(step, E.SOCKET_READY) == (A.EXTEND_NOW, A.RESEND_REPLY)


def test_a_hand_back_acknowledged_on_the_socket_is_delivered_and_wakes_its_delivery() -> None:
    ledger, step = opened()
    run(ledger, step, E.LEASE_EXTENDED, E.DEADLINE, E.GIVE_UP)
    assert run(ledger, step, E.REPLY_ACKED) == [A.WAKE]
    assert step.state is S.DELIVERED and not ledger.steps


def test_a_hand_back_delivered_before_its_body_cancellation_lands() -> None:
    """Found by the random-order test: the body's cancellation can reach the ledger after
    the hand-back reply was delivered; that is late news, not an error."""
    ledger, step = opened()
    run(ledger, step, E.LEASE_EXTENDED, E.DEADLINE, E.GIVE_UP, E.FLUSHED)
    assert run(ledger, step, E.BODY_CANCELLED) == [] and step.state is S.DELIVERED


def test_sub_second_steps_are_checked_early_and_confirmed_ones_are_not() -> None:
    """The soak's case: sub-second steps ran to the end twice before the first
    extension; the ownership check 0.2 s in stops the losing copy."""
    ledger, step = opened()
    assert run(ledger, step, E.CHECK_DUE) == [A.EXTEND_NOW]
    run(ledger, step, E.LEASE_EXTENDED)
    assert run(ledger, step, E.CHECK_DUE, E.GATEWAY_CLOSING, E.DEADLINE) == []


# ----- confirm-before-run (engine/confirm.py) ----------------------------------------------


def test_confirm_before_run_starts_the_body_only_on_a_granted_extension() -> None:
    ledger, step = opened(confirm=True)
    assert step.state is S.CONFIRMING and step.extending
    # Every chance an answer was lost asks again; nothing starts the body but a grant.
    for ev in (E.CHECK_DUE, E.GATEWAY_CLOSING, E.SOCKET_READY):
        assert run(ledger, step, ev) == [A.EXTEND_NOW] and step.state is S.CONFIRMING
    assert run(ledger, step, E.REDELIVERED) == [A.ACK_AGAIN]
    assert run(ledger, step, E.REPLY_ACKED, E.ACK_LATE, E.ACK_OVERDUE) == []
    assert step.state is S.CONFIRMING
    assert run(ledger, step, E.LEASE_EXTENDED) == [A.START_BODY]
    assert step.state is S.OWNED
    assert run(ledger, step, E.LEASE_EXTENDED) == []  # started once
    assert run(ledger, step, E.BODY_DONE) == [A.SEND_REPLY]


def test_confirm_before_run_a_body_that_did_not_start_cannot_finish() -> None:
    ledger, step = opened(confirm=True)
    for ev in (E.BODY_DONE, E.BODY_CANCELLED, E.FLUSHED):
        with pytest.raises(StepTransitionError):
            ledger.fire(step, ev)


def test_confirm_before_run_nack_before_confirm_never_runs_the_body() -> None:
    """The re-route race: the other copy extended first, so ours is NACKed before its
    body started. Nothing to cancel, nothing to send; counted as lease_lost."""
    ledger, step = opened(confirm=True)
    actions = run(ledger, step, E.LEASE_NACKED)
    assert actions == [A.LOG_LEASE_LOST, A.COUNT_LEASE_LOST]
    assert step.state is S.LEASE_LOST and "req-1" not in ledger.steps


def test_confirm_before_run_lease_lapsed_before_confirm_never_runs_the_body() -> None:
    ledger, step = opened(confirm=True)
    assert run(ledger, step, E.LEASE_EXPIRED) == [A.LOG_LEASE_EXPIRED, A.COUNT_LEASE_LOST]
    assert step.state is S.LEASE_LOST


def test_confirm_before_run_socket_lost_before_confirm_asks_again_on_the_new_socket() -> None:
    """The answer died with the socket: the next session's extension (the same lease id;
    the gateway gives the owner its current id back) confirms it, the body starts then."""
    ledger, step = opened(confirm=True)
    assert run(ledger, step, E.SOCKET_READY) == [A.EXTEND_NOW]
    assert run(ledger, step, E.LEASE_EXTENDED) == [A.START_BODY]


def test_confirm_before_run_drain_before_confirm_hands_back_without_running_it() -> None:
    """The deadline asks once more; confirmed then, the step is ours: it is handed back
    (the body, queued for the next loop iteration, never starts: bodies.py starts only
    ACKED/OWNED steps); unconfirmed at GIVE_UP it is abandoned with no reply at all."""
    ledger, step = opened(confirm=True)
    assert run(ledger, step, E.DEADLINE) == [A.EXTEND_NOW]
    assert run(ledger, step, E.LEASE_EXTENDED) == [A.START_BODY]
    assert run(ledger, step, E.GIVE_UP) == [A.LOG_ABANDONED, A.CANCEL_BODY, A.HAND_BACK]
    assert step.state is S.HANDING_BACK
    ledger2, step2 = opened(confirm=True)
    assert run(ledger2, step2, E.DEADLINE, E.GIVE_UP) == [A.EXTEND_NOW, A.LOG_ABANDONED]
    assert step2.state is S.ABANDONED


# ----- random orders ------------------------------------------------------------------------


@dataclass
class World:
    """What the I/O around one step can do next, given what the ledger asked for."""

    step: Step
    body: str = "running"  # waiting (confirm-before-run), running, cancelling, done, cancelled
    confirmed: bool = False  # a LEASE_EXTENDED reached the step
    written: bool = False  # a reply went out on a socket
    flushing: bool = False
    deadline: int = 0  # 0 before, 1 after DEADLINE, 2 after GIVE_UP
    replies: int = 0
    lost_lease_while_running: bool = False
    actions: list[Action] = field(default_factory=list)

    def possible(self) -> list[StepEvent]:
        state = self.step.state
        # Late news can reach a step that has left the ledger.
        out: list[StepEvent] = [E.REPLY_ACKED]
        if self.flushing:
            out.append(E.FLUSHED)
        if self.body == "cancelling":
            out.append(E.BODY_CANCELLED)
        if state not in LIVE:
            return out
        out += [E.LEASE_EXTENDED, E.LEASE_NACKED, E.REDELIVERED, E.GATEWAY_CLOSING,
                E.SOCKET_READY, E.CHECK_DUE, E.ACK_LATE, E.ACK_OVERDUE, E.LEASE_EXPIRED]
        if self.body == "running":
            out.append(E.BODY_DONE)
        if self.written:
            out.append(E.SOCKET_LOST)
        if self.deadline == 0:
            out.append(E.DEADLINE)
        elif self.deadline == 1:
            out.append(E.GIVE_UP)
        return out

    def feed(self, ledger: Ledger, ev: StepEvent, write_ok: bool) -> None:
        before = self.step.state
        if ev is E.DEADLINE:
            self.deadline = 1
        elif ev is E.GIVE_UP:
            self.deadline = 2
        elif ev is E.BODY_DONE:
            self.body = "done"
        elif ev is E.BODY_CANCELLED:
            self.body = "cancelled"
        elif ev is E.FLUSHED:
            self.flushing = False
        elif ev is E.SOCKET_LOST:
            self.written = False
        elif ev is E.LEASE_EXTENDED:
            self.confirmed = True
        actions = ledger.fire(self.step, ev)
        self.actions += actions
        if ev in (E.LEASE_NACKED, E.LEASE_EXPIRED) and before in (S.ACKED, S.OWNED):
            self.lost_lease_while_running = True
            assert A.CANCEL_BODY in actions, "a body kept running after its lease was lost"
        if ev is E.GIVE_UP:
            assert actions, f"{before} had no action at the deadline"
            assert self.step.state in FINAL | {S.HANDING_BACK}
        for action in actions:
            self.act(ledger, action, write_ok)

    def act(self, ledger: Ledger, action: Action, write_ok: bool) -> None:
        if action in REPLIES:
            self.replies += 1
            assert self.replies <= 1, "two replies for one request"
        if action in SENDS:
            assert not self.lost_lease_while_running, "a reply for a lease we lost"
        if action is A.START_BODY:
            assert self.body == "waiting", "a body started twice"
            assert self.confirmed, "a body started before the lease was confirmed"
            self.body = "running"
        elif action is A.CANCEL_BODY:
            assert self.body in ("running", "cancelling")
            self.body = "cancelling"
        elif action is A.FLUSH:
            self.flushing = True
        elif action in (A.SEND_REPLY, A.RESEND_REPLY, A.HAND_BACK):
            if write_ok:
                self.written = True
            elif action is A.SEND_REPLY:
                self.feed(ledger, E.REPLY_NOT_WRITTEN, write_ok)


@seed(18)
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1_000), st.booleans()), max_size=40))
def test_random_event_orders_keep_the_promise(choices: list[tuple[int, bool]]) -> None:
    ledger, step = opened()
    _play(ledger, step, World(step), choices)


@seed(1826)
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1_000), st.booleans()), max_size=40))
def test_random_event_orders_with_confirm_before_run(choices: list[tuple[int, bool]]) -> None:
    """The same promise, and: a body starts at most once, only after a granted extension,
    and a step whose lease was lost before that never runs it."""
    ledger, step = opened(confirm=True)
    world = World(step, body="waiting")
    _play(ledger, step, world, choices)
    if not world.confirmed:
        assert world.body == "waiting"


def _play(ledger: Ledger, step: Step, world: World, choices: list[tuple[int, bool]]) -> None:
    for pick, write_ok in choices:
        possible = world.possible()
        world.feed(ledger, possible[pick % len(possible)], write_ok)
        assert (step.request.request_id in ledger.steps) == (step.state in LIVE)
    if step.state is S.LEASE_LOST:
        assert world.body in ("cancelled", "waiting")  # waiting: never started
    if world.lost_lease_while_running:
        assert world.body in ("cancelling", "cancelled")


@seed(1818)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(StepEvent)), max_size=30))
def test_gateway_and_timer_events_never_raise_in_a_live_state(events: list[StepEvent]) -> None:
    """Whatever the gateway sends and whenever timers tick, the ledger does not raise."""
    outside = [ev for ev in events if ev in GATEWAY_EVENTS or ev in (
        E.SOCKET_READY, E.CHECK_DUE, E.ACK_LATE, E.ACK_OVERDUE, E.LEASE_EXPIRED)]
    for state in LIVE:
        ledger, step = opened()
        step.state = state
        for ev in outside:
            if step.state in LIVE:
                ledger.fire(step, ev)
