"""The wire layer's delay line (faults.frame_latency in each direction)."""

from __future__ import annotations

import asyncio
import time

from connect_worker.devserver.wire import DelayLine


async def test_delay_line_keeps_order_and_due_times_and_stops_when_delivery_fails() -> None:
    out: list[tuple[str, float]] = []

    async def deliver(item: str) -> bool:
        out.append((item, time.monotonic()))
        return item != "stop"

    line: DelayLine[str] = DelayLine(deliver)
    start = time.monotonic()
    line.put("a", 0.05)
    line.put("b", 0.0)  # due earlier, but behind "a" on the wire
    line.put("stop", 0.0)
    line.put("lost", 0.0)
    await asyncio.wait_for(line.run(), 5)
    assert [item for item, _ in out] == ["a", "b", "stop"]
    assert out[0][1] - start >= 0.05


async def test_delay_line_end_and_drained() -> None:
    seen: list[int] = []

    async def deliver(item: int) -> bool:
        seen.append(item)
        return True

    line: DelayLine[int] = DelayLine(deliver)
    task = asyncio.create_task(line.run())
    for n in range(3):
        line.put(n, 0.01)
    await asyncio.wait_for(line.drained(), 5)
    assert seen == [0, 1, 2]
    line.end()
    await asyncio.wait_for(task, 5)
