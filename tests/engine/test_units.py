"""Unit tests of the engine's small parts: deadlines, backoff, ACK patience, is_fatal,
the "something changed" signal, and the user-loop bridge (UserLoop, _Inbox)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable

import pytest

from connect_worker.engine import timers
from connect_worker.engine.supervisor import MAX_CONSECUTIVE_SYNC_FAILURES, is_fatal
from connect_worker.engine.timers import (
    REPLY_ACK_PATIENCE,
    Changes,
    Deadlines,
    ack_still_patient,
    backoff_delays,
)
from connect_worker.engine.userloop import DRAIN_BATCH, UserLoop, _Inbox
from connect_worker.errors import (
    AuthError,
    GatewayError,
    LocalProtocolError,
    RemoteProtocolError,
    SyncError,
    TransportError,
)

# ----- backoff, patience, is_fatal -----------------------------------------------------------


def test_backoff_doubles_to_its_cap_with_equal_jitter() -> None:
    random.seed(18)
    delays = backoff_delays(0.5, 4.0)
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for ceiling in ceilings:
        delay = next(delays)
        assert ceiling / 2 <= delay <= ceiling


def test_ack_patience() -> None:
    t = 1.0
    now = 100.0
    # The gateway ACKed something within the timeout, the socket is the live one.
    assert ack_still_patient(now=now, sent_at=now - t, last_reply_ack_at=now - 0.5,
                             timeout=t, same_socket=True)
    assert not ack_still_patient(now=now, sent_at=now - t, last_reply_ack_at=now - 0.5,
                                 timeout=t, same_socket=False)
    assert not ack_still_patient(now=now, sent_at=now - t, last_reply_ack_at=now - 1.5,
                                 timeout=t, same_socket=True)
    assert not ack_still_patient(now=now, sent_at=now - REPLY_ACK_PATIENCE * t,
                                 last_reply_ack_at=now, timeout=t, same_socket=True)


@pytest.mark.parametrize(("exc", "sync_failures", "fatal"), [
    (AuthError("refused", status=401), 0, True),
    (LocalProtocolError("our bug"), 0, True),
    (SyncError("rejected"), MAX_CONSECUTIVE_SYNC_FAILURES - 1, False),
    (SyncError("rejected"), MAX_CONSECUTIVE_SYNC_FAILURES, True),
    (GatewayError("503", status=503), 99, False),
    (TransportError("reset"), 0, False),
    (RemoteProtocolError("garbage"), 0, False),
])
def test_is_fatal(exc: BaseException, sync_failures: int, fatal: bool) -> None:
    assert is_fatal(exc, sync_failures) is fatal


# ----- Deadlines (on a fake loop: time is whatever the test says) ---------------------------


class _Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Handle:
        handle = _Handle(when, callback)
        self.timers.append(handle)
        return handle

    def advance(self, to: float) -> None:
        self.now = to
        while due := [h for h in self.timers if h.when <= to and not h.cancelled]:
            handle = min(due, key=lambda h: h.when)
            self.timers.remove(handle)
            handle.callback()


def deadlines(delay: float) -> tuple[Deadlines, FakeLoop, list[list[str]]]:
    fired: list[list[str]] = []
    loop = FakeLoop()
    made = Deadlines(delay, fired.append)
    made._loop = loop  # type: ignore[assignment]
    return made, loop, fired


def test_deadlines_fire_after_their_delay_together_on_one_timer() -> None:
    made, loop, fired = deadlines(1.0)
    made.add("a")
    made.add("b")
    assert len(loop.timers) == 1  # one timer, however many deadlines
    loop.advance(0.99)
    assert fired == []
    loop.advance(1.0)
    assert fired == [["a", "b"]]


def test_deadlines_later_keys_wait_for_their_own_time() -> None:
    made, loop, fired = deadlines(1.0)
    made.add("first")
    loop.now = 0.5
    made.add("second")  # due at 1.5
    loop.advance(1.0)
    assert fired == [["first"]]
    loop.advance(1.49)
    assert fired == [["first"]]
    loop.advance(1.5)
    assert fired == [["first"], ["second"]]


def test_deadlines_fire_at_most_every_granularity() -> None:
    made, loop, fired = deadlines(1.0)
    made.add("a")
    loop.now = 0.001
    made.add("b")  # due 1 ms after "a": grouped into the next tick, not a timer of its own
    loop.advance(1.0)
    assert fired == [["a"]]
    [next_timer] = [h for h in loop.timers if not h.cancelled]
    assert next_timer.when == pytest.approx(1.0 + timers.DEADLINE_GRANULARITY)
    loop.advance(next_timer.when)
    assert fired == [["a"], ["b"]]


def test_deadlines_clear_cancels_everything() -> None:
    made, loop, fired = deadlines(1.0)
    made.add("a")
    [timer] = loop.timers
    made.clear()
    assert timer.cancelled
    loop.advance(5.0)
    assert fired == []


# ----- Changes --------------------------------------------------------------------------------


async def test_changes_wakes_waiters_and_rechecks() -> None:
    changes = Changes()
    value = {"n": 0}
    changes.notify()  # nobody waits: nothing to do
    waiter = asyncio.ensure_future(changes.wait_until(lambda: value["n"] >= 2))
    await asyncio.sleep(0)
    value["n"] = 1
    changes.notify()
    await asyncio.sleep(0)
    assert not waiter.done()  # re-checked, still false
    value["n"] = 2
    changes.notify()
    await asyncio.wait_for(waiter, 5)


# ----- the user-loop bridge --------------------------------------------------------------------


async def test_userloop_runs_on_its_own_thread_and_returns_to_the_caller() -> None:
    user = UserLoop()
    user.start()
    try:
        async def where() -> str:
            return threading.current_thread().name

        done: list[object] = []
        future = user.submit(where(), done.append)
        assert await asyncio.wait_for(future, 5) == "connect-worker-user"
        assert done == [future]  # on_done called once, with the future
    finally:
        user.stop()


async def test_userloop_cancelling_the_future_cancels_the_user_task() -> None:
    user = UserLoop()
    user.start()
    started = threading.Event()
    cancelled = threading.Event()
    try:
        async def forever() -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        calls: list[asyncio.Future[None]] = []
        future = user.submit(forever(), calls.append)
        await asyncio.to_thread(started.wait, 5)
        future.cancel()
        assert await asyncio.to_thread(cancelled.wait, 5)
        await asyncio.sleep(0)  # on_done is scheduled on this loop
        assert calls == [future] and future.cancelled()
    finally:
        user.stop()


async def test_userloop_exception_crosses_the_bridge() -> None:
    user = UserLoop()
    user.start()
    try:
        async def boom() -> None:
            raise ValueError("from user code")

        with pytest.raises(ValueError, match="from user code"):
            await asyncio.wait_for(user.submit(boom()), 5)
    finally:
        user.stop()


async def test_inbox_runs_items_in_order_in_batches_with_one_wakeup_per_batch() -> None:
    loop = asyncio.get_running_loop()
    inbox = _Inbox(loop)
    seen: list[int] = []
    done = asyncio.Event()
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counting(callback: object, *args: object) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return real(callback, *args)  # type: ignore[arg-type]

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        total = DRAIN_BATCH * 2 + 10

        def produce() -> None:
            for n in range(total):
                inbox.put(lambda n=n: (seen.append(n), n == total - 1 and done.set()))

        await asyncio.to_thread(produce)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        del loop.call_soon_threadsafe
    assert seen == list(range(total))
    # Many items crossed per wake-up: the producer only wakes the loop when no drain is
    # pending (and a long queue is drained in DRAIN_BATCH slices without new wake-ups).
    assert 1 <= wakeups < total // 2
