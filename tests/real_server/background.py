"""Scenarios that take minutes (the server's 2-minute lease cannot be shortened) run in a
thread of their own, started when the tier starts, while the quick tests run; their test
only collects the outcome. The tier then takes about as long as its longest scenario.

A test module opts in with a module-level ``BACKGROUND = Background(coroutine_function)``;
the conftest starts it and moves its test to the end of the tier.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

from connect_worker.lab.inngest_dev import InngestDevServer

Scenarios = Callable[[str, Path, list[InngestDevServer]], Awaitable[None]]


class Background:
    def __init__(self, scenarios: Scenarios) -> None:
        self.scenarios = scenarios
        self.servers: list[InngestDevServer] = []  # for the failing test's report
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, binary: str, workdir: Path) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(binary, workdir),
                                        name="real-server-background", daemon=True)
        self._thread.start()

    def _run(self, binary: str, workdir: Path) -> None:
        try:
            asyncio.run(self.scenarios(binary, workdir, self.servers))
        except BaseException as exc:  # handed to the test that joins
            self._error = exc

    def join(self, timeout: float) -> None:
        """Wait for the scenarios; re-raise what failed. Not started: nothing to wait."""
        if self._thread is None:
            raise RuntimeError("the background scenarios were never started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"background scenarios still running after {timeout} s")
        if self._error is not None:
            raise self._error
