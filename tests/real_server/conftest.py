"""Fixtures of the real-server tier: Inngest's own dev server (``inngest dev``) from the
binary on PATH or in INNGEST_CLI, one per test, on free loopback ports.

Without the binary every test here is skipped with one line saying how to get it;
with ``CONNECT_WORKER_REQUIRE_REAL_SERVER=1`` that is a failure instead. A failing test's
report carries the end of the server's log.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from connect_worker.lab.inngest_dev import HOW_TO_GET, InngestDevServer, find_binary

from .background import Background

LOG_TAIL_CHARS = 20_000

StartServer = Callable[..., AbstractAsyncContextManager[InngestDevServer]]


_BINARY = find_binary()
_REQUIRED = os.environ.get("CONNECT_WORKER_REQUIRE_REAL_SERVER", "") == "1"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """No binary: skip (one line for the whole tier: same place, same reason), or fail
    when CONNECT_WORKER_REQUIRE_REAL_SERVER=1. Not tests/missing.py: CI without the
    binary must stay green."""
    if _BINARY is None:
        if _REQUIRED:
            pytest.fail(f"{HOW_TO_GET} (CONNECT_WORKER_REQUIRE_REAL_SERVER=1)", pytrace=False)
        pytest.skip(f"{HOW_TO_GET} (set CONNECT_WORKER_REQUIRE_REAL_SERVER=1 to fail instead)")


@pytest.fixture(scope="session")
def inngest_cli() -> str:
    """The ``inngest`` binary (INNGEST_CLI, else PATH)."""
    assert _BINARY is not None
    return _BINARY


@pytest.fixture
def start_inngest(inngest_cli: str, tmp_path: Path,
                  request: pytest.FixtureRequest) -> StartServer:
    """``async with start_inngest(retry_interval=1) as server:`` for a test that needs
    a server with options (or more than one)."""
    count = 0

    @asynccontextmanager
    async def start(**options: Any) -> AsyncIterator[InngestDevServer]:
        nonlocal count
        count += 1
        server = InngestDevServer(inngest_cli, tmp_path / f"inngest-dev-{count}.log", **options)
        servers: list[InngestDevServer] = request.node.__dict__.setdefault("inngest_servers", [])
        servers.append(server)
        async with server:
            yield server

    return start


@pytest.fixture
async def inngest(start_inngest: StartServer) -> AsyncIterator[InngestDevServer]:
    """A fresh ``inngest dev`` with the defaults users get."""
    async with start_inngest() as server:
        yield server


def _background(item: pytest.Item) -> Background | None:
    found = getattr(getattr(item, "module", None), "BACKGROUND", None)
    return found if isinstance(found, Background) else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that collect background scenarios run last: the rest overlaps with them."""
    items.sort(key=lambda item: _background(item) is not None)


@pytest.fixture(scope="session", autouse=True)
def _start_background(request: pytest.FixtureRequest, inngest_cli: str,
                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """At the tier's first test: start every selected module's background scenarios."""
    for item in request.session.items:
        background = _background(item)
        if background is not None:
            background.start(inngest_cli, tmp_path_factory.mktemp("background"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    """Attach the end of each server's log to a failing test's report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        background = _background(item)
        servers = [*item.__dict__.get("inngest_servers", []),
                   *(background.servers if background is not None else [])]
        for server in servers:
            report.sections.append((f"inngest dev log ({server.log_path.name})",
                                    server.log_text(LOG_TAIL_CHARS)))
