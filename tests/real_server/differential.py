"""The differential check's machinery: run one scenario against Inngest's dev server or
our dev gateway with the same worker, every socket through a recording ``WsProxy``, and
reduce each recording to what both servers must agree on.

A recording becomes a *digest*: per worker connection, its connection-level frames in
order (handshake, PAUSE, close) and, per request, that request's frames in order
(request, ACK, reply, reply ACK); the field names each kind of frame carried; a few
values that are protocol (the READY intervals, the close code and reason, the shape of
``step_id``, the keys of ``request_payload`` and its ``ctx``); and the run's outcome.
Heartbeats, WORKER_STATUS and lease extensions are left out of the orders: when they
happen depends on the clock, not on the server (extensions are compared by their
fields). Timings go into ``figures`` for the report, never into a comparison.
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connect_worker.devserver import DevServer, DevServerConfig
from connect_worker.lab.fleet import WorkerProcess, read_executions
from connect_worker.lab.inngest_dev import InngestDevServer
from connect_worker.lab.wsproxy import Frame, WsProxy

APP = "connect_worker.lab.apps.pipeline"
EVENT = "report/requested"
# Clock-driven frames: compared by their fields only, never by their place in an order.
UNORDERED = frozenset({"WORKER_HEARTBEAT", "GATEWAY_HEARTBEAT", "WORKER_STATUS",
                       "WORKER_REQUEST_EXTEND_LEASE", "WORKER_REQUEST_EXTEND_LEASE_ACK"})
ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


@dataclass
class Target:
    """One server under test, as the scenarios see it."""

    name: str  # "inngest" or "dev"
    api_url: str
    gateway_url: str
    send_event: Callable[[str, dict[str, Any]], Awaitable[str]]  # -> run id
    wait_run: Callable[[str], Awaitable[str]]  # run id -> final status, lower case


@asynccontextmanager
async def inngest_target(server: InngestDevServer) -> AsyncIterator[Target]:
    async def send(name: str, data: dict[str, Any]) -> str:
        return await server.wait_for_event_run(await server.send_event(name, data))

    async def wait(run_id: str) -> str:
        return (await server.wait_for_run(run_id, timeout=60)).status.lower()

    yield Target("inngest", server.api_url, server.gateway_url, send, wait)


@asynccontextmanager
async def dev_target() -> AsyncIterator[Target]:
    """Our dev gateway with its production timings (the ones Inngest's server uses)."""
    async with DevServer(DevServerConfig()) as dev:
        async def send(name: str, data: dict[str, Any]) -> str:
            (run_id,) = await dev.send_event(name, data)
            return run_id

        async def wait(run_id: str) -> str:
            return (await dev.wait_for_run(run_id, timeout=60)).status.value.lower()

        yield Target("dev", dev.api_url, dev.gateway.urls[dev.config.gateway_groups[0]],
                     send, wait)


@dataclass
class Recording:
    scenario: str
    target: str
    proxies: dict[str, WsProxy]  # worker name -> its proxy
    run_status: str
    executions: dict[str, int]  # step name -> bodies run
    exit_codes: dict[str, int | None]
    flushed: int  # replies the workers delivered through /v0/connect/flush
    marks: dict[str, float] = field(default_factory=dict)  # proxy-clock times of events


class Bench:
    """The workers and proxies of one scenario run on one target."""

    def __init__(self, target: Target, workdir: Path, stack: AsyncExitStack) -> None:
        self.target = target
        self.workdir = workdir
        self.stack = stack
        self.exec_log = str(workdir / f"{target.name}-executions.jsonl")
        self.proxies: dict[str, WsProxy] = {}
        self.workers: dict[str, WorkerProcess] = {}

    async def worker(self, name: str, *, step_seconds: float, start: bool = True,
                     env: dict[str, str] | None = None) -> WorkerProcess:
        proxy = await self.stack.enter_async_context(
            WsProxy(self.target.gateway_url, name=name))
        self.proxies[name] = proxy
        process = WorkerProcess(APP, api_url=self.target.api_url, instance_id=name,
                                drain_timeout=20.0, autostart=False, env={
                                    "INNGEST_CONNECT_GATEWAY_URL": proxy.url,
                                    "STEP_SECONDS": str(step_seconds),
                                    "CONNECT_WORKER_EXECUTION_LOG": self.exec_log,
                                    **(env or {})})
        self.workers[name] = await self.stack.enter_async_context(process)
        if start:
            await self.ready(name)
        return process

    async def ready(self, name: str) -> None:
        worker = self.workers[name]
        await worker.start()
        await worker.wait_log("connection.ready", timeout=30)

    def recording(self, scenario: str, status: str, marks: dict[str, float]) -> Recording:
        counts: dict[str, int] = {}
        if os.path.exists(self.exec_log):
            for record in read_executions(self.exec_log):
                counts[str(record["step"])] = counts.get(str(record["step"]), 0) + 1
        return Recording(scenario, self.target.name, self.proxies, status, counts,
                         {n: w.returncode for n, w in self.workers.items()},
                         sum(len(w.events("reply.flushed")) for w in self.workers.values()),
                         marks)


# ----- the scenarios (the same driver for both targets) -------------------------------


async def three_steps(target: Target, workdir: Path) -> Recording:
    """A report of three steps on one worker, then SIGTERM with nothing in flight."""
    async with AsyncExitStack() as stack:
        bench = Bench(target, workdir, stack)
        worker = await bench.worker("w1", step_seconds=0.05)
        run_id = await target.send_event(EVENT, {"topic": "differential"})
        status = await target.wait_run(run_id)
        assert await worker.stop() == 0
        return bench.recording("three_steps", status, {})


async def drain_mid_step(target: Target, workdir: Path) -> Recording:
    """SIGTERM while the first step runs on w1; w2 is READY and takes the rest."""
    async with AsyncExitStack() as stack:
        bench = Bench(target, workdir, stack)
        old = await bench.worker("old", step_seconds=3.0)
        run_id = await target.send_event(EVENT, {"topic": "drain"})
        proxy = bench.proxies["old"]
        await proxy.wait_kind("WORKER_REQUEST_ACK", direction="worker", timeout=30)
        await bench.worker("new", step_seconds=0.05)
        marks = {"sigterm": proxy.now()}
        old.send_signal(signal.SIGTERM)
        assert await old.wait(30) == 0
        status = await target.wait_run(run_id)
        await bench.workers["new"].stop()
        return bench.recording("drain_mid_step", status, marks)


async def reply_after_drop(target: Target, workdir: Path) -> Recording:
    """The socket is cut as the first step's reply crosses it (the reply is lost with
    it): with no socket the worker sends the reply through /v0/connect/flush at once
    (HTTP, not through the proxy), reconnects, and the run goes on there."""
    async with AsyncExitStack() as stack:
        bench = Bench(target, workdir, stack)
        worker = await bench.worker("w1", step_seconds=0.3)
        proxy = bench.proxies["w1"]
        proxy.drop_on("WORKER_REPLY", direction="worker", forward=False)
        run_id = await target.send_event(EVENT, {"topic": "drop"})
        status = await target.wait_run(run_id)
        assert await worker.stop() == 0
        return bench.recording("reply_after_drop", status, {})


SCENARIOS: dict[str, Callable[[Target, Path], Awaitable[Recording]]] = {
    "three_steps": three_steps,
    "drain_mid_step": drain_mid_step,
    "reply_after_drop": reply_after_drop,
}


# ----- digests and the comparison ------------------------------------------------------


def _shape(value: Any) -> str:
    """``step_id`` and friends by form, not value: ids differ from run to run."""
    if not isinstance(value, str):
        return type(value).__name__
    if value == "step":
        return "'step'"
    if ULID.fullmatch(value):
        return "ulid"
    if re.fullmatch(r"[0-9a-f]{40}", value):
        return "sha1-hex"
    return "text"


def _label(frame: Frame) -> str:
    side = {"worker": "W", "gateway": "G", "proxy": "P"}[frame.direction]
    if frame.kind == "CLOSE":
        return f"{side}:CLOSE {frame.fields.get('code')} {frame.fields.get('reason', '')}"
    return f"{side}:{frame.kind}"


def digest(recording: Recording) -> dict[str, Any]:
    """What both servers must agree on (see the module docstring)."""
    out: dict[str, Any] = {"run": recording.run_status, "executions": recording.executions,
                           "exit_codes": recording.exit_codes, "flushed": recording.flushed}
    fields: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}

    def note(key: str, value: Any) -> None:
        values.setdefault(key, set()).add(str(value))

    for name, proxy in recording.proxies.items():
        conns: dict[int, list[Frame]] = {}
        for frame in proxy.frames:
            if frame.direction != "proxy":
                conns.setdefault(frame.conn, []).append(frame)
        for index, (_, frames) in enumerate(sorted(conns.items()), start=1):
            key = f"{name}#{index}"
            out[f"{key} connection"] = [_label(f) for f in frames
                                        if not f.request_id and f.kind not in UNORDERED]
            requests: dict[str, list[str]] = {}
            for frame in frames:
                if frame.request_id and frame.kind not in UNORDERED:
                    requests.setdefault(frame.request_id, []).append(_label(frame))
            out[f"{key} requests"] = list(requests.values())
        for frame in proxy.frames:
            if frame.direction == "proxy" or frame.kind == "CLOSE":
                continue
            fields.setdefault(frame.kind, set()).update(frame.fields)
            if frame.kind == "GATEWAY_CONNECTION_READY":
                for interval, value in frame.fields.items():
                    note(f"READY.{interval}", value)
            elif frame.kind == "GATEWAY_EXECUTOR_REQUEST":
                note("REQUEST.step_id", _shape(frame.fields.get("step_id")))
                note("REQUEST.lease_id", _shape(frame.fields.get("lease_id")))
                payload = frame.fields.get("request_payload")
                if isinstance(payload, dict):
                    note("REQUEST.payload keys", sorted(payload))
                    ctx = payload.get("ctx")
                    if isinstance(ctx, dict):
                        note("REQUEST.payload ctx keys", sorted(ctx))
                for trace in ("system_trace_ctx", "user_trace_ctx"):
                    carried = frame.fields.get(trace)
                    note(f"REQUEST.{trace} keys",
                         sorted(carried) if isinstance(carried, dict) else _shape(carried))
            elif frame.kind == "WORKER_REQUEST_EXTEND_LEASE_ACK":
                note("EXTEND_ACK.new_lease_id", _shape(frame.fields.get("new_lease_id")))
    out["fields"] = {kind: sorted(names) for kind, names in sorted(fields.items())}
    out["values"] = {key: sorted(found) for key, found in sorted(values.items())}
    return out


def differences(real: dict[str, Any], dev: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, detail) for every entry of the two digests that differs."""
    found: list[tuple[str, str]] = []
    for key in sorted(set(real) | set(dev)):
        a, b = real.get(key), dev.get(key)
        if key in ("fields", "values"):
            for sub in sorted(set(a or {}) | set(b or {})):
                x, y = (a or {}).get(sub), (b or {}).get(sub)
                if x != y:
                    found.append((f"{key} {sub}", f"inngest {x} / dev {y}"))
        elif a != b:
            found.append((key, f"inngest {a} / dev {b}"))
    return found


def unexplained(scenario: str, diffs: list[tuple[str, str]],
                allowed: dict[tuple[str, str], str]) -> list[str]:
    """The differences no allow-list entry (scenario glob, what glob) covers."""
    return [f"{scenario}: {what}: {detail}" for what, detail in diffs
            if not any(fnmatch.fnmatchcase(scenario, s) and fnmatch.fnmatchcase(what, w)
                       for s, w in allowed)]


def figures(recording: Recording) -> dict[str, Any]:
    """Timings read off the recording (seconds on the proxy's clock), for the report."""
    handshakes: list[float] = []
    acks: list[float] = []
    reply_acks: list[float] = []
    first_extension: list[float] = []
    for proxy in recording.proxies.values():
        by_conn: dict[int, dict[str, float]] = {}
        for frame in proxy.frames:
            seen = by_conn.setdefault(frame.conn, {})
            if frame.kind in ("GATEWAY_HELLO", "GATEWAY_CONNECTION_READY"):
                seen.setdefault(frame.kind, frame.at)
        handshakes.extend(seen["GATEWAY_CONNECTION_READY"] - seen["GATEWAY_HELLO"]
                          for seen in by_conn.values()
                          if "GATEWAY_HELLO" in seen and "GATEWAY_CONNECTION_READY" in seen)
        for request in proxy.select("GATEWAY_EXECUTOR_REQUEST"):
            rid = request.request_id
            ack = proxy.select("WORKER_REQUEST_ACK", request_id=rid)
            if ack:
                acks.append(ack[0].at - request.at)
            extension = proxy.select("WORKER_REQUEST_EXTEND_LEASE_ACK", request_id=rid)
            if extension:
                first_extension.append(extension[0].at - request.at)
            for reply in proxy.select("WORKER_REPLY", request_id=rid):
                answer = [f for f in proxy.select("WORKER_REPLY_ACK", request_id=rid)
                          if f.at >= reply.at and f.conn == reply.conn]
                if answer:
                    reply_acks.append(answer[0].at - reply.at)

    def median_ms(xs: list[float]) -> float | None:
        return round(statistics.median(xs) * 1000, 1) if xs else None

    out: dict[str, Any] = {
        "handshake HELLO->READY ms": median_ms(handshakes),
        "request->ACK ms": median_ms(acks),
        "reply->REPLY_ACK ms": median_ms(reply_acks),
        "request->first extension ACK ms": median_ms(first_extension),
    }
    if "sigterm" in recording.marks:
        proxy = next(iter(recording.proxies.values()))
        closes = [f for f in proxy.frames if f.kind == "CLOSE" and f.direction == "worker"
                  and f.at >= recording.marks["sigterm"]]
        if closes:
            out["SIGTERM->close ms"] = round(
                (closes[0].at - recording.marks["sigterm"]) * 1000, 1)
    return out


async def run_both(scenario: str, server: InngestDevServer, workdir: Path
                   ) -> tuple[Recording, Recording]:
    """The scenario on Inngest's server, then on our dev gateway (one after the other:
    they share the machine's cores)."""
    run = SCENARIOS[scenario]
    for sub in ("inngest", "dev"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    async with inngest_target(server) as target:
        real = await run(target, workdir / "inngest")
    async with dev_target() as target:
        dev = await run(target, workdir / "dev")
    return real, dev
