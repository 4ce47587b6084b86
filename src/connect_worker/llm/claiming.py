"""Copies of one step racing for its model call: one calls, the others wait for its answer.

A claim on the call's cache entry is held while the model is asked, refreshed every third
of its lifetime (saving the streamed text so far), and released once the answer is
stored. A copy that finds the claim held waits for the answer, or takes the claim over
once the holder stops refreshing it (continuing the partial text it left). A draining
worker never waits: the step's retry reuses the answer. A failing claims store never
fails a call: the call goes ahead unclaimed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..context import DrainSignal
from ..ops.logs import event
from .cache import Claims, ClaimState, Partial
from .config import LLMConfig
from .errors import LLMDrainingError, LLMUnavailableError
from .metrics import LLMMetrics
from .types import Answer

log = logging.getLogger("connect_worker.llm")


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claim this process won: ``state`` says what the previous holders left."""

    store: Claims
    entry: str
    owner: str
    ttl: float
    state: ClaimState

    async def keep(self, progress: Streamed) -> None:
        """Refresh the claim every third of its lifetime, saving the streamed text so far."""
        saved = 0
        while True:
            await asyncio.sleep(self.ttl / 3)
            partial = None
            if progress.version != saved:
                partial = progress.partial()
                saved = progress.version
            if await self.refresh(partial) is False:
                # Another copy took it over (we were too slow to refresh): both pay now.
                event(log, "llm.claim.lost", level=logging.WARNING, owner=self.owner)
                return

    async def refresh(self, partial: Partial | None) -> bool | None:
        """Extend the claim (saving ``partial``): False if it was lost, None on a cache error."""
        try:
            return await self.store.refresh(self.entry, self.owner, self.ttl, partial)
        except Exception as exc:
            event(log, "llm.cache.error", level=logging.ERROR, op="refresh", error=repr(exc))
            return None

    async def release(self, *, keep_partial: bool) -> None:
        try:
            await self.store.release(self.entry, self.owner, keep_partial=keep_partial)
        except Exception as exc:
            event(log, "llm.cache.error", level=logging.ERROR, op="release", error=repr(exc))


class Streamed(Protocol):
    """The text streamed so far: ``version`` changes whenever it does."""

    version: int

    def partial(self) -> Partial | None: ...


class Claiming:
    def __init__(self, store: Claims, config: LLMConfig, drain: DrainSignal,
                 metrics: LLMMetrics, get: Callable[[str], Awaitable[Answer | None]]) -> None:
        self.store = store
        self.config = config
        self._drain = drain
        self._metrics = metrics
        self._get = get  # the cache lookup, which logs its own failures

    async def acquire(self, entry: str, owner: str, labels: tuple[str, str],
                      fields: dict[str, Any]) -> Claimed | tuple[Answer, str] | None:
        """Claim ``entry``; while another copy holds it, wait for its answer (returned with
        how it came: ``waited`` or ``cached``). None: the claims store failed, so the call
        goes ahead unclaimed."""
        deadline = time.monotonic() + self.config.retry_budget
        waited = False
        while True:
            try:
                state = await self.store.claim(entry, owner, self.config.claim_ttl)
                if state.won:
                    # The previous holder may have stored its answer just before releasing.
                    hit = await self._get(entry)
                    if hit is not None:
                        await self.store.release(entry, owner, keep_partial=False)
                        return hit, "waited" if waited else "cached"
            except Exception as exc:
                event(log, "llm.cache.error", level=logging.ERROR, op="claim", error=repr(exc))
                return None
            if state.won:
                if state.took_over:
                    self._metrics.takeovers.labels(*labels).inc()
                    event(log, "llm.claim.takeover", level=logging.WARNING,
                          partial_chars=len(state.partial.text) if state.partial else 0,
                          **fields)
                return Claimed(self.store, entry, owner, self.config.claim_ttl, state)
            if self._drain.is_set():
                # The other copy may take minutes; a draining worker cannot wait that long.
                self._metrics.requests.labels(*labels, "refused").inc()
                event(log, "llm.call", outcome="refused", reason="claimed_while_draining",
                      **fields)
                raise LLMDrainingError(
                    "another copy of this step is already calling the model and this worker "
                    "is draining: not waiting for it (the step's retry will reuse its answer)")
            left = deadline - time.monotonic()
            if left <= 0:
                self._metrics.requests.labels(*labels, "gave_up").inc()
                raise LLMUnavailableError(
                    f"another copy of this step held the model call for longer than "
                    f"{self.config.retry_budget:g} s (CONNECT_WORKER_LLM_RETRY_BUDGET)")
            event(log, "llm.claim.wait", level=logging.INFO, holder=state.owner,
                  expires_in=round(state.expires_in, 2), **fields)
            try:
                answer = await self._wait_or_drain(entry, left)
            except LLMDrainingError:
                self._metrics.requests.labels(*labels, "refused").inc()
                event(log, "llm.call", outcome="refused", reason="drain_while_waiting",
                      **fields)
                raise
            except Exception as exc:
                event(log, "llm.cache.error", level=logging.ERROR, op="wait", error=repr(exc))
                return None
            if answer is not None:
                return answer, "waited"
            waited = True

    async def _wait_or_drain(self, entry: str, timeout: float  # noqa: ASYNC109
                             ) -> Answer | None:
        waiting = asyncio.ensure_future(self.store.wait(entry, timeout))
        drained = asyncio.ensure_future(self._drain.wait())
        try:
            await asyncio.wait({waiting, drained}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, drained):
                task.cancel()
        if waiting.done() and not waiting.cancelled():
            return waiting.result()
        raise LLMDrainingError("the worker began draining while this step waited for another "
                               "copy's model call (the step's retry will reuse its answer)")
