"""Inngest's own dev server (``inngest dev``) as a subprocess, and the few calls of its
HTTP API the real-server tests and lab tools need.

The binary is whatever ``inngest`` the machine has: ``INNGEST_CLI`` (a path) or ``inngest``
on ``PATH``. Nothing here installs or downloads it; :data:`HOW_TO_GET` says how to.

The server gets four free ports on 127.0.0.1 (API + events, Connect gateway, and the
gateway's and executor's internal gRPC ports) and ``--no-discovery --no-poll`` so it only
sees the workers a test starts. It is ready when ``POST /v0/connect/start`` answers 200
(what the Python SDK's own test harness waits for) and its gateway answers ``GET /ready``.
Its stdout and stderr go to a log file the caller names (tests attach it to a failure).

Two things about its API a caller would trip over:

* ``GET /v1/...`` responses are cached inside the server (3 s for a run, 15 s for an
  event's runs, keyed by URL): every read here adds a unique query parameter.
* Run statuses are strings (``"Running"``, ``"Completed"``, ``"Failed"``, ``"Cancelled"``);
  an event's runs can be empty for a moment after the event was accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import httpx

from ..protocol import pb

HOW_TO_GET = (
    "Inngest's dev server binary is not available: install Inngest's CLI so that "
    "`inngest` is on PATH, or set INNGEST_CLI to the binary's path"
)
# The dev server's fixed environment (pkg/consts/devserver.go), used in its URLs.
DEV_ENV_ID = "00000000-0000-4000-b000-000000000000"
TERMINAL_STATUSES = frozenset({"Completed", "Failed", "Cancelled"})
# Any key is accepted by a dev server started without event keys.
EVENT_KEY = "dev"

T = TypeVar("T")


def find_binary(environ: Mapping[str, str] | None = None) -> str | None:
    """``INNGEST_CLI`` if it names an executable file, else ``inngest`` on PATH."""
    environ = os.environ if environ is None else environ
    configured = environ.get("INNGEST_CLI", "")
    if configured:
        path = shutil.which(configured)
        return path
    return shutil.which("inngest", path=environ.get("PATH"))


def server_version(binary: str, timeout: float = 10.0) -> str:
    """What ``inngest version`` prints (its first line), e.g. ``v1.43.0-<hash>``."""
    done = subprocess.run([binary, "version"], capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if lines else f"unknown (exit {done.returncode})"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass(frozen=True)
class Run:
    """A function run as ``GET /v1/runs/{id}`` (or an event's runs) describes it."""

    run_id: str
    status: str
    function_id: str
    event_id: str
    output: Any
    ended_at: str | None
    raw: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        output = data.get("output")
        if isinstance(output, str):
            # The output is the function's JSON return value, sometimes still encoded.
            with contextlib.suppress(ValueError):
                output = json.loads(output)
        return cls(run_id=str(data.get("run_id", "")), status=str(data.get("status", "")),
                   function_id=str(data.get("function_id", "")),
                   event_id=str(data.get("event_id", "")), output=output,
                   ended_at=data.get("ended_at"), raw=data)


@dataclass
class InngestDevServer:
    """``inngest dev`` on free loopback ports; an async context manager.

    ``retry_interval`` (seconds, >= 1) replaces the server's retry backoff table
    (15 s, 30 s, 1 min, ... plus up to 30 s of jitter) with a fixed interval; None keeps
    the table users get by default.
    """

    binary: str
    log_path: Path
    retry_interval: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 60.0
    api_port: int = 0
    gateway_port: int = 0
    gateway_grpc_port: int = 0
    executor_grpc_port: int = 0
    pid: int | None = None
    _proc: asyncio.subprocess.Process | None = None
    _log: IO[bytes] | None = None
    _client: httpx.AsyncClient | None = None
    _nonce: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def running_at(cls, url: str) -> InngestDevServer:
        """The API of a dev server started elsewhere (``--server URL`` of the lab tools);
        ``stop()`` only closes the HTTP client."""
        server = cls(binary="", log_path=Path(os.devnull),
                     api_port=urlsplit(url).port or 80)
        server._client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=10.0)
        return server

    @property
    def api_url(self) -> str:
        """The API and event origin (``INNGEST_API_BASE_URL`` for a worker)."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def gateway_url(self) -> str:
        """The Connect gateway's WebSocket URL, as ``/v0/connect/start`` hands it out."""
        return f"ws://127.0.0.1:{self.gateway_port}/v0/connect"

    def command(self) -> list[str]:
        args = [
            self.binary, "dev", "--no-discovery", "--no-poll", "--host", "127.0.0.1",
            "--port", str(self.api_port),
            "--connect-gateway-port", str(self.gateway_port),
            "--connect-gateway-grpc-port", str(self.gateway_grpc_port),
            "--connect-executor-grpc-port", str(self.executor_grpc_port),
            "--connect-gateway-grpc-ip", "127.0.0.1",
            "--connect-executor-grpc-ip", "127.0.0.1",
        ]
        if self.retry_interval is not None:
            args += ["--retry-interval", str(self.retry_interval)]
        return args

    async def start(self) -> None:
        if self._proc is not None:
            return
        (self.api_port, self.gateway_port, self.gateway_grpc_port,
         self.executor_grpc_port) = free_ports(4)
        env = {
            **os.environ,
            # The gateway's own logs are hidden otherwise; they are what explains a failure.
            "CONNECT_GATEWAY_FULL_LOGS": "true",
            "DO_NOT_TRACK": "1",
            **self.extra_env,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: ASYNC230 - a local log file
        # Its own working directory: the dev server may write state (SQLite) there.
        workdir = self.log_path.parent / f"{self.log_path.stem}-home"
        workdir.mkdir(exist_ok=True)
        self._proc = await asyncio.create_subprocess_exec(
            *self.command(), cwd=workdir, env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, start_new_session=True)
        self.pid = self._proc.pid
        self._client = httpx.AsyncClient(base_url=self.api_url, timeout=10.0)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self) -> None:
        """Poll (bounded) until the API hands out gateways and the gateway is up."""
        assert self._proc is not None and self._client is not None
        deadline = time.monotonic() + self.startup_timeout
        gateway_ready = f"http://127.0.0.1:{self.gateway_port}/ready"
        while True:
            if self._proc.returncode is not None:
                raise RuntimeError(f"inngest dev exited with code {self._proc.returncode} "
                                   f"before it was ready; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                start = await self._client.post("/v0/connect/start", content=b"")
                if start.status_code == 200:
                    parsed = pb.StartResponse()
                    parsed.ParseFromString(start.content)
                    # The server moves to another port when one is taken (a race with
                    # free_ports): then this is not our server's gateway.
                    if not parsed.gateway_endpoint.endswith(f":{self.gateway_port}/v0/connect"):
                        raise RuntimeError(f"inngest dev did not get gateway port "
                                           f"{self.gateway_port}: {parsed.gateway_endpoint}")
                    ready = await self._client.get(gateway_ready)
                    if ready.status_code == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"inngest dev not ready after {self.startup_timeout} s; "
                                   f"see {self.log_path}")
            await asyncio.sleep(0.1)

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """SIGTERM by pid (the server exits 0 on it), SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> InngestDevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def log_text(self, limit: int = 200_000) -> str:
        """The end of the server's log (for a failing test's report)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode(errors="replace")

    # ----- its HTTP API ---------------------------------------------------------------

    @property
    def client(self) -> httpx.AsyncClient:
        assert self._client is not None, "the server is not running"
        return self._client

    async def _get(self, path: str) -> Any:
        # A fresh query parameter each time: the server caches GET /v1/* by URL.
        response = await self.client.get(path, params={"_": str(next(self._nonce))})
        response.raise_for_status()
        return response.json()

    async def send_events(self, events: Sequence[dict[str, Any]]) -> list[str]:
        """``POST /e/<key>``; returns the event ids (one per event)."""
        response = await self.client.post(f"/e/{EVENT_KEY}", json=list(events))
        response.raise_for_status()
        ids = response.json().get("ids", [])
        return [str(i) for i in ids]

    async def send_event(self, name: str, data: dict[str, Any]) -> str:
        (event_id,) = await self.send_events([{"name": name, "data": data}])
        return event_id

    async def event_runs(self, event_id: str) -> list[Run]:
        """``GET /v1/events/{id}/runs``: the runs the event started (maybe none yet)."""
        body = await self._get(f"/v1/events/{event_id}/runs")
        return [Run.from_json(r) for r in body.get("data") or []]

    async def run(self, run_id: str) -> Run:
        """``GET /v1/runs/{id}``."""
        body = await self._get(f"/v1/runs/{run_id}")
        return Run.from_json(body.get("data") or {})

    async def connections(self) -> list[dict[str, Any]]:
        """The dev server's view of the worker connections (a dev-only endpoint)."""
        body = await self._get(f"/v0/connect/envs/{DEV_ENV_ID}/conns")
        if isinstance(body, dict):
            found = body.get("data", body.get("conns", []))
            return list(found or [])
        return list(body or [])

    async def wait_for_event_run(self, event_id: str, timeout: float = 30.0) -> str:  # noqa: ASYNC109
        """The id of the (first) run ``event_id`` started."""
        runs = await poll(lambda: self.event_runs(event_id), bool, timeout,
                          f"a run for event {event_id}")
        return runs[0].run_id

    async def wait_for_run(self, run_id: str, timeout: float = 60.0) -> Run:  # noqa: ASYNC109
        """The run once it is Completed, Failed or Cancelled."""
        return await poll(lambda: self.run(run_id), lambda r: r.terminal, timeout,
                          f"run {run_id} to end")


async def poll(fetch: Callable[[], Awaitable[T]], done: Callable[[T], object],
               timeout: float, what: str, interval: float = 0.2) -> T:  # noqa: ASYNC109
    """Call ``fetch`` until ``done(result)``; bounded by ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        with contextlib.suppress(httpx.HTTPError):
            last = await fetch()
            if done(last):
                return last
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}; last seen: {last!r}")
        await asyncio.sleep(interval)
