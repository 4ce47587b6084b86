"""The engine's clocks: per-step deadlines on one timer, backoff, the patience rule for late
reply ACKs, and the one "something changed" signal the engine's waits are built on.

Nothing here knows what a step is: deadlines carry request ids, and what a due deadline
means is the step ledger's business (``steps.py``).
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable, Iterator

import anyio

# Per-step deadlines (ownership checks, reply ACKs) share one timer that fires at most
# this often, so a deadline can be this late. See ``Deadlines``.
DEADLINE_GRANULARITY = 0.05
# A reply whose ACK is late waits another reply_ack_timeout, up to this many in all,
# while the gateway is still acknowledging other replies on that socket: it is working
# through a burst, and flushing thousands of replies it is about to ACK only adds load.
REPLY_ACK_PATIENCE = 6


def backoff_delays(minimum: float, maximum: float) -> Iterator[float]:
    """Capped exponential backoff with equal jitter: never zero, never above ``maximum``."""
    ceiling = minimum
    while True:
        yield random.uniform(ceiling / 2, ceiling)
        ceiling = min(maximum, ceiling * 2)


def ack_still_patient(*, now: float, sent_at: float, last_reply_ack_at: float,
                      timeout: float, same_socket: bool) -> bool:
    """Whether a reply whose ACK is ``timeout`` late should wait another ``timeout``
    (ACK_LATE) rather than go to the flush (ACK_OVERDUE): only while its socket is still
    the live one, the gateway ACKed some reply within the last ``timeout``, and it has
    not waited ``REPLY_ACK_PATIENCE`` timeouts in all."""
    return (same_socket and now - last_reply_ack_at < timeout
            and now - sent_at < REPLY_ACK_PATIENCE * timeout)


class Deadlines:
    """Per-key deadlines a fixed delay after being set, checked by one timer.

    A timer per step (``call_later`` + ``cancel``) costs more than the rest of a short
    step's bookkeeping. Here setting a deadline is a deque append (the deque stays in
    deadline order because the delay is fixed), and one timer, firing at most every
    ``DEADLINE_GRANULARITY`` seconds, hands the due keys to ``on_due``, which checks
    whether each still matters (most steps are done long before). Deadlines are never
    cancelled one by one: a stale one is the ledger's no-op.
    """

    def __init__(self, delay: float, on_due: Callable[[list[str]], None]) -> None:
        self.delay = delay
        self._on_due = on_due
        self._due: deque[tuple[float, str]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        # Bound on first use: asyncio.get_running_loop() costs a system call (getpid).
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, key: str) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        at = loop.time() + self.delay
        self._due.append((at, key))
        if self._timer is None:
            self._timer = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        due = self._due
        keys: list[str] = []
        while due and due[0][0] <= now:
            keys.append(due.popleft()[1])
        if due:
            self._timer = loop.call_at(max(due[0][0], now + DEADLINE_GRANULARITY), self._fire)
        if keys:
            self._on_due(keys)

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._due.clear()
        self._loop = None


class Changes:
    """One "something changed" signal: ``wait_until(predicate)`` re-checks on each
    ``notify``. ``notify`` is on the hot path and does nothing while nobody waits."""

    def __init__(self) -> None:
        self._event: anyio.Event | None = None
        self._waiters = 0

    def notify(self) -> None:
        if self._waiters and self._event is not None:
            self._event.set()
            self._event = anyio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if self._event is None:
                self._event = anyio.Event()
            self._waiters += 1
            try:
                await self._event.wait()
            finally:
                self._waiters -= 1
