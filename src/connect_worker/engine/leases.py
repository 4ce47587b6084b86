"""Lease extensions: the periodic extender, the early ownership check of each step, and
the extensions the ledger asks for at once (EXTEND_NOW: a new socket, GATEWAY_CLOSING,
the drain deadline), sent in batches from one task.

A step's first extension goes out ``OWNERSHIP_CHECK_DELAY`` after its ACK: when the
gateway re-routed a forward whose ACK was already on the wire (it fails un-ACKed forwards
as soon as a connection leaves READY), two workers hold the same lease id and only the
first to extend keeps it. The other gets a NACK and the ledger cancels its copy a
fraction of a second in, instead of running the whole step next to the real owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import anyio

from ..protocol import WorkerConnection
from .steps import EXTENDING, Ledger, Step, StepEvent
from .timers import Changes, Deadlines

if TYPE_CHECKING:
    from .session import Session

# Soon enough that the losing copy of all but the shortest steps stops before its end
# (the soak found 1 s let sub-second steps run to the end twice), late enough that
# steps of a few milliseconds are done before it and cost no extra frame.
OWNERSHIP_CHECK_DELAY = 0.2
# Lease extensions go out this many per socket write, with the event loop free between
# batches (10,000 steps in flight must not stall heartbeats or new requests).
EXTENSION_BATCH = 256


class Leases:
    """Keeps every step's lease alive while the ledger says it is extending."""

    def __init__(
        self,
        ledger: Ledger,
        changes: Changes,
        *,
        fire: Callable[[Step, StepEvent], None],
        live_session: Callable[[], Session | None],
    ) -> None:
        self._ledger = ledger
        self._changes = changes
        self._fire = fire
        self._live_session = live_session
        self.checks = Deadlines(OWNERSHIP_CHECK_DELAY, self._checks_due)
        self._now: list[Step] = []  # EXTEND_NOW, not sent yet
        self._queued: asyncio.Event | None = None

    def extend_now(self, step: Step) -> None:
        """EXTEND_NOW: queue it; ``send_queued`` sends what is queued in one go."""
        self._now.append(step)
        if self._queued is not None:
            self._queued.set()

    def _checks_due(self, request_ids: list[str]) -> None:
        steps = self._ledger.steps
        for request_id in request_ids:
            step = steps.get(request_id)
            if step is not None:
                self._fire(step, StepEvent.CHECK_DUE)

    async def send_queued(self) -> None:
        """Runs in the worker's task group: sends EXTEND_NOW extensions as they come."""
        self._queued = queued = asyncio.Event()
        while True:
            await queued.wait()
            queued.clear()
            while self._now:
                due, self._now = self._now, []
                session = self._live_session()
                if session is None:
                    break  # the next session extends every lease on activation
                await self.send(session, due)

    async def extend_periodically(self) -> None:
        """Every extend interval (the gateway tells it: lease / 4), every extending step."""
        while True:
            await self._changes.wait_until(lambda: self._live_session() is not None)
            session = self._live_session()
            assert session is not None
            await anyio.sleep(session.ready.extend_lease_interval)
            session = self._live_session()
            if session is None:
                continue  # leases outlive a reconnect; the next session extends them
            await self.send(session, self._ledger.in_state(EXTENDING))

    @staticmethod
    async def send(session: Session, steps: Sequence[Step]) -> None:
        """Extend the leases of ``steps``: ``EXTENSION_BATCH`` frames per socket write,
        the event loop free between batches."""
        for start in range(0, len(steps), EXTENSION_BATCH):
            if start:
                await asyncio.sleep(0)
            with session.corked():
                for step in steps[start : start + EXTENSION_BATCH]:
                    if step.state not in EXTENDING:
                        continue
                    if not session.send_now(
                        WorkerConnection.extend_lease, step.request, step.lease_id, step.echo
                    ):
                        return
