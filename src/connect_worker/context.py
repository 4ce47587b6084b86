"""What user code can learn about the request it runs in, and about the drain.

``current_request()`` is set by the executor around each executor request (for
``async def`` and ``def`` functions alike) and returns None outside one.
``job_id`` is stable across retries of the same step, so it is the key for
side-effect idempotency (the LLM toolkit's result cache uses it).

``draining()`` returns the process-wide drain signal: user code may poll
``is_set()`` or ``await wait()`` from any thread or event loop to checkpoint or
stop a long loop early once SIGTERM arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """The executor request being served (see GatewayExecutorRequestData)."""

    request_id: str
    run_id: str
    job_id: str
    app_name: str
    function_slug: str
    step_id: str | None
    # The request's JSON body, read only when ``attempt`` is asked for: parsing it on
    # every request cost as much as a tenth of the worker's own per-step CPU.
    payload: bytes = field(default=b"", repr=False, compare=False)

    @property
    def attempt(self) -> int:
        """Which attempt of the step this is (``ctx.attempt``; 0 for the first)."""
        try:
            value = json.loads(self.payload)["ctx"]["attempt"]
        except (ValueError, KeyError, TypeError):
            return 0
        return value if isinstance(value, int) else 0


_current: ContextVar[RequestIdentity | None] = ContextVar("connect_worker_request", default=None)


def current_request() -> RequestIdentity | None:
    """The request this code runs for, or None outside connect_worker's executor."""
    return _current.get()


class DrainSignal:
    """A thread-safe, loop-agnostic flag that flips once when the worker starts draining."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            # Each waiter lives on its own loop (user code may run on several).
            with contextlib.suppress(RuntimeError):  # that loop is already closed
                loop.call_soon_threadsafe(event.set)

    def clear(self) -> None:
        """Reset (tests only; a real worker drains once)."""
        self._event.clear()

    async def wait(self) -> None:
        """Wait on whichever event loop calls this, without blocking it."""
        event = asyncio.Event()
        with self._lock:
            if self._event.is_set():
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        await event.wait()

    def wait_sync(self, timeout: float | None = None) -> bool:
        """Block the calling thread until draining or ``timeout``; for ``def`` functions."""
        return self._event.wait(timeout)


_drain = DrainSignal()


def draining() -> DrainSignal:
    """The process-wide drain signal."""
    return _drain
