"""Step bodies: starting each ACKed step in the SDK on the user loop (under
max_worker_concurrency), their futures, and cancelling them.

No task per step: the SDK's outcome arrives in a future's callback, which feeds the
ledger BODY_DONE (or BODY_CANCELLED). User code starts from the loop iteration after the
ACK, with every step ACKed in the same read: the ACKs (written when the read callback
ends) are on the wire first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from .executor import Executor, Outcome, error_outcome
from .steps import Step, StepEvent, StepState

log = logging.getLogger(__name__)

_STARTABLE = (StepState.ACKED, StepState.OWNED)


class Bodies:
    """The bodies of the steps in the ledger (a step's ``task`` is its body's future)."""

    def __init__(
        self,
        executor: Executor,
        *,
        max_concurrency: int | None,
        done: Callable[[Step, Outcome], None],
        fire: Callable[[Step, StepEvent], None],
    ) -> None:
        self._executor = executor
        self._limit = max_concurrency
        self._done = done
        self._fire = fire
        self.running: set[asyncio.Future[Any]] = set()
        self._queued: deque[Step] = deque()  # ACKed, waiting for max_worker_concurrency
        self._to_start: list[Step] = []  # ACKed in this loop iteration
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False  # the drain gave up: nothing more starts

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.closing = False

    def start_soon(self, step: Step) -> None:
        """Start the body from the next loop iteration (after this read's ACKs)."""
        if not self._to_start:
            assert self._loop is not None
            self._loop.call_soon(self._start_acked)
        self._to_start.append(step)

    def _start_acked(self) -> None:
        steps, self._to_start = self._to_start, []
        limit = self._limit
        for step in steps:
            if step.state not in _STARTABLE or self.closing:
                continue
            if limit and len(self.running) >= limit:
                self._queued.append(step)
            else:
                self._execute(step)

    def _execute(self, step: Step) -> None:
        assert self._loop is not None
        future = self._executor.submit(step.request, partial(self._returned, step), self._loop)
        step.task = future
        self.running.add(future)

    def _returned(self, step: Step, future: asyncio.Future[Outcome]) -> None:
        self.running.discard(future)
        while self._queued and not self.closing:
            queued = self._queued.popleft()
            if queued.state in _STARTABLE:
                self._execute(queued)
                break
        if future.cancelled():
            self._fire(step, StepEvent.BODY_CANCELLED)
            return
        exc = future.exception()
        if exc is not None:
            log.error("the SDK failed to run request %s", step.request.request_id, exc_info=exc)
            outcome = error_outcome("ExecutionError", "connect_worker could not run the step")
        else:
            outcome = future.result()
        self._done(step, outcome)

    def cancel(self, step: Step) -> None:
        """CANCEL_BODY: cancel the running body (its callback reports BODY_CANCELLED); a
        body not started never starts, and is reported cancelled now."""
        if step.task is not None:
            step.task.cancel()  # the user task on the user loop gets the cancellation too
        else:
            self._fire(step, StepEvent.BODY_CANCELLED)

    def cancel_all(self) -> None:
        self.closing = True
        for future in list(self.running):
            future.cancel()
