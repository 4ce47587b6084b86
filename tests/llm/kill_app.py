"""``examples.reports`` as the worker serves it, plus a hold for the kill-and-retry test.

With ``KILL_APP_HOLD_AFTER_ANSWERS=N`` the N-th answer is stored in the result cache as
usual, then ``kill-app: answer stored`` is printed and that step blocks for good: the
window between "the model answered" and "the step replied" in which a deploy used to
kill the worker. The test kills the process -9 there.
"""

from __future__ import annotations

import asyncio
import os
import sys

from connect_worker.llm import Claims, ClaimState, Partial, Rejection, RunCost
from connect_worker.llm.types import Answer
from examples.reports import client, functions, llm

__all__ = ["client", "functions"]

MARKER = "kill-app: answer stored"


class HoldAfterStoring:
    """The worker's cache (with its claims), holding the step after the N-th answer."""

    def __init__(self, inner: Claims, after: int) -> None:
        self.inner = inner
        self.after = after
        self.stored = 0

    async def get(self, key: str) -> Answer | None:
        return await self.inner.get(key)

    async def put(self, key: str, answer: Answer, *, run_id: str | None, cost_usd: float) -> None:
        await self.inner.put(key, answer, run_id=run_id, cost_usd=cost_usd)
        self.stored += 1
        if self.stored == self.after:
            sys.stdout.write(MARKER + "\n")
            sys.stdout.flush()
            await asyncio.Event().wait()  # until the test kills this process

    async def run_cost(self, run_id: str) -> RunCost:
        return await self.inner.run_cost(run_id)

    async def claim(self, key: str, owner: str, ttl: float) -> ClaimState:
        return await self.inner.claim(key, owner, ttl)

    async def refresh(self, key: str, owner: str, ttl: float, partial: Partial | None) -> bool:
        return await self.inner.refresh(key, owner, ttl, partial)

    async def release(self, key: str, owner: str, *, keep_partial: bool) -> None:
        await self.inner.release(key, owner, keep_partial=keep_partial)

    async def wait(self, key: str, timeout: float) -> Answer | None:  # noqa: ASYNC109
        return await self.inner.wait(key, timeout)

    async def reject(self, key: str, rejection: Rejection) -> bool:
        return await self.inner.reject(key, rejection)

    async def close(self) -> None:
        await self.inner.close()


_hold = os.environ.get("KILL_APP_HOLD_AFTER_ANSWERS")
if _hold and isinstance(llm.cache, Claims):
    llm.cache = HoldAfterStoring(llm.cache, int(_hold))
