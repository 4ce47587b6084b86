"""``connect-worker demo``: a rolling deploy in the middle of a few LLM reports.

Small-scale version of the problem connect_worker exists for: reports made of
slow LLM steps are running on two replicas of version v1 when a rolling deploy
to v2 starts. Each v1 replica is replaced the way Railway does it with a
healthcheck (the v2 replica is READY before the v1 one gets SIGTERM), and the v1
replica drains: it stops taking steps (``WORKER_PAUSE``), finishes the step it
is running (a long streamed section stops at the drain and returns a checkpoint
that a v2 replica continues), waits for the gateway's ``WORKER_REPLY_ACK``,
closes and exits 0.

Everything is real except Inngest and the model: the local gateway
(``connect_worker.devserver``) runs in this process, every worker is a ``connect-worker
run connect_worker.lab.apps.reports`` subprocess running the example report functions
(``generate-report``, ``generate-discovery-report``,
``generate-hybrid-report``), and their model calls go to the simulated provider
(``CONNECT_WORKER_LLM_PROVIDER=simulated``: realistic latency divided by
``--speedup``, streaming, token usage) through one SQLite result cache that every
worker shares, so a step retried on another worker would reuse answers already
paid for.

The demo narrates as it goes, prints a summary (reports completed, step
executions, duplicates, lost replies, interrupted steps, per-worker steps, model
requests per worker, answers paid twice, tokens and estimated cost, drain times)
and writes ``timeline.svg`` (one lane per worker, one bar per step) under its
output directory. Exit code 0 only if nothing was interrupted, repeated or lost
and no answer was paid for twice.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..devserver import DevServer, DevServerConfig, RunStatus
from .fleet import WorkerProcess, read_executions
from .llmstats import LLMStats
from .simulate import SimulationResult, SimulationSettings, tally
from .timeline import Note, from_simulation, render_svg

TARGET = "connect_worker.lab.apps.reports"


@dataclass(frozen=True)
class ReportKind:
    """One of the example report functions (connect_worker/lab/apps/reports/pipelines.py)."""

    fn_id: str
    event: str
    steps: int  # LLM steps, before any continuation of a checkpointed one


REPORT_KINDS = (
    ReportKind("generate-report", "reports/report.requested", 10),
    ReportKind("generate-discovery-report", "reports/discovery.requested", 9),
    ReportKind("generate-hybrid-report", "reports/hybrid.requested", 9),
)
# What each report is about (report n gets TOPICS[(n - 1) % len(TOPICS)]).
TOPICS: tuple[dict[str, str], ...] = (
    {"topic": "AI coding assistants for mid-size engineering teams",
     "audience": "VP Engineering deciding on a 2026 tooling budget"},
    {"topic": "Invoice reconciliation for independent pharmacies",
     "problem": "Month-end reconciliation takes owners two days",
     "interview_notes": "9 interviews: spreadsheets everywhere (8/9), wholesaler credit "
                        "notes arrive late (6/9), accountants paid by the hour (5/9)"},
    {"topic": "Heat pumps for small multi-family landlords",
     "audience": "Product leadership of a home-energy start-up",
     "interview_notes": "7 landlords: upfront cost (7/7), tenant complaints about noise "
                        "(3/7), confusion about subsidies (6/7)"},
)
# Seconds of one model call at speed-up 1 for a typical step of these reports (the
# simulated provider: ~1 s to the first token, then ~70 tokens/s).
TYPICAL_STEP_SECONDS = 10.5


@dataclass(frozen=True)
class DemoSettings:
    reports: int = 3
    # CONNECT_WORKER_LLM_SIM_SPEEDUP: the simulated model's latency is divided by this;
    # 5 makes a step take ~1-4 s (~2 s typical), so the deploy lands mid-step.
    speedup: float = 5.0
    replicas: int = 2
    report_interval: float = 1.5  # seconds between sending one report and the next
    deploy_after: float = 4.0  # seconds after the first report until the deploy starts
    drain_timeout: float = 30.0
    # Seed of the local gateway's random pick among READY workers, so the demo tells the
    # same story every run.
    seed: int | None = 51

    @property
    def step_seconds(self) -> float:
        """A typical step's duration (they range from about a third to twice this)."""
        return TYPICAL_STEP_SECONDS / self.speedup

    @property
    def settle_timeout(self) -> float:
        """Upper bound for everything to finish (a bounded wait, never a sleep)."""
        return 60.0 + self.reports * 12 * self.step_seconds * 2

    def kinds(self) -> list[ReportKind]:
        """The report functions, in the order the reports are sent."""
        return [REPORT_KINDS[n % len(REPORT_KINDS)] for n in range(self.reports)]


QUICK = DemoSettings(reports=2, speedup=40.0, report_interval=0.2, deploy_after=0.2,
                     drain_timeout=15.0)


@dataclass
class DemoResult:
    settings: DemoSettings
    simulation: SimulationResult
    started_at: float
    deploy_started_at: float | None = None
    interrupted: int = 0
    # Step results the gateway memoised (what the step executions must add up to).
    memoised: int = 0
    # instance id -> seconds from SIGTERM to exit, and steps in flight at SIGTERM
    drains: dict[str, tuple[float, int]] = field(default_factory=dict)
    llm: LLMStats = field(default_factory=LLMStats)
    timeline_path: Path | None = None

    @property
    def expected_steps(self) -> int:
        """Steps of the reports sent, without continuations of checkpointed steps."""
        return sum(k.steps for k in self.settings.kinds())

    @property
    def continuations(self) -> list[str]:
        return sorted({str(e["step"]) for e in self.simulation.executions
                       if "-continue-" in str(e["step"])})

    @property
    def ok(self) -> bool:
        sim = self.simulation
        return (sim.ok and self.interrupted == 0
                and sim.reports_started == self.settings.reports
                and sim.step_executions == self.memoised
                and self.memoised >= self.expected_steps
                # every worker was stopped with SIGTERM and drained to exit code 0
                and all(w.returncode == 0 for w in sim.workers)
                and self.llm.paid > 0 and self.llm.duplicates == 0 and self.llm.failed == 0)

    def steps_per_worker(self) -> dict[str, int]:
        by_pid = {w.pid: w.instance_id for w in self.simulation.workers if w.started_at}
        counts = Counter(by_pid.get(e["pid"], "?") for e in self.simulation.executions)
        return {w.instance_id: counts.get(w.instance_id, 0)
                for w in self.simulation.workers if w.started_at}

    def rows(self) -> list[tuple[str, str]]:
        sim, llm = self.simulation, self.llm
        per_worker = ", ".join(f"{k} {v}" for k, v in self.steps_per_worker().items())
        requests = ", ".join(f"{k} {v}" for k, v in llm.paid_per_worker.items())
        drains = ", ".join(f"{k} {secs:.2f} s ({n} in flight at SIGTERM)"
                           for k, (secs, n) in self.drains.items())
        codes = ", ".join(f"{code} x {n}" for code, n in sorted(sim.exit_codes.items()))
        continued = self.continuations
        expected = f"the gateway memoised {self.memoised} step results: " + (
            f"{self.expected_steps} report steps + {len(continued)} continuation"
            f"{'s' * (len(continued) != 1)} of a step checkpointed at the drain"
            if continued else f"{self.expected_steps} report steps")
        stopped = (f" ({llm.stopped} of them streams stopped by the drain and checkpointed)"
                   if llm.stopped else "")
        failed = f", {llm.failed} FAILED" if llm.failed else ""
        return [
            ("reports completed", f"{sim.reports_completed} of {sim.reports_started}"),
            ("step executions", f"{sim.step_executions} ({expected})"),
            ("duplicate executions", str(sim.duplicate_executions)),
            ("lost replies", str(sim.lost_replies)),
            ("interrupted steps", str(self.interrupted)),
            ("steps per worker", per_worker or "-"),
            ("model requests", f"{llm.paid} paid{stopped}, {llm.cached} answered from the "
                               f"shared cache{failed}"),
            ("model requests per worker", requests or "-"),
            ("answers paid twice", str(llm.duplicates)),
            ("tokens", f"{llm.input_tokens:,} input, {llm.output_tokens:,} output"),
            ("estimated cost", f"${llm.cost_usd:.4f} (simulated provider, list prices of "
                               f"{', '.join(llm.models) or '-'})"),
            ("drain (SIGTERM to exit)", drains or "-"),
            ("worker exit codes", codes or "-"),
            ("wall time", f"{sim.wall_seconds:.1f} s"),
        ]

    def summary(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
        verdict = ("OK: no report was interrupted, no step ran twice, no reply was lost, "
                   "no answer was paid for twice" if self.ok else "PROBLEMS FOUND (see above)")
        return "\n".join(["summary", *lines, verdict])


class Narrator:
    """Prints timestamped lines relative to the demo's start."""

    def __init__(self, started_at: float, write: Callable[[str], None]) -> None:
        self.started_at = started_at
        self.write = write

    def __call__(self, text: str, *, at: float | None = None) -> None:
        ts = (at if at is not None else time.time()) - self.started_at
        self.write(f"[{ts:5.1f} s] {text}")


class Demo:
    def __init__(self, settings: DemoSettings, workdir: Path, say: Narrator) -> None:
        self.settings = settings
        self.workdir = workdir
        self.say = say
        self.exec_log = str((workdir / "executions.jsonl").resolve())
        self.llm_cache = str((workdir / "llm-cache.sqlite3").resolve())
        self.run_ids: list[str] = []
        self.dev: DevServer | None = None
        sim = SimulationSettings(
            replicas=settings.replicas, deploys=1, reports_in_flight=settings.reports,
            sections=max(k.steps for k in settings.kinds()),
            step_seconds=settings.step_seconds,
            deploy_interval=settings.deploy_after, drain_timeout=settings.drain_timeout,
            settle_timeout=settings.settle_timeout, seed=settings.seed,
        )
        self.result = DemoResult(settings, SimulationResult(settings=sim), say.started_at)

    # ----- helpers ------------------------------------------------------------------

    @property
    def workers(self) -> list[WorkerProcess]:
        return self.result.simulation.workers

    def spawn(self, version: str, replica: int) -> WorkerProcess:
        assert self.dev is not None
        process = WorkerProcess(
            TARGET, api_url=self.dev.api_url, instance_id=f"{version}-r{replica}",
            app_version=version, drain_timeout=self.settings.drain_timeout,
            env={"CONNECT_WORKER_EXECUTION_LOG": self.exec_log,
                 "CONNECT_WORKER_LLM_PROVIDER": "simulated",
                 "CONNECT_WORKER_LLM_SIM_SPEEDUP": f"{self.settings.speedup:g}",
                 # One cache for every worker: a step retried elsewhere reuses answers.
                 "CONNECT_WORKER_LLM_CACHE": self.llm_cache},
        )
        self.workers.append(process)
        return process

    def report_no(self, run_id: str) -> int:
        return self.run_ids.index(run_id) + 1 if run_id in self.run_ids else 0

    def stopped_streams(self, worker: WorkerProcess, run_id: str) -> list[dict[str, Any]]:
        """The worker's model calls of this run whose stream the drain stopped early."""
        return [c for c in worker.events("llm.call")
                if c.get("outcome") == "stopped" and c.get("run_id") == run_id]

    @staticmethod
    async def _model_call_logged(worker: WorkerProcess, run_id: str, since: float) -> None:
        """Wait (at most a second) until the worker's ``llm.call`` line for the step that
        started at ``since`` has been read: it is logged before the step's reply is sent,
        but arrives on another pipe than the reply."""
        for _ in range(50):
            if any(c.get("run_id") == run_id and float(c.get("received_at", 0)) >= since
                   for c in worker.events("llm.call")):
                return
            await asyncio.sleep(0.02)

    def conns(self, worker: WorkerProcess) -> set[str]:
        assert self.dev is not None
        return {c.conn_id for c in self.dev.connections if c.instance_id == worker.instance_id}

    def in_flight(self, worker: WorkerProcess) -> list[tuple[str, str, float]]:
        """(request_id, run_id, acked_at) of requests the worker ACKed and not answered."""
        assert self.dev is not None
        conns = self.conns(worker)
        return [(d.request_id, d.run_id, d.acked_at) for d in self.dev.dispatches
                if d.conn_id in conns and d.acked_at is not None and d.replied_at is None]

    def step_name(self, worker: WorkerProcess, run_id: str, since: float) -> str | None:
        names = [e["step"] for e in read_executions(self.exec_log)
                 if e["run_id"] == run_id and e["pid"] == worker.pid and e["ts"] >= since - 0.25]
        return str(names[-1]) if names else None

    def describe(self, worker: WorkerProcess, run_id: str, since: float) -> str:
        name = self.step_name(worker, run_id, since)
        report = f"report {self.report_no(run_id)}"
        return f"{report} {name}" if name else f"{report}'s final request"

    def acked_at(self, request_id: str) -> float | None:
        """When the gateway acknowledged (or the flush endpoint accepted) this reply."""
        assert self.dev is not None
        for entry in self.dev.timeline:
            if entry.request_id == request_id and (
                (entry.kind == "WORKER_REPLY_ACK" and entry.direction == "out")
                or entry.kind == "HTTP_FLUSH"
            ):
                return entry.ts
        return None

    def reply_acked(self, request_id: str) -> bool:
        return self.acked_at(request_id) is not None

    # ----- the story ----------------------------------------------------------------

    async def run(self) -> DemoResult:
        s = self.settings
        config = DevServerConfig.fast(
            gateway_groups=("gw-a", "gw-b"), lease_duration=4.0, extend_lease_interval=1.0,
            heartbeat_interval=1.0, seed=s.seed, retry_backoff=0.2,
        )
        started = time.monotonic()
        async with DevServer(config) as dev:
            self.dev = dev
            self.say(f"local Connect gateway listening at {dev.api_url}")
            try:
                await self._story(dev)
            finally:
                for process in self.workers:
                    process.kill()
                    await process.__aexit__(None, None, None)
            tally(self.result.simulation, dev, self.run_ids, self.exec_log)
            self.result.interrupted = self.result.simulation.steps_abandoned + sum(
                1 for d in dev.dispatches if d.outcome == "lease_lost"
            )
            self.result.memoised = sum(len(dev.runs[r].stack) for r in self.run_ids)
        self.result.llm = LLMStats.from_workers(self.workers)
        self.result.simulation.wall_seconds = time.monotonic() - started
        return self.result

    async def _story(self, dev: DevServer) -> None:
        s = self.settings
        live = [self.spawn("v1", i) for i in range(s.replicas)]
        for process in live:
            await process.start()
        for process in live:
            await process.wait_ready(dev)
        self.say(" and ".join(f"{p.instance_id} (pid {p.pid})" for p in live)
                 + " are READY on the gateway (version v1)")
        reports = asyncio.create_task(self._send_reports(dev))
        watcher = asyncio.create_task(self._watch_reports(dev))
        try:
            await asyncio.sleep(s.deploy_after)
            await self._rolling_deploy(dev, live)
            await reports
            await asyncio.wait_for(watcher, s.settle_timeout)
        finally:
            for task in (reports, watcher):
                task.cancel()
        self.say("all reports done; stopping the v2 replicas too (nothing in flight)")
        await asyncio.gather(*(process.stop(s.drain_timeout + 10) for process in live))

    async def _send_reports(self, dev: DevServer) -> None:
        s = self.settings
        for n, kind in enumerate(s.kinds(), start=1):
            if n > 1:
                await asyncio.sleep(s.report_interval)
            data = TOPICS[(n - 1) % len(TOPICS)]
            self.run_ids.extend(await dev.send_event(kind.event, dict(data)))
            self.say(f"report {n} requested: {kind.fn_id} on \"{data['topic']}\" "
                     f"({kind.steps} LLM steps)")

    async def _watch_reports(self, dev: DevServer) -> None:
        done: set[str] = set()
        while len(done) < self.settings.reports:
            def changed() -> bool:
                return any(r not in done and dev.runs[r].status.terminal for r in self.run_ids)

            await dev.wait_for(changed, timeout=self.settings.settle_timeout)
            for run_id in list(self.run_ids):
                run = dev.runs[run_id]
                if run_id in done or not run.status.terminal:
                    continue
                done.add(run_id)
                workers = self._workers_of(run_id)
                status = ("completed" if run.status is RunStatus.COMPLETED
                          else run.status.value.upper())
                by_pid = {w.pid: w.instance_id for w in self.workers if w.started_at}
                continued = [f"{e['step']} on {by_pid.get(e['pid'], '?')}"
                             for e in read_executions(self.exec_log)
                             if e["run_id"] == run_id and "-continue-" in str(e["step"])]
                steps = f"{len(run.stack)} steps" + (
                    f" (incl. {', '.join(continued)})" if continued else "")
                cost = run.output.get("cost") if isinstance(run.output, dict) else None
                paid = (f"; {cost.get('calls')} model answers, ${cost.get('cost_usd', 0):.4f}"
                        if isinstance(cost, dict) else "")
                self.say(f"report {self.report_no(run_id)} {status}: {steps}, run on "
                         f"{', '.join(workers)}{paid}", at=run.ended_at)

    def _workers_of(self, run_id: str) -> list[str]:
        by_pid = {w.pid: w.instance_id for w in self.workers if w.started_at}
        seen: dict[str, None] = {}
        for e in read_executions(self.exec_log):
            if e["run_id"] == run_id:
                seen[by_pid.get(e["pid"], "?")] = None
        return list(seen)

    async def _rolling_deploy(self, dev: DevServer, live: list[WorkerProcess]) -> None:
        """Start every v2 replica; stop each v1 replica once its replacement is READY."""
        self.result.deploy_started_at = time.time()
        self.say("rolling deploy v1 -> v2 begins: the v2 replicas start, and each v1 replica "
                 "gets SIGTERM only once its v2 replacement is READY")
        replacements = [self.spawn("v2", i) for i in range(len(live))]
        for process in replacements:
            await process.start()
        await asyncio.gather(*(self._replace(dev, live, i, process)
                               for i, process in enumerate(replacements)))

    async def _replace(self, dev: DevServer, live: list[WorkerProcess], replica: int,
                       replacement: WorkerProcess) -> None:
        await replacement.wait_ready(dev)
        old, live[replica] = live[replica], replacement
        self.say(f"{replacement.instance_id} (pid {replacement.pid}) is READY")
        flight = self.in_flight(old)
        old.send_signal()
        doing = ", ".join(self.describe(old, run_id, acked)
                          for _, run_id, acked in flight) or "nothing"
        self.say(f"SIGTERM -> {old.instance_id} (pid {old.pid}), in the middle of: {doing}",
                 at=old.signalled_at)
        await self._narrate_drain(dev, old)

    async def _narrate_drain(self, dev: DevServer, old: WorkerProcess) -> None:
        s = self.settings
        name = old.instance_id
        assert old.signalled_at is not None
        signalled = old.signalled_at
        try:
            await old.wait_log("drain.pause", timeout=s.drain_timeout)
            conns = self.conns(old)

            def pause_seen() -> float | None:
                return next((e.ts for e in dev.timeline if e.kind == "WORKER_PAUSE"
                             and e.conn_id in conns and e.ts >= signalled), None)

            await dev.wait_for(lambda: pause_seen() is not None, timeout=s.drain_timeout)
            # Anything ACKed but unanswered at SIGTERM, including a request ACKed in the
            # instant between the signal and the PAUSE.
            flight = [(d.request_id, d.run_id, d.acked_at) for d in dev.dispatches
                      if d.conn_id in conns and d.acked_at is not None
                      and (d.replied_at is None or d.replied_at >= signalled)]
            running = (f"{len(flight)} step(s) still running there" if flight
                       else "nothing was running there")
            self.say(f"  {name} paused (WORKER_PAUSE): the gateway routes no new steps to it; "
                     f"{running}", at=pause_seen())
            for request_id, run_id, acked in flight:
                await dev.wait_for(functools.partial(self.reply_acked, request_id),
                                   timeout=s.drain_timeout + 5)
                what = self.describe(old, run_id, acked)
                at = self.acked_at(request_id)
                assert at is not None
                if self.step_name(old, run_id, acked) is not None:
                    await self._model_call_logged(old, run_id, acked)
                stopped = self.stopped_streams(old, run_id)
                if stopped:
                    tokens = sum(int(c.get("output_tokens") or 0) for c in stopped)
                    self.say(f"  {name} stopped streaming {what} at the drain ({tokens} "
                             "tokens in) and replied with a checkpoint, which the gateway "
                             "acknowledged (WORKER_REPLY_ACK): a v2 replica continues the "
                             "text from there", at=at)
                else:
                    self.say(f"  {name} finished {what} ({at - acked:.1f} s) and the gateway "
                             "acknowledged the reply (WORKER_REPLY_ACK)", at=at)
            code = await old.wait(s.drain_timeout + 30)
        except (TimeoutError, RuntimeError) as exc:
            self.say(f"  {name}: drain did not go as expected: {exc}")
            return
        assert old.exited_at is not None
        drain = old.exited_at - old.signalled_at
        self.result.drains[name] = (drain, len(flight))
        closes = [c.close_class or "?" for c in dev.connections if c.instance_id == name]
        closed = ("closed 1000 WORKER_SHUTDOWN" if closes and set(closes) == {"WORKER_SHUTDOWN"}
                  else f"closed ({', '.join(closes) or 'no connection'})")
        self.say(f"  {name} {closed} and exited {code}: drained in {drain:.1f} s",
                 at=old.exited_at)


def run_demo(settings: DemoSettings, workdir: Path,
             write: Callable[[str], None] = print) -> DemoResult:
    """Run the demo, writing ``timeline.svg`` (and the raw records) into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    # A fresh count and a fresh cache when an output directory is reused.
    for stale in ("executions.jsonl", "llm-cache.sqlite3", "llm-cache.sqlite3-wal",
                  "llm-cache.sqlite3-shm"):
        (workdir / stale).unlink(missing_ok=True)
    say = Narrator(time.time(), write)
    result = asyncio.run(Demo(settings, workdir, say).run())
    sim, llm = result.simulation, result.llm
    s = settings
    notes = []
    if result.deploy_started_at is not None:
        notes.append(Note(result.deploy_started_at, "rolling deploy v1 -> v2 begins"))
    verdict = ("nothing interrupted, repeated, lost or paid twice" if result.ok
               else "PROBLEMS FOUND")
    codes = ", ".join(f"{code} x {n}" for code, n in sorted(sim.exit_codes.items())) or "-"
    timeline = from_simulation(
        sim,
        title=f"connect-worker demo: {s.reports} LLM reports on {s.replicas} replicas, "
              f"rolling deploy v1 -> v2 mid-report",
        subtitle=(f"{sim.reports_completed}/{sim.reports_started} reports completed "
                  f"({', '.join(k.fn_id for k in s.kinds())}), "
                  f"{sim.step_executions} step executions, "
                  f"{sim.duplicate_executions} duplicates, {sim.lost_replies} lost replies, "
                  f"{result.interrupted} interrupted, worker exit codes {codes}\n"
                  f"{llm.paid} model requests paid, {llm.duplicates} paid twice, "
                  f"{llm.input_tokens + llm.output_tokens:,} tokens, ~${llm.cost_usd:.2f}: "
                  f"{verdict}\n"
                  f"Simulated model sped up {s.speedup:g}x: a step that takes "
                  f"~{TYPICAL_STEP_SECONDS:.0f} s on a real model takes "
                  f"~{s.step_seconds:.1f} s here (only the model's latency is scaled)"),
        notes=notes, t0=say.started_at,
        axis_label=f"seconds since the demo started (model sped up {s.speedup:g}x)",
    )
    path = workdir / "timeline.svg"
    path.write_text(render_svg(timeline), encoding="utf-8")
    result.timeline_path = path
    raw = {
        "summary": dict(result.rows()),
        "ok": result.ok,
        "run_ids": sim.run_ids,
        "llm": asdict(llm),
        "connections": sim.connections,
        "dispatches": sim.dispatches,
        "timeline": sim.timeline,
        "workers": [_worker_json(w) for w in sim.workers],
    }
    (workdir / "demo.json").write_text(json.dumps(raw, indent=1, default=str), encoding="utf-8")
    return result


def _worker_json(w: WorkerProcess) -> dict[str, Any]:
    return {
        "instance_id": w.instance_id, "app_version": w.app_version,
        "pid": w.pid if w.started_at else None, "started_at": w.started_at,
        "signalled_at": w.signalled_at, "exited_at": w.exited_at, "returncode": w.returncode,
        "logs": w.logs,
    }


def _default_out() -> Path:
    return Path("out") / f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def _seed(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="connect-worker demo",
        description="A rolling deploy in the middle of a few LLM reports (the report "
        "functions shipped in connect_worker.lab.apps.reports, on a simulated model), on "
        "the local gateway with real worker processes: narrates it, prints a summary and "
        "writes a timeline SVG.",
    )
    d = DemoSettings()
    parser.add_argument("--reports", type=int, default=d.reports,
                        help="reports to send, taking turns among "
                        f"{', '.join(k.fn_id for k in REPORT_KINDS)}")
    parser.add_argument("--speedup", type=float, default=d.speedup,
                        help="divide the simulated model's latency by this (default "
                        f"{d.speedup:g}: a step takes ~{d.step_seconds:.0f} s; 1 = realistic)")
    parser.add_argument("--replicas", type=int, default=d.replicas)
    parser.add_argument("--deploy-after", type=float, default=d.deploy_after,
                        help="seconds after the first report until the rolling deploy starts")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: out/demo-<UTC timestamp>)")
    parser.add_argument("--seed", type=_seed, default=d.seed, metavar="N|none",
                        help="seed of the local gateway's random routing (default "
                        f"{d.seed}: the same story every run; 'none' for a different one)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny timings (for tests): 2 short reports, the deploy at once")
    args = parser.parse_args(argv)
    for name in ("reports", "replicas"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if not 0 < args.speedup < float("inf"):
        parser.error("--speedup must be a number > 0")
    if args.quick:
        settings = DemoSettings(**{**QUICK.__dict__, "seed": args.seed})
    else:
        settings = DemoSettings(
            reports=args.reports, speedup=args.speedup, replicas=args.replicas,
            deploy_after=args.deploy_after, seed=args.seed,
        )
    out = args.out or _default_out()
    steps = sorted({k.steps for k in settings.kinds()})
    print(f"connect-worker demo: {settings.reports} reports of {'-'.join(map(str, steps))} "
          f"LLM steps (simulated model, ~{settings.step_seconds:.1f} s a step) on "
          f"{settings.replicas} replicas of v1; a rolling deploy to v2 lands mid-report",
          flush=True)

    def write(line: str) -> None:
        print(line, flush=True)

    try:
        result = run_demo(settings, out, write)
    except (TimeoutError, RuntimeError) as exc:
        print(f"connect-worker demo: failed: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    shown = os.path.relpath(out) if not os.path.isabs(out) else str(out)
    print(f"timeline: {Path(shown) / 'timeline.svg'}")
    print(f"raw records: {Path(shown) / 'demo.json'}, {Path(shown) / 'executions.jsonl'}, "
          f"{Path(shown) / 'llm-cache.sqlite3'}")
    sys.stdout.flush()
    return 0 if result.ok else 1
