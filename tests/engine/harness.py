"""Run an in-process Worker against a DevServer, with bounded start and stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from connect_worker.config import Config
from connect_worker.devserver import DevServer
from connect_worker.engine.executor import App
from connect_worker.engine.userloop import UserLoop
from connect_worker.engine.worker import Worker

from . import apps


def worker_config(server: DevServer, /, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "dev": True,
        "api_base_url": server.api_url,
        "http_port": None,
        "instance_id": "engine-test-1",
        "drain_timeout": 15.0,
        "reply_ack_timeout": 0.5,
        "reconnect_min_backoff": 0.02,
        "reconnect_max_backoff": 0.2,
    }
    values.update(overrides)
    return Config(**values)


@asynccontextmanager
async def running_worker(
    server: DevServer, /, serve: list[App] | None = None, *,
    user_loop: UserLoop | None = None, **overrides: Any
) -> AsyncIterator[Worker]:
    """A Worker serving ``serve`` (default: the engine test apps) until the block ends;
    ``user_loop`` as ``Worker`` takes it, ``overrides`` as ``worker_config`` does."""
    worker = Worker(worker_config(server, **overrides),
                    serve or [(apps.client, apps.functions)], user_loop=user_loop)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.wait_ready(), 10)
        yield worker
    finally:
        worker.request_shutdown()
        try:
            await asyncio.wait_for(asyncio.shield(task), 20)
        except TimeoutError:
            worker.abort()
            await asyncio.wait_for(task, 5)
