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

from connect_worker.llm import ResultCache, RunCost
from connect_worker.llm.types import Answer
from examples.reports import client, functions, llm

__all__ = ["client", "functions"]

MARKER = "kill-app: answer stored"


class HoldAfterStoring:
    def __init__(self, inner: ResultCache, after: int) -> None:
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

    async def close(self) -> None:
        await self.inner.close()


_hold = os.environ.get("KILL_APP_HOLD_AFTER_ANSWERS")
if _hold and llm.cache is not None:
    llm.cache = HoldAfterStoring(llm.cache, int(_hold))
