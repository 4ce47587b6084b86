"""The bridge between the engine's event loop and the loop that runs user code.

User functions run on their own event loop in a dedicated thread, so a step that
blocks its loop (``time.sleep``, a synchronous HTTP client) cannot delay the
engine's heartbeats or lease extensions. ``def`` functions go one step further,
into the SDK's thread pool. The only traffic across the bridge is: a coroutine
in (``submit``), its result or exception out, and cancellation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class UserLoop:
    """A daemon thread running an asyncio loop for user code."""

    def __init__(self, name: str = "connect-worker-user") -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        try:
            self._loop.run_forever()
        finally:
            # Abandoned user tasks get a cancellation and a moment to unwind.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(
                    asyncio.wait(pending, timeout=1.0)
                )
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()
            self._ready.wait()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the user loop; cancelling the future cancels the task."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the user loop and await it from the engine's loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the loop (running user tasks are abandoned; the thread is a daemon)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
