"""Replies and their delivery: building a step's reply, writing it on the newest live
socket, the ACK timer, the ``/v0/connect/flush`` fallback (backoff, bounded concurrency),
the hand-back's delivery at the drain deadline, and answering a request forwarded again
after its reply was delivered.

What happens to a reply is decided by the step ledger (``steps.py``); this module carries
out its SEND_REPLY, RESEND_REPLY, ARM_ACK_TIMER, FLUSH and WAKE actions and reports what
happened to each write back as events (REPLY_NOT_WRITTEN, ACK_LATE, ACK_OVERDUE, FLUSHED).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConnectWorkerError
from ..ops import tracing
from ..ops.logs import event
from ..protocol import ExecutorRequest, WorkerConnection
from ..protocol.codec import build_sdk_response
from .steps import Ledger, Step, StepEvent, StepState
from .timers import Deadlines, ack_still_patient, backoff_delays

if TYPE_CHECKING:
    from ..ops.metrics import WorkerMetrics
    from .executor import Outcome
    from .gateway_api import GatewayAPI
    from .session import Session

log = logging.getLogger(__name__)

FLUSH_MAX_BACKOFF = 5.0
# Flushes in flight at once: when a socket with thousands of unacknowledged replies
# drops, they queue here instead of all at once in the HTTP client's pool.
FLUSH_CONCURRENCY = 8


def build_reply(request: ExecutorRequest, outcome: Outcome) -> bytes:
    return build_sdk_response(
        request,
        status=outcome.status,
        body=outcome.body,
        no_retry=outcome.no_retry,
        retry_after=outcome.retry_after,
        sdk_version=outcome.sdk_version,
        request_version=outcome.request_version,
    )


class Delivery:
    """Gets every reply acknowledged: socket first, the flush when that fails."""

    def __init__(
        self,
        ledger: Ledger,
        metrics: WorkerMetrics,
        *,
        reply_ack_timeout: float,
        fire: Callable[[Step, StepEvent], None],
        live_session: Callable[[], Session | None],
        spawn: Callable[[Step], None],
    ) -> None:
        self._ledger = ledger
        self._metrics = metrics
        self._fire = fire
        self._live_session = live_session
        # Starts ``flush(step)`` as a task the drain can cancel (the worker's).
        self._spawn = spawn
        self._acks = Deadlines(reply_ack_timeout, self._acks_due)
        self.api: GatewayAPI | None = None  # set while the worker runs
        self._slots: asyncio.Semaphore | None = None
        self.last_reply_ack_at = 0.0
        self.draining = False  # (for the log lines only)
        # After the drain gave up, no new flushes start (the hand-back delivers its own).
        self.closing = False

    def start(self, api: GatewayAPI) -> None:
        self.api = api
        self._slots = asyncio.Semaphore(FLUSH_CONCURRENCY)
        self.closing = False

    def stop(self) -> None:
        self.closing = True
        self._acks.clear()

    # ----- the ledger's actions ---------------------------------------------------------

    def send_reply(self, step: Step) -> None:
        """SEND_REPLY: write it on the newest live socket; REPLY_NOT_WRITTEN if none."""
        session = self._live_session()
        if session is None or not self._write(step, session):
            self._fire(step, StepEvent.REPLY_NOT_WRITTEN)

    def resend_reply(self, step: Step) -> None:
        """RESEND_REPLY: write it on the newest live socket (it may be ACKed there)."""
        session = self._live_session()
        if session is not None:
            self._write(step, session)

    def arm_ack_timer(self, step: Step) -> None:
        self._acks.add(step.request.request_id)

    def flush(self, step: Step) -> None:
        """FLUSH: POST it until accepted (a task), unless the drain has given up."""
        if not self.closing:
            self._spawn(step)

    def _write(self, step: Step, session: Session) -> bool:
        assert step.reply is not None
        if not session.conn.live or not session.send_now(WorkerConnection.reply, step.reply):
            return False
        step.sent_on = session
        step.sent_at = time.monotonic()
        self._metrics.replies_sent_total.inc()
        tracing.step_event(step, "reply.sent")
        if step.state is StepState.REPLY_SENT:
            self._acks.add(step.request.request_id)
        return True

    def _acks_due(self, request_ids: list[str]) -> None:
        """Replies whose ACK did not come in time: wait more, or go to the flush."""
        steps = self._ledger.steps
        now = time.monotonic()
        timeout = self._acks.delay
        live = self._live_session()
        for request_id in request_ids:
            step = steps.get(request_id)
            if step is None:
                continue
            patient = ack_still_patient(
                now=now, sent_at=step.sent_at, last_reply_ack_at=self.last_reply_ack_at,
                timeout=timeout, same_socket=live is not None and step.sent_on is live)
            self._fire(step, StepEvent.ACK_LATE if patient else StepEvent.ACK_OVERDUE)

    def reply_acked(self, step: Step) -> None:
        self._metrics.reply_acks_total.inc()
        self.last_reply_ack_at = time.monotonic()
        tracing.step_event(step, "reply.acked")

    def redelivered(self, session: Session, request: ExecutorRequest, reply: bytes,
                    delivered_ago: float) -> None:
        """A request delivered already, yet forwarded again: the gateway never counted
        our ACK and re-forwarded it once this worker was routable again (the soak saw
        steps run twice this way). Answer with the same reply; never run it."""
        session.send_now(WorkerConnection.reply, reply)
        event(log, "request.redelivered", level=logging.WARNING, conn_id=session.id,
              request_id=request.request_id, run_id=request.run_id,
              delivered_ago=round(delivered_ago, 3))

    # ----- the flush ----------------------------------------------------------------------

    async def run_flush(self, step: Step) -> None:
        """POST the reply to /v0/connect/flush until accepted or acknowledged another way."""
        assert self.api is not None and step.reply is not None
        delays = backoff_delays(0.1, FLUSH_MAX_BACKOFF)
        while step.state is StepState.FLUSHING or step.state is StepState.HANDING_BACK:
            try:
                if not await self._flush_once(step):
                    return  # acknowledged on a socket while it waited for a slot
            except ConnectWorkerError as exc:
                self._metrics.flushes_total.labels(outcome="error").inc()
                delay = next(delays)
                event(log, "reply.flush_failed", level=logging.WARNING,
                      request_id=step.request.request_id, error=str(exc),
                      retry_in=round(delay, 3))
                step.wake = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await step.wake.wait()
                continue
            self._metrics.flushes_total.labels(outcome="ok").inc()
            tracing.step_event(step, "reply.flushed")
            event(log, "reply.flushed", request_id=step.request.request_id,
                  function=step.request.function_slug, draining=self.draining)
            self._fire(step, StepEvent.FLUSHED)
            return

    async def _flush_once(self, step: Step) -> bool:
        """POST the reply once (at most FLUSH_CONCURRENCY at a time); False if it was
        delivered meanwhile and not posted."""
        assert self.api is not None and self._slots is not None and step.reply is not None
        async with self._slots:
            if step.state is not StepState.FLUSHING and step.state is not StepState.HANDING_BACK:
                return False
            await self.api.flush(step.reply)
            return True

    def wake(self, step: Step) -> None:
        """WAKE: a delivery waiting on this step moves on."""
        if step.wake is not None:
            step.wake.set()

    async def hand_back(self, step: Step, *, ack_timeout: float) -> None:
        """Get a hand-back reply acknowledged: socket first, the flush when no ACK comes
        (or its socket goes) within ``ack_timeout``."""
        step.wake = asyncio.Event()
        session = self._live_session()
        if session is not None and self._write(step, session):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ack_timeout):
                    await step.wake.wait()
        if step.state is StepState.HANDING_BACK:
            await self.run_flush(step)
