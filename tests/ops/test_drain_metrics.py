"""End to end: a real worker process against the devserver, drained with a real SIGTERM.

The health listener is scraped while the drain runs: /readyz flips to 200 at READY and
to 503 at SIGTERM, the drain metrics move, and every log line is JSON with the
deployment fields. The drain's final values are set just before the process exits, so
they are read from the drain.end log line, as docs/observability.md says to.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from connect_worker.devserver import DevServer

REPO = Path(__file__).resolve().parents[2]
BOUND = 15.0
STATIC = {"deployment_id": "dep-drain-test", "replica_id": "replica-a"}


@dataclass
class WorkerProcess:
    proc: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int | None = None

    async def read_logs(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            text = raw.decode().rstrip("\n")
            self.raw.append(text)
            line = json.loads(text)  # every line must be JSON: a parse error fails the test
            self.lines.append(line)
            if line.get("event") == "health.listening":
                self.port = int(line["port"])
            self.changed.set()
            self.changed = asyncio.Event()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_event(self, name: str) -> dict[str, Any]:
        async with asyncio.timeout(BOUND):
            while not self.events(name):
                if self.proc.returncode is not None:
                    raise AssertionError(f"worker exited before {name}:\n" + "\n".join(self.raw))
                await self.changed.wait()
        return self.events(name)[0]

    def url(self, path: str) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}{path}"


@contextlib.asynccontextmanager
async def worker_process(dev: DevServer, **env: str) -> AsyncIterator[WorkerProcess]:
    environ = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "INNGEST_DEV": "1",
        "INNGEST_API_BASE_URL": dev.api_url,
        "CONNECT_WORKER_HTTP_PORT": "0",
        "CONNECT_WORKER_LOG_FORMAT": "json",
        "CONNECT_WORKER_INSTANCE_ID": "drain-test-1",
        "RAILWAY_DEPLOYMENT_ID": STATIC["deployment_id"],
        "RAILWAY_REPLICA_ID": STATIC["replica_id"],
        "CONNECT_WORKER_RECONNECT_MAX_BACKOFF": "0.5",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connect_worker", "run", "examples.pipeline",
        cwd=REPO, env=environ, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    worker = WorkerProcess(proc)
    reader = asyncio.create_task(worker.read_logs())
    try:
        yield worker
    finally:
        if proc.returncode is None:
            proc.kill()  # only this test's own child
        await asyncio.wait_for(proc.wait(), BOUND)
        await asyncio.wait_for(reader, BOUND)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


async def scrape_until(
    client: httpx.AsyncClient, worker: WorkerProcess,
    predicate: Callable[[dict[tuple[str, tuple[tuple[str, str], ...]], float]], bool],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape /metrics until ``predicate`` holds (bounded), as Prometheus would."""
    async with asyncio.timeout(BOUND):
        while True:
            metrics = samples((await client.get(worker.url("/metrics"))).text)
            if predicate(metrics):
                return metrics
            await asyncio.sleep(0.05)  # scrape interval, not synchronisation


def check_log_lines(worker: WorkerProcess) -> None:
    assert worker.lines
    for line in worker.lines:
        assert {"ts", "level", "logger", "message"} <= set(line), line
        for key, expected in STATIC.items():
            assert line[key] == expected, line
        assert line["instance_id"] == "drain-test-1"


async def test_drain_is_visible_on_readyz_metrics_and_logs(devserver: DevServer) -> None:
    async with worker_process(devserver, STEP_SECONDS="2", CONNECT_WORKER_DRAIN_TIMEOUT="20"
                              ) as worker, httpx.AsyncClient(timeout=BOUND) as client:
        await worker.wait_event("health.listening")
        ready_line = await worker.wait_event("connection.ready")
        assert ready_line["conn_id"]
        assert (await client.get(worker.url("/readyz"))).status_code == 200
        before = samples((await client.get(worker.url("/metrics"))).text)
        assert value(before, "connect_worker_connection_state", state="ready") == 1.0
        assert value(before, "connect_worker_draining") == 0.0
        build = [dict(labels) for name, labels in before if name == "connect_worker_build_info"]
        assert [b["deployment_id"] for b in build] == [STATIC["deployment_id"]]

        (run_id,) = await devserver.send_event("report/requested", {"topic": "drains"})
        during_step = await scrape_until(
            client, worker, lambda m: (value(m, "connect_worker_steps_in_flight") or 0) >= 1)
        assert value(during_step, "connect_worker_requests_acked_total") == 1.0

        worker.proc.send_signal(signal.SIGTERM)
        await worker.wait_event("drain.start")
        assert (await client.get(worker.url("/readyz"))).status_code == 503
        await worker.wait_event("drain.pause")
        draining = await scrape_until(
            client, worker, lambda m: value(m, "connect_worker_draining") == 1.0
            and value(m, "connect_worker_connection_state", state="paused") == 1.0)
        assert value(draining, "connect_worker_connection_state", state="ready") == 0.0
        assert (value(draining, "connect_worker_steps_in_flight") or 0) + (
            value(draining, "connect_worker_replies_awaiting_ack") or 0) >= 1
        assert value(draining, "connect_worker_steps_abandoned_total") == 0.0
        started = value(draining, "connect_worker_drain_started_timestamp_seconds")
        if started:  # set once the engine calls WorkerMetrics.start_drain()
            assert value(draining, "connect_worker_drain_budget_seconds") == 20.0

        async with asyncio.timeout(BOUND):
            code = await worker.proc.wait()
    assert code == 0, "\n".join(worker.raw)
    check_log_lines(worker)
    (start,) = worker.events("drain.start")
    assert start["in_flight"] >= 1 and start["drain_timeout"] == 20.0
    (end,) = worker.events("drain.end")
    assert (end["abandoned"], end["exit_code"]) == (0, 0)
    assert worker.events("drain.requested")[0]["signal"] == "SIGTERM"
    assert worker.events("drain.pause")
    assert not worker.events("drain.step_abandoned")
    # The step that was running at SIGTERM was finished and its result stored.
    research = [d for d in devserver.dispatches if d.run_id == run_id]
    assert research and all(d.replied_at is not None for d in research)


async def test_abandoned_steps_are_logged_and_counted(devserver: DevServer) -> None:
    async with worker_process(devserver, STEP_SECONDS="60", CONNECT_WORKER_DRAIN_TIMEOUT="1"
                              ) as worker, httpx.AsyncClient(timeout=BOUND) as client:
        await worker.wait_event("connection.ready")
        await devserver.send_event("report/requested", {"topic": "too long"})
        await scrape_until(
            client, worker, lambda m: (value(m, "connect_worker_steps_in_flight") or 0) >= 1)
        worker.proc.send_signal(signal.SIGTERM)
        draining = await scrape_until(
            client, worker, lambda m: value(m, "connect_worker_draining") == 1.0)
        assert value(draining, "connect_worker_steps_in_flight") == 1.0
        async with asyncio.timeout(BOUND):
            code = await worker.proc.wait()
    assert code == 3, "\n".join(worker.raw)
    check_log_lines(worker)
    (abandoned,) = worker.events("drain.step_abandoned")
    assert abandoned["level"] == "error"
    assert abandoned["function"] == "pipeline-report" and abandoned["run_id"]
    (end,) = worker.events("drain.end")
    assert (end["abandoned"], end["exit_code"]) == (1, 3)
