"""The deploy simulator: K rolling deploys of R worker replicas under a steady load.

Everything is real except Inngest: the local gateway runs in this process, every
worker is a ``connect-worker run`` subprocess, and every stop is a SIGTERM. A
deploy replaces replicas one by one the way Railway does with a healthcheck: the
replacement starts and becomes READY before the old process gets SIGTERM. Load
is kept steady: a fixed number of multi-step reports in flight, a new one sent
whenever one completes, until the last deploy is done.

The table counts what a deploy can break: reports that did not complete, step
bodies executed more than once, replies that never reached the gateway, steps
abandoned at a drain deadline, and how long drains took.

``--change rename-llm-step`` rolls from v1 to a v2 of an LLM pipeline that renames
its middle step (``lab/apps/brief.py``), with ``--on-drift warn|fail``: the table adds
the model requests paid twice, the runs the drift guard failed, and what
``connect-worker compat`` said about v2 against the histories v1 recorded just before
the first deploy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from ..devserver import DevServer, DevServerConfig, RunStatus
from .fleet import WorkerProcess, read_executions, replace_when_ready
from .real_server import RealServer

TARGET = "connect_worker.lab.apps.pipeline"
CHANGES = ("rename-llm-step",)
BRIEF = "connect_worker.lab.apps.brief"
# --races: as devserver.testing.REALISTIC_RACES, the default of the test fixtures.
RACES_REPLY_CLOSE = 0.05


@dataclass(frozen=True)
class SimulationSettings:
    replicas: int = 3
    deploys: int = 5
    reports_in_flight: int = 6
    sections: int = 7
    step_seconds: float = 0.5
    deploy_interval: float = 4.0
    drain_timeout: float = 20.0
    settle_timeout: float = 120.0
    seed: int | None = None
    # A running Inngest dev server's URL; None: our dev gateway in this process.
    server: str | None = None
    change: str | None = None  # one of CHANGES: v1 -> v2 changes the code
    on_drift: str = "warn"
    speedup: float = 40.0  # the simulated model's latency is divided by this
    # --races: the dev gateway handles each reply this late and discards it if the socket
    # closed meanwhile (the real gateway's reply/close race, spec 5.3); 0: off.
    reply_close_race: float = 0.0


@dataclass
class ChangeResult:
    """What a code change cost: from the workers' logs and the gateway's runs."""

    compat_exit: int | None = None
    compat_summary: str = ""
    model_requests: int = 0
    paid_twice: int = 0
    drifted_runs: int = 0
    drift_failed_runs: int = 0
    drift_message: str = ""


@dataclass
class SimulationResult:
    settings: SimulationSettings
    reports_started: int = 0
    reports_completed: int = 0
    reports_failed: int = 0
    step_executions: int = 0
    duplicate_executions: int = 0
    lost_replies: int = 0
    steps_abandoned: int = 0
    drain_seconds: list[float] = field(default_factory=list)
    exit_codes: Counter[int] = field(default_factory=Counter)
    wall_seconds: float = 0.0
    workers: list[WorkerProcess] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    # Run IDs in the order the reports were sent.
    run_ids: list[str] = field(default_factory=list)
    # Every GATEWAY_EXECUTOR_REQUEST write (dev.dispatches as dicts: request_id,
    # run_id, conn_id, sent_at, acked_at, replied_at, reply_via, outcome, ...).
    dispatches: list[dict[str, Any]] = field(default_factory=list)
    # conn_id -> instance_id of every connection the gateway saw.
    connections: dict[str, str] = field(default_factory=dict)
    change: ChangeResult | None = None

    @property
    def ok(self) -> bool:
        if self.change is not None:
            c = self.change
            # Every run the change broke failed with the drift message, nothing was paid
            # twice, and compat saw it coming.
            return (c.paid_twice == 0 and c.compat_exit == 1
                    and self.reports_failed == c.drift_failed_runs
                    and self.reports_completed + self.reports_failed == self.reports_started
                    and self.duplicate_executions == 0 and self.lost_replies == 0)
        return (
            self.reports_completed == self.reports_started
            and self.duplicate_executions == 0
            and self.lost_replies == 0
            and self.steps_abandoned == 0
            and set(self.exit_codes) <= {0}
        )

    def rows(self) -> list[tuple[str, str]]:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.exit_codes.items()))
        s = self.settings
        return [
            ("rolling deploys", f"{s.deploys} x {s.replicas} replicas"),
            ("reports started", str(self.reports_started)),
            ("reports completed", str(self.reports_completed)),
            ("reports failed", str(self.reports_failed)),
            ("step executions", str(self.step_executions)),
            ("duplicate executions", str(self.duplicate_executions)),
            ("lost replies", str(self.lost_replies)),
            ("steps interrupted or abandoned", str(self.steps_abandoned)),
            ("drain time p50 / max (SIGTERM to exit)", drain_summary(self.drain_seconds)),
            ("worker exit codes (all stopped)", codes or "-"),
            ("wall time", f"{self.wall_seconds:.1f} s"),
            *self.change_rows(),
        ]

    def change_rows(self) -> list[tuple[str, str]]:
        c, s = self.change, self.settings
        if c is None:
            return []
        return [
            ("code change (v1 -> v2)", f"{s.change}, CONNECT_WORKER_ON_DRIFT={s.on_drift}"),
            ("compat before the first deploy", f"exit {c.compat_exit}: {c.compat_summary}"),
            ("runs that met the change (drift)", str(c.drifted_runs)),
            ("runs failed by the drift guard", str(c.drift_failed_runs)),
            ("model requests", str(c.model_requests)),
            ("model requests paid twice", str(c.paid_twice)),
            *([("drift message", c.drift_message)] if c.drift_message else []),
        ]

    def table(self) -> str:
        verdict = "OK: no report interrupted, repeated or lost" if self.ok else "PROBLEMS FOUND"
        if self.change is not None:
            verdict = ("OK: no model request paid twice; every run the change broke failed "
                       "with the drift message" if self.ok else
                       f"PROBLEMS FOUND: {self.change.paid_twice} model requests paid twice"
                       if self.change.paid_twice else "PROBLEMS FOUND")
        return render_table(self.rows(), verdict)


def render_table(rows: list[tuple[str, str]], verdict: str) -> str:
    """Two aligned columns and a verdict line (the simulator's and the soak's tables)."""
    width = max(len(k) for k, _ in rows)
    return "\n".join([*(f"{k.ljust(width)}  {v}" for k, v in rows), verdict])


def drain_summary(seconds: list[float]) -> str:
    """``p50 / max`` of drain times (SIGTERM to exit)."""
    if not seconds:
        return "- / -"
    return f"{statistics.median(seconds):.2f} s / {max(seconds):.2f} s"


async def run_simulation(
    settings: SimulationSettings, *, workdir: Path | None = None, quiet: bool = True
) -> SimulationResult:
    """Run the simulation; the caller prints ``result.table()``."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="connect-worker-sim-"))
    exec_log = str(workdir / "executions.jsonl")
    config = DevServerConfig.fast(
        gateway_groups=("gw-a", "gw-b"), lease_duration=4.0, extend_lease_interval=1.0,
        heartbeat_interval=1.0, seed=settings.seed, retry_backoff=0.2,
    )
    result = SimulationResult(settings=settings)
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        real: RealServer | None = None
        if settings.server:
            # Duck-typed: RealServer answers every DevServer member used here.
            real = await stack.enter_async_context(RealServer(settings.server))
            dev = cast(DevServer, real)
        else:
            dev = await stack.enter_async_context(DevServer(config))
            dev.faults.reply_close_race = settings.reply_close_race
        version = 0

        histories = workdir / "histories"

        def spawn(replica: int) -> WorkerProcess:
            target, env = TARGET, {}
            if settings.change:
                target = f"{BRIEF}:{'v1' if version == 0 else 'v2'}"
                env = change_env(settings, workdir, histories)
            process = WorkerProcess(
                target, api_url=dev.api_url, instance_id=f"v{version}-r{replica}",
                app_version=f"v{version}", drain_timeout=settings.drain_timeout,
                env={"STEP_SECONDS": str(settings.step_seconds),
                     "CONNECT_WORKER_EXECUTION_LOG": exec_log, **env,
                     **(real.worker_env if real else {})},
            )
            result.workers.append(process)
            if real is not None:
                real.watch(process)
            return process

        live = [spawn(i) for i in range(settings.replicas)]
        try:
            for process in live:
                await process.start()
            for process in live:
                await process.wait_ready(dev)
            run_ids: list[str] = []
            stop_load = asyncio.Event()
            load = asyncio.create_task(keep_load(
                dev, settings.reports_in_flight, run_ids, stop_load,
                (lambda: dev.send_event("brief/requested", {"topic": "widgets"}))
                if settings.change else
                lambda: dev.send_event("report/long", {"sections": settings.sections}),
                settings.settle_timeout,
            ))
            drains: list[asyncio.Task[int]] = []
            for _ in range(settings.deploys):
                await asyncio.sleep(settings.deploy_interval)
                if settings.change and version == 0:
                    result.change = await run_compat(histories)
                    if not quiet:
                        print(f"  compat {BRIEF}:v2 before the deploy: exit "
                              f"{result.change.compat_exit} ({result.change.compat_summary})",
                              flush=True)
                version += 1
                for replica in range(settings.replicas):
                    replacement = spawn(replica)
                    old = await replace_when_ready(dev, live, replica, replacement, with_work=True)
                    drains.append(asyncio.create_task(old.wait(settings.drain_timeout + 30)))
                    if not quiet:
                        print(f"  deploy v{version}: replica {replica} replaced "
                              f"({old.instance_id} -> {replacement.instance_id})", flush=True)
            stop_load.set()
            await load
            for run_id in run_ids:
                await dev.wait_for_run(run_id, timeout=settings.settle_timeout)
            await asyncio.gather(*drains, return_exceptions=True)
            for process in live:
                await process.stop()
        finally:
            for process in result.workers:
                process.kill()
                await process.__aexit__(None, None, None)
        tally(result, dev, run_ids, exec_log)
        if result.change is not None:
            tally_change(result.change, result, dev)
    result.wall_seconds = time.monotonic() - started
    return result


async def keep_load(dev: DevServer, in_flight_target: int, run_ids: list[str],
                    stop: asyncio.Event, send: Callable[[], Awaitable[list[str]]],
                    timeout: float) -> None:  # noqa: ASYNC109
    """Keep ``in_flight_target`` runs going (``send()`` starts one) until ``stop`` is set."""
    running: set[str] = set()

    def in_flight() -> int:
        # Only the runs still going are looked at (a long soak sends thousands).
        for run_id in [r for r in running if dev.runs[r].status.terminal]:
            running.discard(run_id)
        return len(running)

    while not stop.is_set():
        while in_flight() < in_flight_target:
            started = await send()
            run_ids.extend(started)
            running.update(started)
        waiter = asyncio.create_task(
            dev.wait_for(lambda: in_flight() < in_flight_target or stop.is_set(),
                         timeout=timeout)
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()


def tally(result: SimulationResult, dev: DevServer, run_ids: list[str], exec_log: str) -> None:
    result.reports_started = len(run_ids)
    result.run_ids = list(run_ids)
    statuses = Counter(dev.runs[r].status for r in run_ids)
    result.reports_completed = statuses[RunStatus.COMPLETED]
    result.reports_failed = statuses[RunStatus.FAILED]
    result.executions = read_executions(exec_log)
    counts = Counter((e["run_id"], e["step"]) for e in result.executions)
    result.step_executions = sum(counts.values())
    result.duplicate_executions = sum(n - 1 for n in counts.values() if n > 1)
    delivered = {r.request_id for r in dev.replies + dev.flushes}
    abandoned = {e.get("request_id") for w in result.workers
                 for e in w.events("drain.step_abandoned")}
    result.lost_replies = sum(
        1 for d in dev.dispatches
        if d.acked_at is not None and d.request_id not in delivered
        and d.request_id not in abandoned
    )
    result.steps_abandoned = len(abandoned)
    for process in result.workers:
        if process.signalled_at is not None and process.exited_at is not None:
            result.drain_seconds.append(process.exited_at - process.signalled_at)
        if process.signalled_at is not None and process.returncode is not None:
            result.exit_codes[process.returncode] += 1
    result.timeline = [e.to_json() for e in dev.timeline]
    result.dispatches = [asdict(d) for d in dev.dispatches]
    result.connections = {c.conn_id: c.instance_id for c in dev.connections}


def change_env(settings: SimulationSettings, workdir: Path, histories: Path) -> dict[str, str]:
    """A code-change rehearsal's worker settings: the simulated model with one answer
    cache for every worker, the drift policy, and v1's recorded histories for compat."""
    return {"CONNECT_WORKER_LLM_PROVIDER": "simulated",
            "CONNECT_WORKER_LLM_SIM_SPEEDUP": f"{settings.speedup:g}",
            "CONNECT_WORKER_LLM_CACHE": str((workdir / "llm-cache.sqlite3").resolve()),
            "CONNECT_WORKER_ON_DRIFT": settings.on_drift,
            "CONNECT_WORKER_RECORD_HISTORY": str(histories.resolve()),
            "CONNECT_WORKER_RECORD_HISTORY_SHAPE_ONLY": "1"}


async def run_compat(histories: Path) -> ChangeResult:
    """``connect-worker compat`` on v2, as a pre-deploy command would run it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connect_worker", "compat", f"{BRIEF}:v2", str(histories),
        "--json", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    change = ChangeResult(compat_exit=proc.returncode)
    try:
        doc = json.loads(out)
        change.compat_summary = (f"would break {doc['runs_in_flight_broken']} of "
                                 f"{doc['runs_in_flight']} runs in flight")
    except (ValueError, KeyError):
        change.compat_summary = (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
    return change


def tally_change(change: ChangeResult, result: SimulationResult, dev: DevServer) -> None:
    from .llmstats import LLMStats

    stats = LLMStats.from_workers(result.workers)
    change.model_requests = stats.paid
    change.paid_twice = stats.duplicates
    drifted = {e.get("run_id") for w in result.workers for e in w.events("run.version_drift")}
    change.drifted_runs = len(drifted)
    messages = [str((dev.runs[r].error or {}).get("message", "")) for r in result.run_ids
                if dev.runs[r].status is RunStatus.FAILED
                and isinstance(dev.runs[r].error, dict)]
    failed = [m for m in messages if "version drift" in m]
    change.drift_failed_runs = len(failed)
    change.drift_message = failed[0] if failed else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="connect-worker simulate-deploy",
        description="Rolling deploys of real worker processes on the local gateway, under load.",
    )
    defaults = SimulationSettings()
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--deploys", type=int, default=defaults.deploys)
    parser.add_argument("--reports-in-flight", type=int, default=defaults.reports_in_flight)
    parser.add_argument("--sections", type=int, default=defaults.sections,
                        help="steps per report")
    parser.add_argument("--step-seconds", type=float, default=defaults.step_seconds)
    parser.add_argument("--deploy-interval", type=float, default=defaults.deploy_interval,
                        help="seconds of steady load before each deploy")
    parser.add_argument("--drain-timeout", type=float, default=defaults.drain_timeout)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--change", choices=CHANGES, default=None,
                        help="roll from v1 to a v2 that changes the code (rename-llm-step: "
                        "an LLM pipeline renames its middle step)")
    parser.add_argument("--on-drift", choices=("warn", "fail"), default="warn",
                        help="CONNECT_WORKER_ON_DRIFT of every worker (with --change)")
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON")
    parser.add_argument("--races", action="store_true",
                        help="our dev gateway models the real one's reply/close race: each "
                        f"reply is handled {RACES_REPLY_CLOSE:g} s late and lost if the socket "
                        "closed meanwhile (a worker must not exit before its replies are "
                        "ACKed)")
    parser.add_argument("--server", metavar="URL",
                        help="deploy against a running Inngest dev server (`inngest dev`) at "
                        "URL instead of our dev gateway")
    args = parser.parse_args(argv)
    for name in ("replicas", "deploys", "reports_in_flight", "sections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.server and args.change:
        # The change's audit reads run errors our dev gateway records; RealServer has none.
        parser.error("--change runs on our dev gateway only, not with --server")
    settings = SimulationSettings(
        replicas=args.replicas, deploys=args.deploys, reports_in_flight=args.reports_in_flight,
        sections=args.sections, step_seconds=args.step_seconds,
        deploy_interval=args.deploy_interval, drain_timeout=args.drain_timeout, seed=args.seed,
        change=args.change, on_drift=args.on_drift, server=args.server,
        reply_close_race=RACES_REPLY_CLOSE if args.races else 0.0,
        **({"settle_timeout": 420.0} if args.server else {}),
    )
    print(f"simulating {settings.deploys} rolling deploys of {settings.replicas} replicas "
          f"({settings.reports_in_flight} reports of {settings.sections} steps in flight)...",
          flush=True)
    result = asyncio.run(run_simulation(settings, quiet=False))
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(dict(result.rows()), indent=2))
    return 0 if result.ok else 1
