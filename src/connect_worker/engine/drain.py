"""The drain, from the first stop signal to the exit code: stop acking, settle, PAUSE,
wait (under the deadline) until the ledger has no live step, then give up on the rest:
log each by name, cancel its body, and *hand back* the ones the gateway confirmed as ours
(a retryable error reply naming the worker, the reason and the time it ran, so Inngest
retries at once instead of after the lease lapses, about 2 minutes). Owns the
LOG_ABANDONED and HAND_BACK actions and why the worker is stopping (signal, second
signal, fatal error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from ..context import draining
from ..ops import tracing
from ..ops.logs import event
from .delivery import build_reply
from .executor import error_outcome
from .stacks import running_steps
from .steps import Ledger, Step, StepEvent, StepState

if TYPE_CHECKING:
    from ..config import Config
    from ..ops.metrics import WorkerMetrics
    from .bodies import Bodies
    from .delivery import Delivery
    from .supervisor import Supervisor
    from .timers import Changes

log = logging.getLogger(__name__)

# The gateway handles PAUSE and ACKs on different goroutines: an ACK written just
# before PAUSE can lose that race and the request would be re-routed while we run it
# (spec §5.2). PAUSE therefore waits until the newest ACK is this old.
PAUSE_SETTLE = 0.2
# Hand-back replies at the drain deadline get this long to be acknowledged (socket or
# flush) before the process exits: the platform's SIGKILL is close behind.
HAND_BACK_TIMEOUT = 1.5
# How long the deadline waits for the gateway to confirm steps it never confirmed
# before handing them back (those it does not confirm are not handed back).
OWNERSHIP_ANSWER_TIMEOUT = 0.5
# The hand-back reply's retry_after (seconds, the soonest Inngest accepts): without it
# Inngest's retry backoff applies, 15 s plus up to 30 s of jitter for a first retry
# (pkg/backoff), where the hand-back promises a retry within seconds.
HAND_BACK_RETRY_AFTER = "1"

EXIT_OK = 0
EXIT_ABANDONED = 3  # the drain deadline passed with steps still running
EXIT_FATAL = 2  # stopped without being asked (key refused, sync rejected, a bug)

_ACKED = frozenset({StepState.CONFIRMING, StepState.ACKED})  # lease not confirmed yet


class Drain:
    """One worker's drain (it drains once per ``run``)."""

    def __init__(
        self,
        config: Config,
        metrics: WorkerMetrics,
        ledger: Ledger,
        changes: Changes,
        supervisor: Supervisor,
        delivery: Delivery,
        bodies: Bodies,
        *,
        user_loop: Callable[[], asyncio.AbstractEventLoop | None],
        fire: Callable[[Step, StepEvent], None],
        cancel_flushes: Callable[[], set[asyncio.Task[None]]],
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._ledger = ledger
        self._changes = changes
        self._supervisor = supervisor
        self._delivery = delivery
        self._bodies = bodies
        self._user_loop = user_loop
        self._fire = fire
        self._cancel_flushes = cancel_flushes
        self.started = False
        self.aborted = False  # a second signal, or a fatal error
        self.fatal: BaseException | None = None
        self.last_ack_at = 0.0  # (monotonic) when the newest ACK was written
        self._scope: anyio.CancelScope | None = None
        self._reason = ""
        self._names: dict[str, str] = {}  # run id -> step name, read at the deadline
        self._handed_back: list[Step] = []

    def reset(self) -> None:
        self.started = False
        self._names = {}

    def abort(self) -> None:
        """End the wait now: every live step is given up."""
        self.aborted = True
        if self._scope is not None:
            self._scope.cancel()

    def step_name(self, step: Step) -> str:
        """The step's name from the user's code, else the request's step id."""
        names = self._names or running_steps(self._user_loop())
        return names.get(step.request.run_id) or step.request.step_id or "step"

    async def run(self) -> int:
        """Drain; returns the exit code."""
        config, metrics, ledger = self._config, self._metrics, self._ledger
        self.started = self._supervisor.draining = self._delivery.draining = True
        draining().set()
        started_at = time.monotonic()
        metrics.start_drain(config.drain_timeout)
        tracing.drain_started(ledger.steps.values())
        event(log, "drain.start", in_flight=len(ledger.steps),
              drain_timeout=config.drain_timeout)
        settle = self.last_ack_at + PAUSE_SETTLE - time.monotonic()
        if settle > 0 and self.fatal is None:
            event(log, "drain.settle", level=logging.DEBUG, seconds=round(settle, 3))
            await anyio.sleep(settle)
        await self._supervisor.pause()
        with anyio.CancelScope(deadline=anyio.current_time() + config.drain_timeout) as scope:
            self._scope = scope
            if self.aborted:
                scope.cancel()
            await self._changes.wait_until(lambda: not ledger.steps)
        abandoned = len(ledger.steps)
        if abandoned:
            await self._give_up()
        await self._supervisor.close_all()
        duration = time.monotonic() - started_at
        metrics.drain_duration_seconds.set(duration)
        metrics.draining.set(0)
        if self.fatal is not None:
            code = EXIT_FATAL
        elif abandoned:
            code = EXIT_ABANDONED
        else:
            code = EXIT_OK
        event(log, "drain.end", duration=round(duration, 3), abandoned=abandoned,
              exit_code=code)
        tracing.drain_finished(code)
        return code

    async def _give_up(self) -> None:
        """The deadline: ask about unconfirmed steps, then give up on every live one."""
        ledger = self._ledger
        self._names = running_steps(self._user_loop())  # before any cancellation
        for step in list(ledger.steps.values()):
            self._fire(step, StepEvent.DEADLINE)  # EXTEND_NOW for the unconfirmed
        if self._supervisor.live_session() is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OWNERSHIP_ANSWER_TIMEOUT):
                    await self._changes.wait_until(lambda: not ledger.in_state(_ACKED))
        if self.fatal is not None:
            self._reason = "the worker is stopping after a fatal error"
        elif self.aborted:
            self._reason = "the worker got a second stop signal"
        else:
            self._reason = f"the drain deadline ({self._config.drain_timeout:g} s) passed"
        given_up = list(ledger.steps.values())
        self._metrics.steps_abandoned_total.inc(len(given_up))
        # Unacknowledged replies that are not handed back stay unacknowledged: no more
        # flushes for them (the hand-back below delivers its own replies).
        self._delivery.stop()
        for step in given_up:
            self._fire(step, StepEvent.GIVE_UP)
        self._bodies.cancel_all()
        pending: set[asyncio.Future[Any]] = {*self._bodies.running, *self._cancel_flushes()}
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        handed_back, self._handed_back = self._handed_back, []
        if not handed_back:
            return
        # Without this reply Inngest would wait for the lease to expire (minutes) before
        # retrying. The budget is short: the platform's SIGKILL is close behind.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HAND_BACK_TIMEOUT):
                await asyncio.gather(*(
                    self._delivery.hand_back(step, ack_timeout=HAND_BACK_TIMEOUT / 2)
                    for step in handed_back
                ))
        event(log, "drain.handed_back", steps=len(handed_back),
              acknowledged=sum(1 for s in handed_back if s.state is StepState.DELIVERED))

    # ----- the ledger's actions -----------------------------------------------------------

    def log_abandoned(self, step: Step) -> None:
        """LOG_ABANDONED (after GIVE_UP moved the step on)."""
        request = step.request
        event(log, "drain.step_abandoned", level=logging.ERROR,
              function=request.function_slug, run_id=request.run_id,
              step_id=self.step_name(step), job_id=request.job_id,
              request_id=request.request_id,
              state="running" if step.reply is None else "reply_unacknowledged",
              running_for=round(time.monotonic() - step.started_at, 3),
              handed_back=step.state is StepState.HANDING_BACK)

    def hand_back(self, step: Step) -> None:
        """HAND_BACK: the retryable error reply, delivered once every step is given up."""
        request = step.request
        step.reply = build_reply(request, error_outcome(
            "StepAbandoned",
            f"connect_worker instance {self._config.instance_id} gave up step "
            f"{self.step_name(step)!r} of {request.function_slug!r} after "
            f"{time.monotonic() - step.started_at:.1f} s: {self._reason}. "
            f"Inngest retries it.", retry_after=HAND_BACK_RETRY_AFTER,
        ))
        self._handed_back.append(step)
        tracing.step_event(step, "handed_back")
