"""One scenario on the real server: its app, its workers (each behind its own proxy), the
model stub, and the counts every scenario asserts on.

Counts come from three independent places: the step bodies' own execution log (what ran,
where, which attempt, which job id it saw), the frames the proxies saw (what the server
dispatched, which replies it acknowledged, which extensions it refused), and the model
stub (what a provider would have billed). The server's REST API says how runs ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connect_worker.lab.fleet import WorkerProcess, read_executions
from connect_worker.lab.inngest_dev import InngestDevServer, Run
from connect_worker.lab.wsproxy import Frame, WsProxy

from ..llm.stubs import StubProvider
from ..llm.util import SECRET

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("real_server")


class OfficialWorker(WorkerProcess):
    """The official SDK's Connect client serving the same app (official_worker.py)."""

    async def start(self) -> None:
        if self._proc is not None:
            return
        self.started_at = time.time()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.real_server.official_worker", cwd=ROOT,
            env=self.environment(), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_logs())


@dataclass
class Counts:
    """What a scenario promises about, in numbers (logged by every test)."""

    bodies_started: int
    bodies_ended: int
    bodies_cancelled: int
    duplicate_bodies: int  # (run, step) bodies that ran to their end more than once
    interrupted: int  # started, never ended nor cancelled (the process died under it)
    dispatches: int  # GATEWAY_EXECUTOR_REQUEST frames
    requests_acked: int  # distinct requests a worker took (WORKER_REQUEST_ACK)
    replies: int  # distinct requests the workers replied to (WORKER_REPLY or flush)
    replies_acked: int  # ... and the server acknowledged (WORKER_REPLY_ACK, flush 200)
    replies_flushed: int  # ... of which through POST /v0/connect/flush
    # EXTEND_LEASE_ACK without a new lease id for a step not replied to yet (a NACK
    # after the reply is normal: the server deletes a lease once it used the reply).
    extensions_nacked: int
    model_requests: int

    def line(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in vars(self).items())


@dataclass
class Scenario:
    server: InngestDevServer
    stub: StubProvider
    tmp: Path
    app_id: str
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    proxies: dict[str, WsProxy] = field(default_factory=dict)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @property
    def exec_log(self) -> Path:
        return self.tmp / f"{self.app_id}-executions.jsonl"

    def _env(self, proxy: WsProxy) -> dict[str, str]:
        return {
            "PYTHONPATH": str(ROOT),
            "RS_APP_ID": self.app_id,
            "CONNECT_WORKER_EXECUTION_LOG": str(self.exec_log),
            "OPENAI_API_KEY": SECRET,
            "OPENAI_BASE_URL": self.stub.base_url,
        }

    async def _proxy(self, name: str) -> WsProxy:
        proxy = await self.stack.enter_async_context(
            WsProxy(self.server.gateway_url, name=name))
        self.proxies[name] = proxy
        self.stack.callback(self._dump_frames, name, proxy)
        return proxy

    def _dump_frames(self, name: str, proxy: WsProxy) -> None:
        """Every frame the proxy saw, one JSON line each (for reading a failure)."""
        path = self.tmp / f"{self.app_id}-{name}-frames.jsonl"
        path.write_text("".join(json.dumps(f.to_json(), default=str) + "\n"
                                for f in proxy.frames))

    async def ours(self, name: str, *, app_version: str = "v1", drain_timeout: float = 20.0,
                   **env: str) -> WorkerProcess:
        """A connect_worker process, started, behind its own proxy."""
        proxy = await self._proxy(name)
        worker = WorkerProcess(
            "tests.real_server.app", api_url=self.server.api_url, instance_id=name,
            app_version=app_version, drain_timeout=drain_timeout,
            env={**self._env(proxy), "INNGEST_CONNECT_GATEWAY_URL": proxy.url,
                 "CONNECT_WORKER_LLM_PROVIDER": "openai",
                 "CONNECT_WORKER_LLM_CACHE": str(self.tmp / f"{self.app_id}-llm.sqlite3"),
                 **env})
        self.workers[name] = await self.stack.enter_async_context(worker)
        return worker

    async def official(self, name: str, *, app_version: str = "v1", drain_timeout: float = 0.0,
                       **env: str) -> WorkerProcess:
        """The official SDK's Connect client, started, behind its own proxy. It has no
        setting for ``app_version`` nor a drain deadline: both are ignored."""
        proxy = await self._proxy(name)
        worker = OfficialWorker(
            "official", api_url=self.server.api_url, instance_id=name,
            env={**self._env(proxy), "RS_GATEWAY_URL": proxy.url, "RS_INSTANCE_ID": name,
                 "INNGEST_DEV": "1", **env})
        self.workers[name] = await self.stack.enter_async_context(worker)
        return worker

    async def ready(self, name: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Wait until the worker is routable: READY sent (ours) or handshake done (the
        official client is READY as soon as the gateway sends CONNECTION_READY)."""
        proxy = self.proxies[name]
        worker = self.workers[name]
        if isinstance(worker, OfficialWorker):
            await proxy.wait_kind("GATEWAY_CONNECTION_READY", timeout=timeout)
        else:
            ready = await proxy.wait_kind("WORKER_READY", timeout=timeout)
            await proxy.wait_forwarded(ready, timeout)

    # ----- driving and observing ----------------------------------------------------

    async def send_report(self, **data: Any) -> str:
        """Send the report event through the server's event API; the run id."""
        event_id = await self.server.send_event(f"{self.app_id}/report", data)
        return await self.server.wait_for_event_run(event_id)

    async def wait_run(self, run_id: str, timeout: float = 120.0) -> Run:  # noqa: ASYNC109
        return await self.server.wait_for_run(run_id, timeout=timeout)

    def executions(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in read_executions(str(self.exec_log))
                if all(e.get(k) == v for k, v in match.items())]

    async def wait_execution(self, timeout: float = 60.0, **match: Any) -> dict[str, Any]:  # noqa: ASYNC109
        """The first execution-log line with these fields (polled: it is a file)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.executions(**match)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no execution {match} within {timeout} s")
            await asyncio.sleep(0.05)

    def frames(self, kind: str | None = None, **match: Any) -> list[Frame]:
        out = [f for p in self.proxies.values() for f in p.select(kind)]
        return [f for f in out if all(f.fields.get(k) == v for k, v in match.items())]

    def dispatches_by_job(self) -> dict[str, list[Frame]]:
        jobs: defaultdict[str, list[Frame]] = defaultdict(list)
        for frame in self.frames("GATEWAY_EXECUTOR_REQUEST"):
            jobs[str(frame.fields.get("job_id"))].append(frame)
        return dict(jobs)

    def counts(self) -> Counts:
        runs = self.executions()
        phases: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        for e in runs:
            phases[(e["run_id"], e["step"])][e["phase"]] += 1
        started = sum(p["start"] for p in phases.values())
        ended = sum(p["end"] for p in phases.values())
        cancelled = sum(p["cancelled"] for p in phases.values())
        flushed = {str(e.get("request_id")) for w in self.workers.values()
                   for e in w.events("reply.flushed")}
        sent = {f.request_id for f in self.frames("WORKER_REPLY")}
        replied = sent | flushed
        acked = ({f.request_id for f in self.frames("WORKER_REPLY_ACK")} & sent) | flushed
        first_reply: dict[str | None, float] = {}
        for proxy in self.proxies.values():
            for f in proxy.select("WORKER_REPLY"):
                first_reply.setdefault(f.request_id, f.wall)
        nacks = [f for f in self.frames("WORKER_REQUEST_EXTEND_LEASE_ACK")
                 if not f.fields.get("new_lease_id")
                 and f.request_id not in flushed
                 and first_reply.get(f.request_id, float("inf")) > f.wall]
        return Counts(
            bodies_started=started, bodies_ended=ended, bodies_cancelled=cancelled,
            duplicate_bodies=sum(p["end"] - 1 for p in phases.values() if p["end"] > 1),
            interrupted=started - ended - cancelled,
            dispatches=len(self.frames("GATEWAY_EXECUTOR_REQUEST")),
            requests_acked=len({f.request_id for f in self.frames("WORKER_REQUEST_ACK")}),
            replies=len(replied), replies_acked=len(acked), replies_flushed=len(flushed),
            extensions_nacked=len(nacks),
            model_requests=len(self.stub.requests),
        )

    def report(self, title: str, **extra: object) -> Counts:
        counts = self.counts()
        more = "".join(f", {k}={v}" for k, v in extra.items())
        log.info("%s [%s]: %s%s", title, self.app_id, counts.line(), more)
        return counts


@contextlib.asynccontextmanager
async def scenario(server: InngestDevServer, tmp: Path, app_id: str
                   ) -> AsyncIterator[Scenario]:
    """A scenario with its own app id; every worker and proxy stops when it ends."""
    async with StubProvider("openai") as stub:
        found = Scenario(server, stub, tmp, app_id)
        async with found.stack:
            yield found


def pids_of(scn: Scenario, *names: str) -> set[int]:
    return {scn.workers[n].pid for n in names}

