"""Functions the engine tests run, instrumented with a process-wide probe.

Step bodies count their executions (the thing that must be exactly once), note
when they start and end, and can be held at a gate the test opens. Gates and
notifications are threading primitives because user code runs on the worker's
user loop thread (or the SDK's thread pool for ``def`` functions).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, defaultdict

import inngest

import connect_worker

client = inngest.Inngest(app_id="engine", is_production=False)


class Probe:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.started: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.gates: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.ended_at: dict[str, float] = {}
        self.cancelled: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.job_ids: list[str] = []
        self.attempts: list[int] = []  # current_request().attempt, as step bodies saw it
        self.running = 0
        self.max_running = 0

    def enter(self, name: str) -> None:
        with self.lock:
            self.counts[name] += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.started[name].set()

    def leave(self, name: str) -> None:
        with self.lock:
            self.running -= 1
            self.finished[name] += 1
            self.ended_at[name] = time.time()

    async def wait_started(self, name: str, within: float = 10.0) -> None:
        if not await asyncio.to_thread(self.started[name].wait, within):
            raise TimeoutError(f"step {name!r} did not start within {within} s")


probe = Probe()


@client.create_function(fn_id="three-steps", trigger=inngest.TriggerEvent(event="t/three"))
async def three_steps(ctx: inngest.Context) -> list[str]:
    async def body(name: str) -> str:
        probe.enter(name)
        await asyncio.sleep(0.01)
        probe.leave(name)
        return name.upper()

    return [await ctx.step.run(name, body, name) for name in ("a", "b", "c")]


@client.create_function(fn_id="gated", trigger=inngest.TriggerEvent(event="t/gated"),
                        retries=2)
async def gated(ctx: inngest.Context) -> str:
    """One step that waits for the test to open ``probe.gates['gated']``."""
    key = str(ctx.event.data.get("key", "gated"))

    async def wait() -> str:
        probe.enter(key)
        try:
            opened = await asyncio.to_thread(probe.gates[key].wait, 30)
        except asyncio.CancelledError:
            probe.cancelled[key] += 1
            raise
        finally:
            probe.leave(key)
        return "released" if opened else "timed out"

    return await ctx.step.run("wait", wait)


@client.create_function(fn_id="slow", trigger=inngest.TriggerEvent(event="t/slow"))
async def slow(ctx: inngest.Context) -> float:
    seconds = float(ctx.event.data["seconds"])

    async def nap() -> float:
        probe.enter("slow")
        await asyncio.sleep(seconds)
        probe.leave("slow")
        return seconds

    return await ctx.step.run("nap", nap)


@client.create_function(fn_id="blocking", trigger=inngest.TriggerEvent(event="t/blocking"))
async def blocking(ctx: inngest.Context) -> str:
    seconds = float(ctx.event.data["seconds"])

    async def block() -> str:
        probe.enter("blocking")
        time.sleep(seconds)  # noqa: ASYNC251 - the point: this freezes its event loop
        probe.leave("blocking")
        return "unblocked"

    return await ctx.step.run("block", block)


@client.create_function(fn_id="sync-fn", trigger=inngest.TriggerEvent(event="t/sync"))
def sync_fn(ctx: inngest.ContextSync) -> str:
    def work() -> str:
        probe.enter("sync")
        time.sleep(float(ctx.event.data.get("seconds", 0.05)))
        request = connect_worker.current_request()
        probe.leave("sync")
        return request.job_id if request else "none"

    return ctx.step.run("work", work)


@client.create_function(fn_id="drain-aware", trigger=inngest.TriggerEvent(event="t/drain-aware"))
async def drain_aware(ctx: inngest.Context) -> str:
    """A long step that checkpoints as soon as the worker starts draining."""

    async def long_loop() -> str:
        probe.enter("drain-aware")
        try:
            await asyncio.wait_for(connect_worker.draining().wait(), 30)
            return "checkpointed"
        except TimeoutError:
            return "ran to the end"
        finally:
            probe.leave("drain-aware")

    return await ctx.step.run("loop", long_loop)


@client.create_function(fn_id="second-try", trigger=inngest.TriggerEvent(event="t/second-try"),
                        retries=1)
async def second_try(ctx: inngest.Context) -> list[int]:
    """Fails its first attempt; returns the attempt numbers its step body saw."""

    async def work() -> list[int]:
        request = connect_worker.current_request()
        assert request is not None
        probe.enter("second-try")
        seen = probe.attempts
        seen.append(request.attempt)
        if request.attempt == 0:
            raise RuntimeError("the first attempt fails")
        return list(seen)

    return await ctx.step.run("work", work)


functions = [three_steps, gated, slow, blocking, sync_fn, drain_aware, second_try]
