"""The bridge between the engine's event loop and the loop that runs user code.

User functions run on their own event loop in a dedicated thread, so a step that
blocks its loop (``time.sleep``, a synchronous HTTP client) cannot delay the
engine's heartbeats or lease extensions. ``def`` functions go one step further,
into the SDK's thread pool. The only traffic across the bridge is: a coroutine
in (``submit``), its result or exception out, and cancellation.

Each direction is a queue drained by one callback on the receiving loop. Waking
a loop from another thread costs a syscall and a GIL hand-off, so a wake-up is
only sent when the receiving side has no drain pending: under load many jobs
cross on one wake-up.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# One drain runs at most this many items, then yields to the loop: ten thousand steps
# finishing together must not hold up the loop's other callbacks for their whole length.
DRAIN_BATCH = 256


class _Inbox:
    """A queue of callables for one event loop, woken at most once per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = self._loop = loop
        self._items: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, item: Callable[[], None]) -> None:
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items = self._items
            if len(items) > DRAIN_BATCH:
                # Still scheduled: producers need not wake us, the rest runs next.
                batch = deque(items.popleft() for _ in range(DRAIN_BATCH))
                self._loop.call_soon(self._drain)
            else:
                batch, self._items = items, deque()
                self._scheduled = False
        for item in batch:
            item()


class JobFuture(asyncio.Future[T]):
    """The engine-side outcome of a job. Cancelling it cancels the user task.

    ``on_done`` (optional) is called once it is done: straight from the bridge when the
    job returns or raises (no callback round through the event loop: that was two
    scheduled callbacks per step), from the loop when it is cancelled.
    """

    _job: _Job[T] | None = None
    _on_done: Callable[[JobFuture[T]], None] | None = None

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        if self._job is not None:
            self._job.cancel_soon()
        if self._on_done is not None:
            self.get_loop().call_soon(self._on_done, self)
        return True

    def settle(self, task: asyncio.Task[T]) -> None:
        """Take ``task``'s outcome (on this future's loop) and call ``on_done``."""
        if self.done():
            return
        if task.cancelled():
            self.cancel()  # (calls on_done)
            return
        if (exc := task.exception()) is not None:
            self.set_exception(exc)
        else:
            self.set_result(task.result())
        on_done = self._on_done
        if on_done is not None:
            try:
                on_done(self)
            except Exception as exc:  # as asyncio does for a failing callback
                self.get_loop().call_exception_handler({
                    "message": "a job's completion callback failed", "exception": exc,
                })


class _Job(Generic[T]):
    """One coroutine crossing the bridge: runs on the user loop, resolves on the engine's."""

    def __init__(self, coro: Coroutine[Any, Any, T], result: JobFuture[T],
                 reply_to: _Inbox, user: _Inbox) -> None:
        self._coro = coro
        self._result = result
        self._reply_to = reply_to
        self._user = user
        self._task: asyncio.Task[T] | None = None
        self._cancelled = False

    def start(self) -> None:  # on the user loop
        if self._cancelled:
            self._coro.close()
            self._reply_to.put(self._resolve_cancelled)
            return
        self._task = self._user.loop.create_task(self._coro)
        self._task.add_done_callback(self._done)

    def cancel_soon(self) -> None:  # on the engine loop
        self._user.put(self.cancel)

    def cancel(self) -> None:  # on the user loop
        self._cancelled = True
        if self._task is not None:
            self._task.cancel()

    def _done(self, task: asyncio.Task[T]) -> None:  # on the user loop
        self._reply_to.put(lambda: self._resolve(task))

    def _resolve(self, task: asyncio.Task[T]) -> None:  # on the engine loop
        self._result.settle(task)

    def _resolve_cancelled(self) -> None:  # on the engine loop
        if not self._result.done():
            self._result.cancel()


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the engine's and the user code's event loops: uvloop's (libuv, in C)
    when ``kind`` is "uvloop" and it is installed, else asyncio's own.

    uvloop measured about 10% less CPU per step (docs/benchmarks.md): each step wakes a
    loop from the other thread twice, and its loop iterations and cross-thread wake-ups
    are C, not Python.
    """
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:  # no build for this platform (Windows)
            return asyncio.new_event_loop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


class UserLoop:
    """A daemon thread running an asyncio loop for user code."""

    def __init__(self, name: str = "connect-worker-user",
                 new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
                 ) -> None:
        self._loop = new_loop()
        self._inbox = _Inbox(self._loop)
        self._replies: dict[asyncio.AbstractEventLoop, _Inbox] = {}
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
                self._loop.run_until_complete(asyncio.wait(pending, timeout=1.0))
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The user loop (read by ``stacks.running_steps``; never run anything on it)."""
        return self._loop

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()
            self._ready.wait()

    def submit(self, coro: Coroutine[Any, Any, T],
               on_done: Callable[[JobFuture[T]], None] | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> JobFuture[T]:
        """Start ``coro`` on the user loop; its outcome arrives in the returned future,
        which belongs to the calling loop (``loop``, when the caller knows it: finding
        the running loop costs a system call), and ``on_done`` is called with it then.
        Cancelling that future cancels the user task.

        A future and a callback instead of a task awaiting one: the engine needs no task
        per step.
        """
        engine = loop or asyncio.get_running_loop()
        reply_to = self._replies.get(engine)
        if reply_to is None:
            reply_to = self._replies[engine] = _Inbox(engine)
        result: JobFuture[T] = JobFuture(loop=engine)
        job = _Job(coro, result, reply_to, self._inbox)
        result._job = job
        result._on_done = on_done
        self._inbox.put(job.start)
        return result

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the loop (running user tasks are abandoned; the thread is a daemon)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)


class InlineUserLoop(UserLoop):
    """User code on the engine's own loop, no thread: for measurement only.

    ``scripts/bench --bridge-cost`` serves with it (``serve(..., user_loop=...)``) to price
    the thread. Never serve real work with it: one blocking step would stop every
    heartbeat and lease extension, which is what the thread exists to prevent.
    """

    def __init__(self) -> None:  # no thread and no loop of its own
        pass

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 1.0) -> None:
        pass

    def submit(self, coro: Coroutine[Any, Any, T],
               on_done: Callable[[JobFuture[T]], None] | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> JobFuture[T]:
        engine = loop or asyncio.get_running_loop()
        result: JobFuture[T] = JobFuture(loop=engine)
        result._on_done = on_done
        task = engine.create_task(coro)
        task.add_done_callback(result.settle)
        result.add_done_callback(lambda f: f.cancelled() and task.cancel())
        return result
