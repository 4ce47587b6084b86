"""``connect-worker soak``: random overlapping faults under steady load, then an audit.

Every scripted fault scenario passes one fault at a time; production does not fail one
fault at a time. The soak runs N real ``connect-worker run`` replicas on the local
gateway under a steady load of multi-step reports (step lengths drawn at random) and
throws faults at them from a menu, at random but reproducibly: the fault *schedule*
(when, which kind, which replica by index, how long) is a function of the seed (and of
the duration, interval and kinds chosen), never of timing. Faults overlap freely: a
replica crashes during a rolling deploy, the gateway restarts while a replica drains, a
GATEWAY_CLOSING lands while an ACK is on the wire.

At the end it audits what the promise says (0 interrupted, 0 duplicates, 0 lost) from
evidence the worker under test does not write: the step bodies' own records, the
gateway's records and the soak's fault log (``soak_audit.py``; docs/reliability.md):

- every run completed;
- every step body that ran more than once is explained, copy by copy, by a fault: the
  copy was in flight on a SIGKILLed replica (``crash``), was live at the drain deadline
  of a replica that exited 3 and the gateway dispatched the step again (``abandoned``),
  lost a gateway re-route race (``race``) or had its lease declared lost by the gateway
  (``lapsed``) near a fault, and did not run to the end. Any other duplicate fails the
  soak, and so does a re-routed step that ran *to the end* on two replicas;
- every step body that ran to the end got its result to the gateway, on any replica,
  unless its replica was SIGKILLed or drained to exit 3 and the step ran again;
- every SIGTERMed replica exited 0, or 3 with every step it held dispatched again;
  no replica exited on its own;

and reports faults by kind, runs, step executions, duplicates by class, re-route races
(and how long each losing copy ran), drain times, exit codes and each replica's RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from ..devserver import DevServer, DevServerConfig, RunStatus
from .apps import soak as soak_app
from .fleet import WorkerProcess, replace_when_ready
from .real_server import REAL_SERVER_FAULTS, RealServer, refused_faults
from .simulate import drain_summary, keep_load, render_table
from .soak_audit import Race, audit

TARGET = "connect_worker.lab.apps.soak"

# The menu. Each kind can be switched off by flag (--no-<kind>).
FAULT_KINDS: dict[str, str] = {
    "deploy": "rolling deploy: each replica in turn gets a replacement, READY first, "
              "then SIGTERM for the old one",
    "crash": "SIGKILL of a replica, then a restart (a new process in its place)",
    "gateway-closing": "GATEWAY_CLOSING on a replica's connection (half the time on a "
                       "draining replica's)",
    "drop": "socket dropped without a close frame (half the time a draining replica's)",
    "withhold-ack": "the gateway withholds every WORKER_REPLY_ACK for a while",
    "gateway-restart": "the whole gateway restarts: every socket dropped, "
                       "/v0/connect/start refusing for a while",
    "flush-outage": "/v0/connect/flush failing for a while",
    "latency": "added network latency on every frame for a while",
    "slow-acks": "the gateway processes WORKER_REQUEST_ACKs late for a while (a busy data "
                 "pool: a PAUSE or GATEWAY_CLOSING can overtake an ACK, spec 5.2)",
    "reply-close": "the gateway handles each WORKER_REPLY late for a while and discards it "
                   "if the socket closed meanwhile (spec 5.3); the socket of a replica is "
                   "dropped just after it sends a reply",
}
KIND_NAMES = tuple(FAULT_KINDS)
# With --server (Inngest's own dev server) only these exist (lab/real_server.py).
REAL_KIND_NAMES = tuple(REAL_SERVER_FAULTS)
# How long a timed fault lasts, in seconds (uniform between the two).
DURATIONS: dict[str, tuple[float, float]] = {
    "withhold-ack": (1.0, 4.0),
    "gateway-restart": (0.5, 3.0),
    "flush-outage": (2.0, 8.0),
    "latency": (3.0, 10.0),
    "slow-acks": (1.0, 4.0),
    "stall": (1.0, 5.0),
    "reply-close": (1.0, 4.0),
}
# Seconds added to each frame, each way (latency), or to each ACK (slow-acks).
DELAYS: dict[str, tuple[float, float]] = {
    "latency": (0.02, 0.15),
    "slow-acks": (0.05, 0.3),
    "reply-close": (0.05, 0.2),  # how late each reply is handled
}


@dataclass(frozen=True)
class Fault:
    """One planned fault. ``target`` is an index, resolved against the replicas that
    exist when the fault fires (so the plan does not depend on timing)."""

    at: float  # seconds after the load started
    kind: str
    target: int
    on_draining: bool = False  # gateway-closing / drop: a draining replica if any
    seconds: float = 0.0  # how long a timed fault lasts
    delay: float = 0.0  # latency: s per frame; slow-acks: s per ACK; reply-close: s per reply


def plan_faults(seed: int, seconds: float, kinds: Sequence[str],
                interval: tuple[float, float] = (1.5, 4.0)) -> list[Fault]:
    """The fault schedule: a function of its arguments only.

    Gaps between faults are uniform in ``interval``; the first ``len(kinds)`` faults are
    a shuffled round of every kind (so a short soak still tries each one), the rest are
    drawn uniformly. Every fault draws the same random fields, whatever its kind.
    """
    if not kinds:
        return []
    rng = random.Random(f"connect-worker-soak-faults:{seed}")
    first_round = list(kinds)
    rng.shuffle(first_round)
    plan: list[Fault] = []
    at = 0.0
    while True:
        at += rng.uniform(*interval)
        if at >= seconds:
            return plan
        kind = first_round.pop(0) if first_round else rng.choice(list(kinds))
        target = rng.randrange(1 << 16)
        on_draining = rng.random() < 0.5
        duration = _between(DURATIONS.get(kind, (0.0, 0.0)), rng.random())
        share = rng.random()
        plan.append(Fault(
            at=round(at, 3), kind=kind, target=target,
            on_draining=on_draining and kind in ("gateway-closing", "drop"),
            seconds=round(duration, 3) if kind in DURATIONS else 0.0,
            delay=round(_between(DELAYS[kind], share), 4) if kind in DELAYS else 0.0,
        ))


def _between(bounds: tuple[float, float], share: float) -> float:
    low, high = bounds
    return low + (high - low) * share


@dataclass(frozen=True)
class SoakSettings:
    replicas: int = 3
    minutes: float = 2.0
    runs_in_flight: int = 15
    steps: int = 4  # steps per report
    step_seconds: tuple[float, float] = (0.2, 3.0)  # each step's length, uniform
    fault_interval: tuple[float, float] = (1.5, 4.0)
    kinds: tuple[str, ...] = KIND_NAMES
    drain_timeout: float = 10.0
    # Leases short enough that a crash's steps come back within seconds, long enough to
    # outlive a gateway restart (the real one is 2 min).
    lease_duration: float = 8.0
    settle_timeout: float = 180.0
    rss_interval: float = 5.0
    seed: int = 1
    # A running Inngest dev server's URL (its faults only); None: our dev gateway.
    server: str | None = None
    # Replicas run with CONNECT_WORKER_CONFIRM_BEFORE_RUN=1 (engine/confirm.py).
    confirm_before_run: bool = False

    def schedule(self) -> list[Fault]:
        return plan_faults(self.seed, self.minutes * 60, self.kinds, self.fault_interval)


@dataclass
class Applied:
    """A fault as it was applied."""

    fault: Fault
    started_at: float  # wall clock
    hit: list[str] = field(default_factory=list)  # instance ids
    note: str = ""


@dataclass
class SoakResult:
    settings: SoakSettings
    applied: list[Applied] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    runs_completed: int = 0
    runs_failed: int = 0
    runs_unfinished: int = 0
    step_executions: int = 0
    duplicates: Counter[str] = field(default_factory=Counter)
    unexplained: list[dict[str, Any]] = field(default_factory=list)
    explained: list[dict[str, Any]] = field(default_factory=list)  # each, with its fault
    races: list[Race] = field(default_factory=list)
    late_acks_ignored: int = 0
    lost_replies: list[str] = field(default_factory=list)
    lost: list[dict[str, Any]] = field(default_factory=list)  # each lost reply's timeline
    replies_discarded: int = 0  # by the gateway's reply/close race (REPLY_DISCARDED)
    bad_exits: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    drain_seconds: list[float] = field(default_factory=list)
    abandoned: int = 0  # copies live at the drain deadline of a replica that exited 3
    handed_back: int = 0  # of those, answered at the gateway with a reply without result
    # Seconds from a replica's SIGTERM to the gateway's next dispatch of a step it
    # abandoned (the retry that a hand-back makes immediate).
    retry_after_sigterm: list[float] = field(default_factory=list)
    exit_codes: Counter[str] = field(default_factory=Counter)
    # instance id -> [(seconds since the soak started, RSS bytes)]
    rss: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    wall_seconds: float = 0.0

    @property
    def faults(self) -> Counter[str]:
        return Counter(a.fault.kind for a in self.applied)

    @property
    def race_ran_twice(self) -> int:
        return sum(r.ran_to_end_twice for r in self.races)

    @property
    def failures(self) -> list[str]:
        """Each invariant that failed, in one line."""
        out = []
        if self.runs_completed != len(self.run_ids):
            out.append(f"{len(self.run_ids) - self.runs_completed} of {len(self.run_ids)} "
                       f"runs did not complete ({self.runs_failed} failed, "
                       f"{self.runs_unfinished} unfinished)")
        if self.duplicates["unexplained"]:
            out.append(f"{self.duplicates['unexplained']} duplicate executions not explained "
                       "by a crash, a drain deadline, a lost re-route race or a lease lapse")
        if self.race_ran_twice:
            out.append(f"{self.race_ran_twice} re-routed steps ran to the end on two replicas")
        if self.lost_replies:
            out.append(f"{len(self.lost_replies)} replies lost (a step body ran to the end "
                       "and its result never reached the gateway, and no fault explains it)")
        out.extend(self.bad_exits)
        out.extend(self.errors)
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def deploys_row(self) -> str:
        """Deploys that replaced every replica (a deploy queued behind others may be cut
        short when the soak ends), replicas replaced, and SIGKILLs."""
        deploys = [a for a in self.applied if a.fault.kind == "deploy"]
        full = sum(1 for a in deploys if len(a.hit) == self.settings.replicas)
        replaced = sum(len(a.hit) for a in deploys)
        crashes = sum(1 for a in self.applied if a.fault.kind == "crash" and a.hit)
        return f"{full} ({replaced} replicas replaced) / {crashes}"

    def rss_summary(self) -> str:
        """Median start and end, and the largest growth of any one replica, in MiB."""
        sampled = [s for s in self.rss.values() if s]
        if not sampled:
            return "- (no /proc)"
        start = statistics.median(s[0][1] for s in sampled) / 2**20
        end = statistics.median(s[-1][1] for s in sampled) / 2**20
        growth = max(sampled, key=lambda s: s[-1][1] - s[0][1])
        longest = max(sampled, key=lambda s: s[-1][0] - s[0][0])
        return (f"median {start:.0f} MiB at start, {end:.0f} MiB at end; largest growth "
                f"{(growth[-1][1] - growth[0][1]) / 2**20:+.1f} MiB; longest-lived "
                f"{longest[-1][0] - longest[0][0]:.0f} s: {longest[0][1] / 2**20:.0f} -> "
                f"{longest[-1][1] / 2**20:.0f} MiB")

    def rows(self) -> list[tuple[str, str]]:
        s = self.settings
        faults = ", ".join(f"{kind} {self.faults[kind]}" for kind in
                           (*KIND_NAMES, *(k for k in REAL_KIND_NAMES if k not in KIND_NAMES))
                           if self.faults[kind]) or "-"
        ran = sorted(t for r in self.races for t in r.loser_ran_for)
        race_times = (f"; losing copies ran {', '.join(f'{t:.2f}' for t in ran[:12])}"
                      f"{' ...' if len(ran) > 12 else ''} s (max {ran[-1]:.2f} s)"
                      if ran else "")
        dup = self.duplicates
        codes = ", ".join(f"{code} x {n}" for code, n in sorted(self.exit_codes.items()))
        return [
            ("server", s.server or "our dev gateway (connect_worker.devserver)"),
            ("seed / duration", f"{s.seed} / {s.minutes:g} min of faults, {s.replicas} "
                                f"replicas, {s.runs_in_flight} runs of {s.steps} steps "
                                f"in flight"
                                + (", confirm-before-run" if s.confirm_before_run else "")),
            ("faults", f"{sum(self.faults.values())}: {faults}"),
            ("rolling deploys done / crashes", self.deploys_row()),
            ("runs started / completed", f"{len(self.run_ids)} / {self.runs_completed}"
                                         + (f" ({self.runs_failed} FAILED)"
                                            if self.runs_failed else "")),
            ("step executions", str(self.step_executions)),
            ("duplicates: crash / abandoned / race / lapsed",
             f"{dup['crash']} / {dup['abandoned']} / {dup['race']} / {dup['lapsed']}"),
            ("duplicates unexplained", str(dup["unexplained"])),
            ("re-route races", f"{len(self.races)} (ran to the end twice: "
                               f"{self.race_ran_twice}; late ACKs ignored by the gateway: "
                               f"{self.late_acks_ignored}){race_times}"),
            ("lost replies", str(len(self.lost_replies))),
            ("replies discarded by the reply/close race", str(self.replies_discarded)),
            ("abandoned at a drain deadline", f"{self.abandoned} ({self.handed_back} handed "
                                              "back); SIGTERM to retry p50 / max "
                                              f"{drain_summary(self.retry_after_sigterm)}"),
            ("drain time p50 / max (SIGTERM to exit)", drain_summary(self.drain_seconds)),
            ("exit codes", codes or "-"),
            ("replicas started", str(sum(1 for w in self.workers if w.started_at))),
            ("RSS per replica", self.rss_summary()),
            ("wall time", f"{self.wall_seconds:.1f} s"),
        ]

    def table(self) -> str:
        verdict = ("OK: every run completed; every duplicate explained; no reply lost"
                   if self.ok else "PROBLEMS FOUND:\n  " + "\n  ".join(self.failures))
        return render_table(self.rows(), verdict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failures": self.failures,
            "summary": dict(self.rows()),
            "settings": asdict(self.settings),
            "faults": [{**asdict(a.fault), "started_at": a.started_at, "hit": a.hit,
                        "note": a.note} for a in self.applied],
            "faults_by_kind": dict(self.faults),
            "runs": {"started": len(self.run_ids), "completed": self.runs_completed,
                     "failed": self.runs_failed, "unfinished": self.runs_unfinished},
            "step_executions": self.step_executions,
            "duplicates": dict(self.duplicates),
            "unexplained_duplicates": self.unexplained,
            "explained_duplicates": self.explained,
            "races": [asdict(r) for r in self.races],
            "late_acks_ignored": self.late_acks_ignored,
            "lost_replies": self.lost_replies,
            "lost": self.lost,
            "replies_discarded": self.replies_discarded,
            "drain_seconds": self.drain_seconds,
            "abandoned": self.abandoned,
            "handed_back": self.handed_back,
            "retry_after_sigterm": self.retry_after_sigterm,
            "exit_codes": dict(self.exit_codes),
            "rss": self.rss,
            "replicas": [{"instance_id": w.instance_id, "pid": w.pid if w.started_at else None,
                          "started_at": w.started_at, "signalled_at": w.signalled_at,
                          "killed_at": w.killed_at, "exited_at": w.exited_at,
                          "returncode": w.returncode} for w in self.workers],
            "wall_seconds": self.wall_seconds,
            # The full logs of the replicas behind each finding, to diagnose it.
            "logs": {w.instance_id: w.logs for w in self.workers
                     if w.instance_id in self.implicated()},
        }

    def implicated(self) -> set[str]:
        """Replicas that ran an unexplained duplicate or a race copy to the end, or lost
        a reply."""
        names = {str(c["replica"]) for u in self.unexplained for c in u["copies"]}
        names.update(str(x["replica"]) for x in self.lost)
        for race in self.races:
            if race.ran_to_end_twice:
                names.update(n for n in [race.winner, *race.losers] if n)
        return names


class Soak:
    """One soak: the gateway, the replicas (slot -> current process), load, faults."""

    def __init__(self, settings: SoakSettings, workdir: Path,
                 say: Callable[[str], None]) -> None:
        self.s = settings
        self.say = say
        self.exec_log = str(workdir / "executions.jsonl")
        self.result = SoakResult(settings)
        self.slots: list[WorkerProcess] = []
        self.generation = 0
        self.t0 = 0.0
        self.tasks: set[asyncio.Task[None]] = set()
        self.exits: list[asyncio.Task[None]] = []
        self.deploying = asyncio.Lock()
        self.load_rng = random.Random(f"connect-worker-soak-load:{settings.seed}")
        self.withhold_until = 0.0
        # When each delay fault (a dev.faults setting) in force ends.
        self.delays_until: dict[str, float] = {}
        self.stopping = False
        # Inngest's own server (--server): its worker environment and flush tracking.
        self.real: RealServer | None = None

    # -- replicas --------------------------------------------------------------

    def spawn(self, dev: DevServer, slot: int) -> WorkerProcess:
        self.generation += 1
        process = WorkerProcess(
            TARGET, api_url=dev.api_url, instance_id=f"r{slot}-g{self.generation}",
            app_version="soak", drain_timeout=self.s.drain_timeout,
            env={"CONNECT_WORKER_EXECUTION_LOG": self.exec_log,
                 "CONNECT_WORKER_RECONNECT_MAX_BACKOFF": "1",
                 **({"CONNECT_WORKER_CONFIRM_BEFORE_RUN": "1"}
                    if self.s.confirm_before_run else {}),
                 **(self.real.worker_env if self.real else {})},
        )
        self.result.workers.append(process)
        if self.real is not None:
            self.real.watch(process)
        return process

    def watch_exit(self, process: WorkerProcess) -> None:
        """Collect the exit code; a replica that exits unasked is a finding."""
        async def watch() -> None:
            try:
                code = await process.wait(self.s.settle_timeout + 3600)
            except TimeoutError:
                return
            if process.signalled_at is None and process.killed_at is None:
                self.result.bad_exits.append(
                    f"{process.instance_id} exited {code} without being stopped: "
                    f"{process.tail(3)}")

        self.exits.append(asyncio.create_task(watch()))

    async def start(self, dev: DevServer, process: WorkerProcess) -> None:
        await process.start()
        self.watch_exit(process)

    def draining(self) -> list[WorkerProcess]:
        return [w for w in self.result.workers
                if w.signalled_at is not None and w.alive and w.killed_at is None]

    def conn_of(self, dev: DevServer, process: WorkerProcess) -> str | None:
        """The newest live connection of ``process`` (READY or draining)."""
        conns = [c for c in dev.live_connections if c.instance_id == process.instance_id]
        return conns[-1].conn_id if conns else None

    # -- the run ---------------------------------------------------------------

    async def run(self) -> SoakResult:
        started = time.monotonic()
        config = DevServerConfig.fast(
            gateway_groups=("gw-a", "gw-b"), lease_duration=self.s.lease_duration,
            extend_lease_interval=1.0, heartbeat_interval=1.0, seed=self.s.seed,
            retry_backoff=0.2, route_wait=10.0,
            # A forward waits lease + grace for its ACK, as in production (not 2 s).
            ack_timeout=None,
        )
        async with contextlib.AsyncExitStack() as stack:
            if self.s.server:
                # Duck-typed: RealServer answers every DevServer member the soak uses
                # with the faults Inngest's server allows (the others are refused).
                self.real = await stack.enter_async_context(RealServer(self.s.server))
                dev = cast(DevServer, self.real)
            else:
                dev = await stack.enter_async_context(DevServer(config))
            try:
                await self._soak(dev)
            finally:
                for task in self.tasks:
                    task.cancel()
                for process in self.result.workers:
                    process.kill()
                    await process.__aexit__(None, None, None)
                for task in self.exits:
                    task.cancel()
            audit(self.result, dev, self.exec_log)
        self.result.wall_seconds = time.monotonic() - started
        return self.result

    async def _soak(self, dev: DevServer) -> None:
        s = self.s
        self.slots = [self.spawn(dev, i) for i in range(s.replicas)]
        for process in self.slots:
            await self.start(dev, process)
        for process in self.slots:
            await process.wait_ready(dev, timeout=60)
        self.t0 = time.time()
        self.say(f"{s.replicas} replicas READY; load and faults for {s.minutes:g} min "
                 f"(seed {s.seed})")
        stop = asyncio.Event()
        load = asyncio.create_task(keep_load(dev, s.runs_in_flight, self.result.run_ids, stop,
                                             lambda: self._send_report(dev),
                                             s.settle_timeout))
        sampler = asyncio.create_task(self._sample_rss())
        progress = asyncio.create_task(self._progress(dev))
        try:
            await self._inject(dev)
            stop.set()
            await load
            self.say(f"faults done; waiting for {self._unfinished(dev)} runs still going")
            await dev.wait_for(lambda: self._unfinished(dev) == 0, timeout=s.settle_timeout)
        except TimeoutError:
            self.result.errors.append(f"runs did not settle within {s.settle_timeout:g} s")
        finally:
            # On Ctrl-C (cancellation) run() kills every replica; nothing waits here.
            stop.set()
            load.cancel()
            self.stopping = True
            sampler.cancel()
            progress.cancel()
        # Deploys and drains under way finish first; then every replica is stopped.
        async with self.deploying:
            pass
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=s.drain_timeout + 30)
        if self.real is None:
            dev.faults.withhold_reply_ack = False
            dev.faults.frame_latency = 0.0
            dev.faults.delay_request_ack = 0.0
            dev.faults.reply_close_race = 0.0
        for process in self.slots:
            if process.alive and process.signalled_at is None:
                process.send_signal()
        if self.exits:
            await asyncio.wait(self.exits, timeout=s.drain_timeout + 30)

    def _unfinished(self, dev: DevServer) -> int:
        return sum(1 for r in self.result.run_ids if not dev.runs[r].status.terminal)

    async def _send_report(self, dev: DevServer) -> list[str]:
        low, high = self.s.step_seconds
        steps = [round(self.load_rng.uniform(low, high), 3) for _ in range(self.s.steps)]
        return await dev.send_event(soak_app.EVENT, {"steps": steps})

    async def _progress(self, dev: DevServer) -> None:
        """A line a minute, so a long soak shows it is alive."""
        while True:
            await asyncio.sleep(60)
            done = sum(1 for r in self.result.run_ids
                       if dev.runs[r].status is RunStatus.COMPLETED)
            faults = Counter(a.fault.kind for a in self.result.applied)
            self.say(f"{(time.time() - self.t0) / 60:.0f} min: {sum(faults.values())} faults "
                     f"({', '.join(f'{k} {n}' for k, n in faults.most_common())}); "
                     f"{done} runs completed; "
                     f"{sum(1 for w in self.result.workers if w.started_at)} replicas started")

    async def _sample_rss(self) -> None:
        while True:
            now = round(time.time() - self.t0, 1)
            for process in self.result.workers:
                # From READY (imports done) until SIGTERM: the steady state.
                steady = process.signalled_at is None and process.events("connection.ready")
                rss = process.rss_bytes() if steady else None
                if rss is not None:
                    self.result.rss.setdefault(process.instance_id, []).append((now, rss))
            await asyncio.sleep(self.s.rss_interval)

    async def _inject(self, dev: DevServer) -> None:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        for fault in self.s.schedule():
            delay = begin + fault.at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            applied = Applied(fault, time.time())
            self.result.applied.append(applied)
            self._background(self._apply(dev, fault, applied))
        end = begin + self.s.minutes * 60 - loop.time()
        if end > 0:
            await asyncio.sleep(end)

    def _background(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except (TimeoutError, RuntimeError) as exc:
                self.result.errors.append(f"fault failed: {exc}".splitlines()[0])

        task = asyncio.create_task(guarded())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _apply(self, dev: DevServer, fault: Fault, applied: Applied) -> None:
        kind = fault.kind
        slot = fault.target % len(self.slots)
        if kind == "deploy":
            await self._deploy(dev, applied)
        elif kind == "crash":
            # The restart is started first so that the swap and the kill happen together
            # (no await in between: a deploy never sees a half-replaced slot).
            replacement = self.spawn(dev, slot)
            await self.start(dev, replacement)
            victim, self.slots[slot] = self.slots[slot], replacement
            victim.crash()
            applied.hit.append(victim.instance_id)
            applied.note = f"restarted as {replacement.instance_id}"
            try:
                await replacement.wait_ready(dev, timeout=60)
            except RuntimeError:
                if replacement.signalled_at is None and replacement.killed_at is None:
                    raise
                # A later deploy or crash replaced it before it was READY: fine.
        elif kind in ("gateway-closing", "drop"):
            draining = self.draining()
            pool = draining if fault.on_draining and draining else self.slots
            if fault.on_draining and not draining:
                applied.note = "no replica draining: hit a live one"
            victim = pool[fault.target % len(pool)]
            conn_id = self.conn_of(dev, victim)
            if conn_id is None:
                applied.note = f"{victim.instance_id} had no connection"
                return
            applied.hit.append(victim.instance_id)
            if kind == "drop":
                await dev.drop_socket(conn_id)
            else:
                await dev.gateway_closing(conn_id)
        elif kind == "withhold-ack":
            self.withhold_until = max(self.withhold_until, time.monotonic() + fault.seconds)
            until = self.withhold_until
            dev.faults.withhold_reply_ack = lambda _request_id: time.monotonic() < until
        elif kind == "gateway-restart":
            await dev.restart_gateway(fault.seconds)
        elif kind == "flush-outage":
            dev.fail_flush(fault.seconds)
        elif kind == "latency":
            await self._delay_for_a_while(dev, "frame_latency", fault)
        elif kind == "slow-acks":
            await self._delay_for_a_while(dev, "delay_request_ack", fault)
        elif kind == "stall" and self.real is not None:
            self.real.stall(fault.seconds)
        elif kind == "reply-close":
            await asyncio.gather(self._delay_for_a_while(dev, "reply_close_race", fault),
                                 self._close_after_a_reply(dev, fault, applied))

    async def _close_after_a_reply(self, dev: DevServer, fault: Fault, applied: Applied) -> None:
        """Drop a replica's socket just after the gateway reads a WORKER_REPLY on it, while
        the reply is still being handled (the reply/close race): that reply is discarded,
        and only the worker can still get it delivered."""
        victim = self.slots[fault.target % len(self.slots)]
        conn_id = self.conn_of(dev, victim)
        if conn_id is None:
            applied.note = f"{victim.instance_id} had no connection"
            return
        seen = len(dev.timeline)

        def replied() -> bool:
            return any(e.kind == "WORKER_REPLY" and e.conn_id == conn_id
                       for e in dev.timeline[seen:])

        try:
            await dev.wait_for(replied, timeout=fault.seconds)
        except TimeoutError:
            applied.note = f"no reply from {victim.instance_id} while the fault lasted"
            return
        applied.hit.append(victim.instance_id)
        await dev.drop_socket(conn_id)

    async def _delay_for_a_while(self, dev: DevServer, setting: str, fault: Fault) -> None:
        """Set the delay ``dev.faults.<setting>`` for the fault's seconds; a fault of the
        same kind landing meanwhile extends it (only the last one to end clears it)."""
        until = self.delays_until[setting] = time.monotonic() + fault.seconds
        setattr(dev.faults, setting, fault.delay)
        await asyncio.sleep(fault.seconds)
        if self.delays_until[setting] == until:
            setattr(dev.faults, setting, 0.0)

    async def _deploy(self, dev: DevServer, applied: Applied) -> None:
        """Every slot in turn: replacement READY, then SIGTERM to the old process. One
        deploy at a time (a platform queues deploys)."""
        async with self.deploying:
            for slot in range(len(self.slots)):
                if self.stopping:
                    applied.note = "cut short: the soak was ending"
                    return
                replacement = self.spawn(dev, slot)
                await self.start(dev, replacement)
                old = await replace_when_ready(dev, self.slots, slot, replacement, timeout=60)
                applied.hit.append(old.instance_id)


def _range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    try:
        pair = (float(low), float(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH seconds, got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH, got {text!r}")
    return pair


def build_parser() -> argparse.ArgumentParser:
    d = SoakSettings()
    parser = argparse.ArgumentParser(
        prog="connect-worker soak",
        description="Random overlapping faults (seeded) on real worker replicas under steady "
        "load on the local gateway; then checks that every run completed, every duplicate "
        "execution is explained and no reply was lost. Exit code 1 if not.",
        epilog="faults (each on unless switched off):\n" + "\n".join(
            f"  --no-{kind:<16} {text}" for kind, text in FAULT_KINDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=d.minutes,
                        help=f"how long faults and load go on (default {d.minutes:g})")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed of the fault schedule and the load (default %(default)s)")
    parser.add_argument("--replicas", type=int, default=d.replicas)
    parser.add_argument("--runs-in-flight", type=int, default=d.runs_in_flight)
    parser.add_argument("--steps", type=int, default=d.steps, help="steps per report")
    parser.add_argument("--step-seconds", type=_range, default=d.step_seconds,
                        metavar="LOW-HIGH", help="each step's length, drawn uniformly "
                        f"(default {d.step_seconds[0]:g}-{d.step_seconds[1]:g})")
    parser.add_argument("--fault-interval", type=_range, default=d.fault_interval,
                        metavar="LOW-HIGH", help="seconds between faults (default "
                        f"{d.fault_interval[0]:g}-{d.fault_interval[1]:g})")
    parser.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    parser.add_argument("--json", metavar="FILE", help="also write everything as JSON")
    parser.add_argument("--confirm-before-run", action="store_true",
                        help="replicas start each step body only after the gateway "
                        "confirmed its lease (CONNECT_WORKER_CONFIRM_BEFORE_RUN=1)")
    parser.add_argument("--server", metavar="URL",
                        help="soak against a running Inngest dev server (`inngest dev`) at "
                        "URL instead of our dev gateway; its faults only: "
                        + ", ".join(REAL_KIND_NAMES))
    parser.add_argument("--faults", metavar="KIND,...",
                        help="only these fault kinds (default: every kind the server allows)")
    parser.add_argument("--plan", action="store_true",
                        help="print the fault schedule for this seed and exit")
    for kind in dict.fromkeys((*KIND_NAMES, *REAL_KIND_NAMES)):
        parser.add_argument(f"--no-{kind}", dest=f"no_{kind.replace('-', '_')}",
                            action="store_true", help=argparse.SUPPRESS)
    return parser


def fault_kinds(args: argparse.Namespace) -> tuple[str, ...]:
    """The kinds asked for (``--faults``, else the server's menu) minus ``--no-<kind>``;
    ValueError (one line) for a kind that does not exist or that Inngest's server cannot
    be made to do."""
    menu = REAL_KIND_NAMES if args.server else KIND_NAMES
    asked = tuple(k.strip() for k in args.faults.split(",") if k.strip()) if args.faults \
        else menu
    unknown = [k for k in asked if k not in (*KIND_NAMES, *REAL_KIND_NAMES)]
    if unknown:
        raise ValueError(f"unknown fault kind(s): {', '.join(unknown)}")
    if args.server:
        refused = refused_faults(asked)
        if refused:
            raise ValueError(refused)
    elif any(k not in KIND_NAMES for k in asked):
        raise ValueError("stall needs --server (our dev gateway rehearses it as latency)")
    return tuple(k for k in asked if not getattr(args, f"no_{k.replace('-', '_')}"))


def settings_from(args: argparse.Namespace) -> SoakSettings:
    kinds = fault_kinds(args)
    return SoakSettings(
        replicas=args.replicas, minutes=args.minutes, runs_in_flight=args.runs_in_flight,
        steps=args.steps, step_seconds=args.step_seconds, fault_interval=args.fault_interval,
        kinds=kinds, drain_timeout=args.drain_timeout, seed=args.seed, server=args.server,
        confirm_before_run=args.confirm_before_run,
        # Inngest's leases are 2 min and its retries back off 15-45 s: a crashed step
        # comes back minutes later.
        **({"settle_timeout": 420.0} if args.server else {}),
    )


def run_soak(settings: SoakSettings, workdir: Path | None = None,
             say: Callable[[str], None] = print) -> SoakResult:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="connect-worker-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "executions.jsonl").unlink(missing_ok=True)
    return asyncio.run(Soak(settings, workdir, say).run())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("replicas", "runs_in_flight", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.minutes < float("inf"):
        parser.error("--minutes must be a number > 0")
    if args.fault_interval[0] <= 0:
        parser.error("--fault-interval must be above 0")
    try:
        settings = settings_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.plan:
        for f in settings.schedule():
            print(json.dumps(asdict(f)))
        return 0
    if sys.platform != "linux":
        print("connect-worker soak: note: RSS is read from /proc, so it is not sampled here",
              file=sys.stderr)
    print(f"soak: {settings.replicas} replicas, {settings.runs_in_flight} runs of "
          f"{settings.steps} steps in flight, {len(settings.schedule())} faults over "
          f"{settings.minutes:g} min (seed {settings.seed}; kinds: "
          f"{', '.join(settings.kinds) or 'none'})", flush=True)

    def say(line: str) -> None:
        print(f"  {line}", flush=True)

    try:
        result = run_soak(settings, say=say)
    except KeyboardInterrupt:
        print("connect-worker soak: interrupted (every replica killed)", file=sys.stderr)
        return 130
    except (TimeoutError, RuntimeError, OSError) as exc:
        print(f"connect-worker soak: failed: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(result.table())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1, default=str))
    return 0 if result.ok else 1
