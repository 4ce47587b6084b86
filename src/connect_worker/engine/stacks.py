"""Which SDK step a request is running, read from the user code's stack.

An executor request names its step only by hash (or as ``"step"`` when the SDK
discovers the next step itself), but an operator reading ``drain.step_abandoned``
or ``step.lease_lost`` needs the name from the code: ``ctx.step.run("outline", ...)``.
The SDK keeps that name in a local variable of its ``run`` frame while the step's
handler runs, so it is read from there, only on these rare paths: nothing is
recorded per step on the hot path.

``async def`` functions are suspended coroutines on the user loop (their frames
hang off the task); ``def`` functions run in the SDK's thread pool (their frames
are a thread's current stack). A frame is matched to its request by the SDK's
``ctx.run_id`` found further up the same stack.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Iterator
from types import FrameType

_SDK_STEP_MODULE = "step_lib"  # inngest/_internal/step_lib/step_{async,sync}.py


def _task_frames(task: asyncio.Task[object]) -> list[FrameType]:
    """Every frame of a task's coroutine chain, outermost first."""
    frames: list[FrameType] = []
    awaitable: object = task.get_coro()
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
    return frames


def _thread_frames() -> Iterator[list[FrameType]]:
    """Each thread's current stack, outermost first."""
    for top in sys._current_frames().values():
        stack: list[FrameType] = []
        frame: FrameType | None = top
        while frame is not None:
            stack.append(frame)
            frame = frame.f_back
        stack.reverse()
        yield stack


def _step_in(stack: Iterable[FrameType]) -> tuple[str | None, str | None]:
    """(run id, innermost SDK step name) found in one stack."""
    run_id = name = None
    for frame in stack:
        local = frame.f_locals
        ctx = local.get("ctx")
        found_run = getattr(ctx, "run_id", None)
        if isinstance(found_run, str):
            run_id = found_run
        code = frame.f_code
        if code.co_name == "run" and _SDK_STEP_MODULE in code.co_filename:
            step_id = local.get("step_id")
            if isinstance(step_id, str):
                name = step_id
    return run_id, name


def running_steps(loop: asyncio.AbstractEventLoop | None) -> dict[str, str]:
    """Map run id -> name of the SDK step its user code is inside right now.

    Best effort, for logs: stacks change under us (other threads keep running), so
    anything odd just leaves a run out of the answer.
    """
    stacks: list[list[FrameType]] = []
    try:
        if loop is not None:
            stacks.extend(_task_frames(task) for task in asyncio.all_tasks(loop))
        stacks.extend(_thread_frames())
    except RuntimeError:  # a task set changed size while we read it
        return {}
    found: dict[str, str] = {}
    for stack in stacks:
        run_id, name = _step_in(stack)
        if run_id is not None and name is not None:
            found[run_id] = name
    return found
