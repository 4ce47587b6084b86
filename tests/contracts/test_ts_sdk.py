"""The official TypeScript SDK's Connect worker (npm ``inngest``, pinned in ts/package-lock.json)
against the dev gateway, both in their default settings: the SDK checkpoints steps over
``POST /v1/checkpoint/{run_id}/async`` and ends runs with ``RunComplete``; the gateway runs
the test fixture's config, realistic races included.

One Node process per worker (tests/contracts/ts/worker.mjs); each appends a line per step
body executed to a shared file, so every body is counted across workers. Node and the SDK
are installed by scripts/setup.d/node.sh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

from google.protobuf.unknown_fields import UnknownFieldSet

from connect_worker.devserver import ConnStatus, DevServer, RunStatus
from connect_worker.devserver.testing import fast_config, realistic_races

from ..missing import missing

log = logging.getLogger(__name__)

TS_DIR = Path(__file__).parent / "ts"
SDK_PACKAGE = TS_DIR / "node_modules" / "inngest" / "package.json"


def _node() -> tuple[str, int]:
    """The node binary and its major version, or skip (fail in CI) saying what is missing."""
    node = shutil.which("node")
    problem = None
    major = 0
    if node is None:
        problem = "node is not installed"
    else:
        out = subprocess.run([node, "-p", "process.versions.node"], capture_output=True,
                             text=True, timeout=30, check=False).stdout.strip()
        major = int(out.split(".")[0]) if out[:1].isdigit() else 0
        if major < 20:
            problem = f"node {out or '?'} is too old (the inngest SDK needs >= 20)"
        elif not SDK_PACKAGE.exists():
            problem = "the inngest npm package is not installed in tests/contracts/ts"
    if problem is not None:
        missing(f"{problem}: run scripts/setup.d/node.sh")
    assert node is not None
    return node, major


class NodeWorker:
    """``node worker.mjs`` as a subprocess; its output is kept for failure messages."""

    def __init__(self, node: tuple[str, int], api_url: str, worker_id: str, exec_log: Path,
                 slow_ms: int = 1500) -> None:
        self.node, major = node
        self.worker_id = worker_id
        env = {k: v for k, v in os.environ.items() if not k.startswith("INNGEST_")}
        env.update(INNGEST_BASE_URL=api_url, WORKER_ID=worker_id, EXEC_LOG=str(exec_log),
                   SLOW_MS=str(slow_ms))
        if major < 22:  # the global WebSocket the SDK uses is behind a flag on Node 20-21
            env["NODE_OPTIONS"] = f"{env.get('NODE_OPTIONS', '')} --experimental-websocket"
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._active = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.node, "worker.mjs", cwd=TS_DIR, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        try:
            async with asyncio.timeout(30):
                await self._active.wait()
        except TimeoutError:
            raise AssertionError(f"{self.worker_id} never connected:\n{self.tail()}") from None

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            if line.startswith("ACTIVE "):
                self._active.set()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.output[-n:])

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout):
                code = await self.proc.wait()
                if self._reader is not None:
                    await self._reader
                return code
        except TimeoutError:
            raise AssertionError(f"{self.worker_id} did not exit:\n{self.tail()}") from None

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.proc.wait(), 10)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


def _executions(exec_log: Path) -> list[tuple[str, str, int]]:
    """(worker, step, attempt) per step body executed."""
    if not exec_log.exists():
        return []
    rows = [line.split() for line in exec_log.read_text().splitlines() if line.strip()]
    return [(w, s, int(a)) for w, s, a in rows]


def _run_list(dev: DevServer) -> str:
    """One line per run, then its dispatches: which worker, which step, how it ended."""
    names = {c.conn_id: c.instance_id for c in dev.connections}
    lines = []
    for run in dev.runs.values():
        dispatches = [d for d in dev.dispatches if d.run_id == run.run_id]
        checkpointed = sum(1 for h in run.history if h.get("via") == "checkpoint")
        lines.append(
            f"{run.function_slug:<24} {run.status.value:<9} steps={len(run.steps)}"
            f" (checkpointed {checkpointed}) dispatches={len(dispatches)}"
            f" output={json.dumps(run.output)}"
        )
        lines.extend(
            f"    {names.get(d.conn_id, d.conn_id)} step={d.step_id[:8]} attempt={d.attempt}"
            f" {d.outcome}" for d in dispatches
        )
    return "\n".join(lines)


async def test_ts_sdk_default_settings_steps_parallel_sleep_retry_and_drain(
    tmp_path: Path,
) -> None:
    node = _node()
    exec_log = tmp_path / "executions.log"
    async with DevServer(fast_config()) as dev:
        realistic_races(dev)
        worker_a = NodeWorker(node, dev.api_url, "ts-a", exec_log, slow_ms=2000)
        worker_b = NodeWorker(node, dev.api_url, "ts-b", exec_log)
        try:
            await worker_a.start()
            conn_a = (await dev.wait_for_connection(timeout=15)).conn_id
            info = dev.connection(conn_a)
            assert info.connect_request.sdk_language in {"typescript", "js"}, info
            # The SDK reports its feature observations; our schema decodes every field.
            app = info.connect_request.apps[0]
            assert app.HasField("feature_observations"), app
            for message in (info.connect_request, app, app.feature_observations):
                assert len(UnknownFieldSet(message)) == 0, message
            log.info("TS feature observations: %s", app.feature_observations)
            await worker_b.start()
            await dev.wait_for(lambda: sum(c.status is ConnStatus.READY
                                           for c in dev.connections) == 2, timeout=15)
            # A gets every request while it is routable; B only what comes after A paused.
            dev.faults.route = lambda conns: conn_a if conn_a in conns else None

            # 3 steps, checkpointed inside one request; a retry, a sleep, parallel steps.
            three = (await dev.send_event("ts/three", {"n": 7}))[0]
            mixed = (await dev.send_event("ts/mixed"))[0]
            run3 = await dev.wait_for_run(three, timeout=30)
            runm = await dev.wait_for_run(mixed, timeout=30)
            assert run3.status is RunStatus.COMPLETED, dev.dump()
            assert run3.output == {"a": "a-ok", "b": "b-ok", "c": "c-ok", "n": 7}
            assert runm.status is RunStatus.COMPLETED, dev.dump()
            assert runm.output == ["p1", "p2", "flaky", "last"]
            # The checkpointing path: all three steps stored via the API, one dispatch.
            assert [h.get("via") for h in run3.history if h["type"] == "step_completed"] == [
                "checkpoint"] * 3
            assert sum(d.run_id == three for d in dev.dispatches) == 1
            kinds = [h["type"] for h in runm.history]
            assert "step_errored" in kinds and "sleep" in kinds
            # After the parallel fan-out the run plans each step, "last" too.
            assert [h["name"] for h in runm.history if h["type"] == "step_planned"] == [
                "p1", "p2", "last"]

            # Drain: a slow step is in flight on A when A gets SIGTERM; B takes new work.
            slow = (await dev.send_event("ts/slow"))[0]
            await dev.wait_for(lambda: ("ts-a", "work", 0) in _executions(exec_log),
                               timeout=15)
            worker_a.terminate()
            assert ("ts-a", "after", 0) not in _executions(exec_log)  # still in "work"
            await dev.wait_for(lambda: dev.connection(conn_a).paused, timeout=10)
            after_drain = (await dev.send_event("ts/three", {"n": 8}))[0]
            assert await worker_a.wait(timeout=30) == 0, worker_a.tail()
            runs = await dev.wait_for_run(slow, timeout=30)
            run_b = await dev.wait_for_run(after_drain, timeout=30)
            assert runs.status is RunStatus.COMPLETED, dev.dump()
            assert runs.output == {"work": "worked", "after": "after"}
            assert run_b.status is RunStatus.COMPLETED, dev.dump()

            log.info("TS SDK contract run list:\n%s", _run_list(dev))
            executions = _executions(exec_log)
            log.info("step bodies executed (worker, step, attempt): %s", executions)
            counts = Counter(step for _, step, _ in executions)
            # Each body once, except the deliberate retry; a and b, c twice (two runs).
            assert counts == {"a": 2, "b": 2, "c": 2, "flaky": 2, "p1": 1, "p2": 1, "last": 1,
                              "work": 1, "after": 1}, executions
            assert [a for _, s, a in executions if s == "flaky"] == [0, 1]
            # The in-flight run finished on A during its drain; work sent after A
            # paused ran on B only.
            assert [(w, s) for w, s, _ in executions if s in ("work", "after")] == [
                ("ts-a", "work"), ("ts-a", "after")], executions
            assert [s for w, s, _ in executions if w == "ts-b"] == ["a", "b", "c"], executions
            assert not dev.errors, dev.errors
        finally:
            await worker_a.stop()
            await worker_b.stop()
