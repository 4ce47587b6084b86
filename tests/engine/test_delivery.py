"""Unit tests of the delivery (engine/delivery.py) with fakes: no socket, no HTTP.

A fake session records the frames written on it, a fake gateway API records (or fails)
the flushes, ``fire`` applies each event to the real step ledger and records it, and the
ACK deadlines run on a fake clock. These are fast enough for mutation testing
(``scripts/delivery_mutants.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from connect_worker.engine import delivery as delivery_module
from connect_worker.engine.delivery import FLUSH_CONCURRENCY, Delivery, build_reply
from connect_worker.engine.executor import Outcome
from connect_worker.engine.steps import Ledger, Step, StepEvent, StepState
from connect_worker.engine.timers import REPLY_ACK_PATIENCE
from connect_worker.errors import GatewayError
from connect_worker.ops.metrics import WorkerMetrics
from connect_worker.protocol import WorkerConnection, pb

from .test_steps import opened, request
from .test_units import FakeLoop

S, E = StepState, StepEvent
TIMEOUT = 2.0  # reply_ack_timeout


class FakeConn:
    live = True


class FakeSession:
    """Records what the delivery writes; ``accept=False``: the write does not go out."""

    def __init__(self, name: str = "conn-1", *, accept: bool = True) -> None:
        self.id = name
        self.conn = FakeConn()
        self.accept = accept
        self.sent: list[tuple[Callable[..., bytes], tuple[Any, ...]]] = []

    def send_now(self, build: Callable[..., bytes], *args: Any) -> bool:
        if not self.accept:
            return False
        self.sent.append((build, args))
        return True


class FakeAPI:
    """``flush`` fails ``failures`` times (503), then accepts; ``gate`` holds each call."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.posted: list[bytes] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.failed = asyncio.Event()  # a flush failed
        self.full = asyncio.Event()  # FLUSH_CONCURRENCY flushes in flight

    async def flush(self, sdk_response: bytes) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= FLUSH_CONCURRENCY:
            self.full.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            self.posted.append(sdk_response)
            if self.failures:
                self.failures -= 1
                self.failed.set()
                raise GatewayError("/v0/connect/flush answered HTTP 503", status=503)
        finally:
            self.in_flight -= 1


class Harness:
    def __init__(self, session: FakeSession | None = None) -> None:
        self.ledger = Ledger()
        self.registry = CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.session: FakeSession | None = session
        self.events: list[tuple[str, StepEvent]] = []
        self.spawned: list[Step] = []
        self.delivery = Delivery(
            self.ledger, self.metrics, reply_ack_timeout=TIMEOUT, fire=self.fire,
            live_session=lambda: self.session,  # type: ignore[arg-type,return-value]
            spawn=self.spawned.append)
        self.loop = FakeLoop()
        self.delivery._acks._loop = self.loop  # type: ignore[assignment]

    def fire(self, step: Step, event: StepEvent) -> None:
        self.events.append((step.request.request_id, event))
        self.ledger.fire(step, event)

    def step(self, n: int = 1, state: StepState = S.REPLY_SENT) -> Step:
        _, step = opened(self.ledger, n)
        step.reply = f"reply-{n}".encode()
        step.state = state
        return step

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Let the other tasks run until ``predicate`` holds. The fakes never wait on I/O or
    on a clock, so a few turns of the loop are enough; a bound keeps a bug from hanging."""
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Flush retries without waiting (the backoff itself is tested in test_units); the
    (minimum, maximum) each flush asked for."""
    asked: list[tuple[float, float]] = []

    def zeros(minimum: float, maximum: float) -> Iterator[float]:
        asked.append((minimum, maximum))
        while True:
            yield 0.0

    monkeypatch.setattr(delivery_module, "backoff_delays", zeros)
    return asked


@pytest.fixture(autouse=True)
def traced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The span events delivery adds to each step's trace: (request id, name)."""
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(delivery_module.tracing, "step_event",
                        lambda step, name: seen.append((step.request.request_id, name)))
    return seen


# ----- the reply ----------------------------------------------------------------------------


def test_build_reply_carries_every_field_of_the_outcome() -> None:
    outcome = Outcome(status=pb.SDKResponseStatus.ERROR, body=b'{"x":1}', no_retry=True,
                      retry_after="7", sdk_version="py:v9", request_version=2)
    got = pb.SDKResponse.FromString(build_reply(request(3), outcome))
    assert (got.request_id, got.run_id, got.status, got.body) == (
        "req-3", "run-3", pb.SDKResponseStatus.ERROR, b'{"x":1}')
    assert (got.no_retry, got.retry_after, got.sdk_version, got.request_version) == (
        True, "7", "py:v9", 2)
    plain = pb.SDKResponse.FromString(build_reply(request(), Outcome(
        status=pb.SDKResponseStatus.DONE, body=b"[]")))
    assert not plain.no_retry and not plain.HasField("retry_after")


# ----- writing it ---------------------------------------------------------------------------


def test_send_reply_writes_on_the_live_socket_and_arms_the_ack_deadline(
        traced: list[tuple[str, str]]) -> None:
    h = Harness(FakeSession())
    step = h.step()
    before = time.monotonic()
    h.delivery.send_reply(step)
    assert h.session is not None and h.session.sent == [(WorkerConnection.reply, (b"reply-1",))]
    assert step.sent_on is h.session and before <= step.sent_at <= time.monotonic()
    assert h.count("connect_worker_replies_sent_total") == 1
    assert traced == [("req-1", "reply.sent")]
    assert h.events == []
    # The ACK deadline: nothing before reply_ack_timeout, then ACK_OVERDUE (no ACK came).
    h.loop.advance(TIMEOUT - 0.1)
    assert h.events == []
    h.loop.advance(TIMEOUT + 0.1)
    assert h.events == [("req-1", E.ACK_OVERDUE)] and step.state is S.FLUSHING


@pytest.mark.parametrize("session", [None, FakeSession(accept=False), "dead"])
def test_send_reply_with_no_socket_to_take_it_is_not_written(session: Any) -> None:
    if session == "dead":
        session = FakeSession()
        session.conn.live = False
    h = Harness(session)
    step = h.step()
    h.delivery.send_reply(step)
    assert h.events == [("req-1", E.REPLY_NOT_WRITTEN)] and step.state is S.FLUSHING
    assert step.sent_on is None and step.sent_at == 0.0
    assert h.count("connect_worker_replies_sent_total") == 0
    assert session is None or session.sent == []
    h.loop.advance(TIMEOUT * 10)  # no ACK deadline was armed
    assert h.events == [("req-1", E.REPLY_NOT_WRITTEN)]


def test_a_write_outside_reply_sent_arms_no_deadline() -> None:
    """A resend of a reply being flushed (FLUSHING) may be ACKed, but the flush is what
    delivers it: no ACK deadline for it."""
    h = Harness(FakeSession())
    step = h.step(state=S.FLUSHING)
    h.delivery.resend_reply(step)
    assert h.session is not None and len(h.session.sent) == 1 and step.sent_on is h.session
    h.loop.advance(TIMEOUT * 10)
    assert h.events == []


def test_resend_reply_with_no_socket_does_nothing() -> None:
    h = Harness(None)
    step = h.step()
    h.delivery.resend_reply(step)
    assert h.events == [] and step.sent_on is None
    h.session = FakeSession()
    h.delivery.resend_reply(step)
    assert len(h.session.sent) == 1 and step.sent_on is h.session


# ----- the ACK deadline ---------------------------------------------------------------------


def test_a_late_ack_waits_while_the_gateway_acks_others_on_the_same_socket() -> None:
    h = Harness(FakeSession())
    step = h.step()
    h.delivery.send_reply(step)
    h.delivery.last_reply_ack_at = time.monotonic() + 3600  # an ACK for another reply: now
    h.loop.advance(TIMEOUT + 0.1)
    assert h.events == [("req-1", E.ACK_LATE)] and step.state is S.REPLY_SENT
    # ACK_LATE re-arms the deadline (the ledger's ARM_ACK_TIMER).
    h.delivery.arm_ack_timer(step)
    h.loop.advance(2 * TIMEOUT)
    assert len(h.events) == 1
    h.loop.advance(2 * TIMEOUT + 0.2)
    assert h.events == [("req-1", E.ACK_LATE)] * 2


def test_patience_runs_out_after_its_limit() -> None:
    h = Harness(FakeSession())
    step = h.step()
    h.delivery.send_reply(step)
    step.sent_at = time.monotonic() - REPLY_ACK_PATIENCE * TIMEOUT  # waited long enough
    h.delivery.last_reply_ack_at = time.monotonic() + 3600
    h.loop.advance(TIMEOUT + 0.1)
    assert h.events == [("req-1", E.ACK_OVERDUE)]


def test_a_late_ack_on_an_old_socket_goes_to_the_flush() -> None:
    h = Harness(FakeSession("old"))
    step = h.step()
    h.delivery.send_reply(step)
    h.session = FakeSession("new")  # the reply's socket is no longer the live one
    h.delivery.last_reply_ack_at = time.monotonic() + 3600
    h.loop.advance(TIMEOUT + 0.1)
    assert h.events == [("req-1", E.ACK_OVERDUE)]


def test_a_late_ack_with_no_socket_at_all_goes_to_the_flush() -> None:
    h = Harness(FakeSession())
    step = h.step()
    h.delivery.send_reply(step)
    h.session = None
    h.delivery.last_reply_ack_at = time.monotonic() + 3600
    h.loop.advance(TIMEOUT + 0.1)
    assert h.events == [("req-1", E.ACK_OVERDUE)]


def test_a_deadline_for_a_step_that_left_the_ledger_is_ignored() -> None:
    h = Harness(FakeSession())
    done, live = h.step(1), h.step(2)
    h.delivery.send_reply(done)
    h.delivery.send_reply(live)
    h.fire(done, E.REPLY_ACKED)  # DELIVERED: out of the ledger
    assert "req-1" not in h.ledger.steps
    h.loop.advance(TIMEOUT + 0.1)
    assert h.events == [("req-1", E.REPLY_ACKED), ("req-2", E.ACK_OVERDUE)]


def test_reply_acked_counts_and_feeds_patience(traced: list[tuple[str, str]]) -> None:
    h = Harness(FakeSession())
    step = h.step()
    before = time.monotonic()
    h.delivery.reply_acked(step)
    assert h.count("connect_worker_reply_acks_total") == 1
    assert traced == [("req-1", "reply.acked")]
    assert before <= h.delivery.last_reply_ack_at <= time.monotonic()


def test_stop_clears_the_deadlines_and_starts_no_flush_until_started_again() -> None:
    h = Harness(FakeSession())
    step = h.step()
    h.delivery.send_reply(step)
    h.delivery.stop()
    assert h.delivery.closing
    h.loop.advance(TIMEOUT * 10)
    assert h.events == []
    h.delivery.flush(step)
    assert h.spawned == []
    h.delivery.start(FakeAPI())  # type: ignore[arg-type]
    assert not h.delivery.closing
    h.delivery.flush(step)
    assert h.spawned == [step]


def test_redelivered_answers_with_the_stored_reply_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    session = FakeSession("conn-9")
    with caplog.at_level(logging.WARNING, logger="connect_worker.engine.delivery"):
        h.delivery.redelivered(session, request(4), b"kept", 1.23456)  # type: ignore[arg-type]
    assert session.sent == [(WorkerConnection.reply, (b"kept",))]
    [record] = [r for r in caplog.records if "request.redelivered" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.fields == {"conn_id": "conn-9", "request_id": "req-4",  # type: ignore[attr-defined]
                             "run_id": "run-4", "delivered_ago": 1.235}


# ----- the flush ----------------------------------------------------------------------------


async def test_flush_posts_the_reply_once_and_reports_it(
        caplog: pytest.LogCaptureFixture, traced: list[tuple[str, str]]) -> None:
    h = Harness()
    api = FakeAPI()
    h.delivery.start(api)  # type: ignore[arg-type]
    step = h.step(state=S.FLUSHING)
    with caplog.at_level(logging.INFO, logger="connect_worker.engine.delivery"):
        await h.delivery.run_flush(step)
    assert api.posted == [b"reply-1"]
    assert h.events == [("req-1", E.FLUSHED)] and step.state is S.DELIVERED
    assert h.count("connect_worker_flushes_total", outcome="ok") == 1
    assert h.count("connect_worker_flushes_total", outcome="error") == 0
    assert traced == [("req-1", "reply.flushed")]
    [flushed] = [r for r in caplog.records if r.getMessage() == "reply.flushed"]
    assert flushed.fields == {"request_id": "req-1",  # type: ignore[attr-defined]
                              "function": "app-f", "draining": False}


async def test_a_failed_flush_is_retried_until_accepted(
        caplog: pytest.LogCaptureFixture, backoffs: list[tuple[float, float]]) -> None:
    h = Harness()
    api = FakeAPI(failures=2)
    h.delivery.start(api)  # type: ignore[arg-type]
    step = h.step(state=S.FLUSHING)
    with caplog.at_level(logging.INFO, logger="connect_worker.engine.delivery"):
        await h.delivery.run_flush(step)
    assert api.posted == [b"reply-1"] * 3
    assert h.events == [("req-1", E.FLUSHED)]
    # The first retry within 0.1 s, none more than FLUSH_MAX_BACKOFF apart.
    assert backoffs == [(0.1, 5.0)] and delivery_module.FLUSH_MAX_BACKOFF == 5.0
    assert h.count("connect_worker_flushes_total", outcome="error") == 2
    assert h.count("connect_worker_flushes_total", outcome="ok") == 1
    failed = [r for r in caplog.records if r.getMessage() == "reply.flush_failed"]
    assert len(failed) == 2 and all(r.levelno == logging.WARNING for r in failed)
    assert failed[0].fields == {"request_id": "req-1",  # type: ignore[attr-defined]
                                "error": "/v0/connect/flush answered HTTP 503",
                                "retry_in": 0.0}


async def test_wake_ends_the_wait_between_flush_attempts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Between attempts the flush waits its backoff, or until woken (a new socket): an
    hour-long backoff here, so only the wake can end it."""
    monkeypatch.setattr(delivery_module, "backoff_delays", lambda _a, _b: iter([3600.0] * 9))
    h = Harness()
    api = FakeAPI(failures=1)
    h.delivery.start(api)  # type: ignore[arg-type]
    step = h.step(state=S.FLUSHING)
    task = asyncio.create_task(h.delivery.run_flush(step))
    await api.failed.wait()
    await until(lambda: step.wake is not None, "the flush waits on step.wake")
    assert step.wake is not None and not task.done() and len(api.posted) == 1
    h.delivery.wake(step)
    async with asyncio.timeout(30):
        await task
    assert len(api.posted) == 2 and step.state is S.DELIVERED


def test_wake_without_a_waiter_does_nothing() -> None:
    h = Harness()
    step = h.step()
    h.delivery.wake(step)  # no error, nothing fired
    assert step.wake is None and h.events == []


async def test_a_reply_acked_while_its_flush_waited_for_a_slot_is_not_posted() -> None:
    h = Harness()
    api = FakeAPI()
    api.gate = asyncio.Event()
    h.delivery.start(api)  # type: ignore[arg-type]
    busy = [h.step(n, S.FLUSHING) for n in range(1, FLUSH_CONCURRENCY + 1)]
    waiting = h.step(99, S.FLUSHING)
    tasks = [asyncio.create_task(h.delivery.run_flush(s)) for s in [*busy, waiting]]
    await api.full.wait()
    # Tasks take their first step in the order they were made, so the last one is
    # already waiting for a slot by now.
    await until(lambda: api.in_flight == FLUSH_CONCURRENCY, "every slot taken")
    assert api.in_flight == FLUSH_CONCURRENCY  # the last one waits for a slot
    h.fire(waiting, E.REPLY_ACKED)  # ACKed on a socket meanwhile
    api.gate.set()
    async with asyncio.timeout(30):
        await asyncio.gather(*tasks)
    assert b"reply-99" not in api.posted and len(api.posted) == FLUSH_CONCURRENCY
    assert api.most_in_flight == FLUSH_CONCURRENCY
    assert ("req-99", E.FLUSHED) not in h.events


async def test_a_flush_ends_when_the_step_is_no_longer_flushing() -> None:
    h = Harness()
    api = FakeAPI()
    h.delivery.start(api)  # type: ignore[arg-type]
    step = h.step(state=S.DELIVERED)
    await h.delivery.run_flush(step)
    assert api.posted == [] and h.events == []


# ----- the hand-back ------------------------------------------------------------------------


async def test_hand_back_acked_on_the_socket_needs_no_flush() -> None:
    h = Harness(FakeSession())
    api = FakeAPI()
    h.delivery.start(api)  # type: ignore[arg-type]
    step = h.step(state=S.HANDING_BACK)
    task = asyncio.create_task(h.delivery.hand_back(step, ack_timeout=3600))
    await until(lambda: h.session is not None and len(h.session.sent) == 1,
                "the hand-back written on the socket")  # then it waits for the ACK
    assert h.session is not None and len(h.session.sent) == 1 and step.sent_on is h.session
    assert not task.done()
    h.fire(step, E.REPLY_ACKED)  # the ledger: DELIVERED, and WAKE
    h.delivery.wake(step)
    async with asyncio.timeout(30):
        await task
    assert api.posted == [] and step.state is S.DELIVERED


async def test_hand_back_unacked_in_time_goes_to_the_flush() -> None:
    h = Harness(FakeSession())
    api = FakeAPI()
    h.delivery.start(api)  # type: ignore[arg-type]
    step = h.step(state=S.HANDING_BACK)
    await h.delivery.hand_back(step, ack_timeout=0)
    assert h.session is not None and len(h.session.sent) == 1
    assert api.posted == [b"reply-1"] and step.state is S.DELIVERED


@pytest.mark.parametrize("session", [None, FakeSession(accept=False)])
async def test_hand_back_with_no_socket_flushes_at_once(session: FakeSession | None) -> None:
    h = Harness(session)
    api = FakeAPI()
    h.delivery.start(api)  # type: ignore[arg-type]
    step = h.step(state=S.HANDING_BACK)
    async with asyncio.timeout(30):  # an hour's ack_timeout: it must not be waited for
        await h.delivery.hand_back(step, ack_timeout=3600)
    assert api.posted == [b"reply-1"] and step.state is S.DELIVERED
