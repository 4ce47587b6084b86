"""The process around one worker: signal handling (the first SIGTERM/SIGINT drains, a
second ends the drain), an optional listener around it (the CLI passes the health server),
and the exit code.

The CLI, the bench and embedders run the engine through ``serve``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
from anyio.abc import TaskStatus
from prometheus_client import REGISTRY, CollectorRegistry

from ..config import Config
from ..ops.metrics import WorkerMetrics
from .executor import App
from .userloop import UserLoop
from .worker import Worker

log = logging.getLogger("connect_worker")

# Given the registry, the worker's readiness and its metrics: a context (entered before
# the worker connects, left after it stopped) or None. The CLI's is the health listener.
Listener = Callable[[CollectorRegistry, Callable[[], bool], WorkerMetrics],
                    AbstractAsyncContextManager[Any] | None]


async def serve(config: Config, apps: Sequence[App], *, listener: Listener | None = None,
                registry: CollectorRegistry = REGISTRY, user_loop: UserLoop | None = None) -> int:
    """Run one worker with signal handling until it stops; returns the exit code.

    ``user_loop``: where user code runs (default: a thread of its own; see ``Worker``).
    """
    metrics = WorkerMetrics(registry)
    worker = Worker(config, apps, metrics=metrics, user_loop=user_loop)
    async with contextlib.AsyncExitStack() as stack:
        # Entered before anything connects (a taken port is a configuration error) and
        # left last, so /readyz answers 503 throughout the drain.
        around = listener(registry, lambda: worker.ready, metrics) if listener else None
        if around is not None:
            await stack.enter_async_context(around)
        async with anyio.create_task_group() as tg:
            await tg.start(_watch_signals, worker)
            code = await worker.run()
            tg.cancel_scope.cancel()
    return code


async def _watch_signals(worker: Worker, *, task_status: TaskStatus[None]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        count = 0
        async for signum in signals:
            count += 1
            name = signal.Signals(signum).name
            if count == 1:
                log.info("drain.requested", extra={"event": "drain.requested",
                                                   "fields": {"signal": name}})
                worker.request_shutdown()
            else:
                log.warning("drain.aborted", extra={"event": "drain.aborted",
                                                    "fields": {"signal": name}})
                worker.abort()
