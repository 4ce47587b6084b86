"""Worker processes for drain tests, the deploy simulator, the soak, the demo and the bench.

``WorkerProcess`` runs ``python -m connect_worker run TARGET`` (or another worker
program: the bench's official SDK client) as a real subprocess against a DevServer,
parses its JSON log lines as they arrive, and
lets the caller wait for readiness, send real signals (SIGTERM, or SIGKILL as a
crash), sample its memory and collect the exit code. ``replace_when_ready`` is
one step of a rolling deploy the way Railway does it with a healthcheck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..devserver.server import DevServer
from ..devserver.state import ConnectionInfo


@dataclass
class WorkerProcess:
    """One ``connect-worker run`` subprocess."""

    target: str
    api_url: str
    instance_id: str
    app_version: str | None = None
    # Test timings: a bounded drain and a quick reply-ACK timeout. None = the worker's
    # own default (the bench measures the defaults).
    drain_timeout: float | None = 20.0
    reply_ack_timeout: float | None = 1.0
    env: dict[str, str] = field(default_factory=dict)
    # The program; None = ``python -m connect_worker run TARGET``.
    command: list[str] | None = None
    autostart: bool = True
    logs: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = 0.0
    signalled_at: float | None = None
    killed_at: float | None = None  # SIGKILLed by crash() (a crash, not a stop)
    exited_at: float | None = None
    returncode: int | None = None
    _proc: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None
    _log_changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def environment(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("INNGEST_", "CONNECT_WORKER_", "RAILWAY_", "OTEL_"))}
        env = {
            **base,
            "INNGEST_DEV": "1",
            "INNGEST_API_BASE_URL": self.api_url,
            "CONNECT_WORKER_INSTANCE_ID": self.instance_id,
            "CONNECT_WORKER_HTTP_PORT": "off",
            "CONNECT_WORKER_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
        }
        if self.drain_timeout is not None:
            env["CONNECT_WORKER_DRAIN_TIMEOUT"] = str(self.drain_timeout)
        if self.reply_ack_timeout is not None:
            env["CONNECT_WORKER_REPLY_ACK_TIMEOUT"] = str(self.reply_ack_timeout)
        if self.app_version:
            env["CONNECT_WORKER_APP_VERSION"] = self.app_version
        env.update(self.env)
        return env

    async def start(self) -> None:
        if self._proc is not None:
            return
        self.started_at = time.time()
        command = self.command or [sys.executable, "-m", "connect_worker", "run", self.target]
        self._proc = await asyncio.create_subprocess_exec(
            *command, env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_logs())

    async def _read_logs(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "stderr", "message": line}
            record.setdefault("received_at", time.time())
            self.logs.append(record)
            self._log_changed.set()
            self._log_changed = asyncio.Event()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs if r.get("event") == name]

    async def wait_log(self, name: str, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Wait until the process logged event ``name``; return the first such record."""
        async with asyncio.timeout(timeout):
            while True:
                found = self.events(name)
                if found:
                    return found[0]
                if self.returncode is not None or (self._reader and self._reader.done()):
                    raise RuntimeError(f"{self.instance_id} exited before logging {name}:\n"
                                       + self.tail())
                await self._log_changed.wait()

    async def wait_ready(self, dev: DevServer, timeout: float = 15.0) -> ConnectionInfo:  # noqa: ASYNC109
        """Wait until this worker has a READY connection on ``dev``.

        A worker that exits first (a target that does not import, a bad setting) fails
        at once with its last log line, not after ``timeout``."""
        ready = asyncio.ensure_future(dev.wait_for_connection(
            lambda c: c.instance_id == self.instance_id, timeout=timeout
        ))
        waitables: set[asyncio.Future[Any]] = {ready}
        if self._reader is not None:
            waitables.add(self._reader)
        try:
            await asyncio.wait(waitables, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not ready.done():
                ready.cancel()
        if ready.done() and not ready.cancelled():
            if ready.exception() is None:
                return ready.result()
            raise TimeoutError(f"{self.instance_id} not ready after {timeout} s:\n"
                               + self.tail())
        assert self._proc is not None
        code = await self._proc.wait()
        last = self.logs[-1].get("message", "") if self.logs else ""
        raise RuntimeError(f"worker {self.instance_id} exited with code {code} before it "
                           f"was ready: {last}".rstrip(": "))

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        assert self._proc is not None
        if self._proc.returncode is not None:
            return  # already gone (a crash): there is nobody to signal
        if self.signalled_at is None:
            self.signalled_at = time.time()
        self._proc.send_signal(signum)

    def kill(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    def crash(self) -> None:
        """SIGKILL, recorded as a crash: nothing of the drain runs."""
        if self._proc is not None and self._proc.returncode is None:
            self.killed_at = time.time()
            self._proc.send_signal(signal.SIGKILL)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def rss_bytes(self) -> int | None:
        """Resident memory from /proc (Linux); None elsewhere or once exited."""
        if not self.alive:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
        return None

    async def wait(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """Wait for exit; returns the exit code (kills the process on timeout)."""
        assert self._proc is not None
        try:
            self.returncode = await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            self.kill()
            self.returncode = await self._proc.wait()
            raise TimeoutError(f"{self.instance_id} did not exit in {timeout} s:\n"
                               + self.tail()) from None
        self.exited_at = time.time()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, 5)
        return self.returncode

    async def stop(self, timeout: float = 30.0) -> int:  # noqa: ASYNC109
        """SIGTERM and wait (the normal way a deploy stops a worker)."""
        if self._proc is None:
            return 0
        if self._proc.returncode is None:
            self.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(json.dumps(r) for r in self.logs[-lines:])

    async def __aenter__(self) -> WorkerProcess:
        """Start the process (unless ``autostart`` is off); kill it on exit if still alive."""
        if self.autostart:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


async def replace_when_ready(dev: DevServer, live: list[WorkerProcess], slot: int,
                             replacement: WorkerProcess, timeout: float = 15.0,  # noqa: ASYNC109
                             *, with_work: bool = False) -> WorkerProcess:
    """One step of a rolling deploy, the way Railway does it with a healthcheck: start
    ``replacement``, wait until it is READY, then put it in ``live[slot]`` and SIGTERM
    the process it replaces (whichever is there by then: a crash may have restarted it
    meanwhile). With ``with_work``, the signal waits (at most ``timeout``) until the old
    process has a step in flight, so its drain has something to carry. Returns that old
    process; the caller awaits its exit."""
    await replacement.start()
    await replacement.wait_ready(dev, timeout)
    old, live[slot] = live[slot], replacement
    if with_work:
        with contextlib.suppress(TimeoutError):
            await dev.wait_for(lambda: has_step_in_flight(dev, old.instance_id), timeout)
    old.send_signal()
    return old


def has_step_in_flight(dev: DevServer, instance_id: str) -> bool:
    """Whether a step ACKed by ``instance_id`` has no reply yet."""
    conns = {c.conn_id for c in dev.connections if c.instance_id == instance_id}
    return any(d.conn_id in conns and d.acked_at and not d.replied_at for d in dev.dispatches)


def read_executions(path: str) -> list[dict[str, Any]]:
    """Step-body executions recorded by connect_worker.lab.apps.execution_log (one JSON
    line each)."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
