"""``scripts/bench``: connect_worker vs the official SDK's Connect client, side by side.

One run of this module measures both workers against the local devserver
(``connect_worker.devserver``, running in this process) with the same no-op
function (``connect_worker.lab.bench_app``: one step, so two executor requests per
run), alternating which goes first, for ``--rounds`` rounds, and prints the
medians and their ratios (connect_worker / SDK client).

Each worker is a subprocess of its own, so its CPU time and RSS are its own
(read from ``/proc/<pid>``; Linux only):

- runs/s: N runs driven at concurrency C (C runs in flight; each finished run
  is replaced at once), after a warm-up that is not counted;
- worker CPU ms per run: utime+stime of the worker process (all threads) over
  the measured runs, divided by N;
- SDK execution: the same two requests per run executed N times in-process
  through the SDK's ``CommHandler.post`` (a separate subprocess, no transport),
  CPU ms per run, called as each worker calls it: the official client with the
  SDK's default request timings (six timers and a 100 ms tracker task per
  request, for an HTTP header), connect_worker without them (``NO_TIMINGS``);
  ``own overhead`` = worker CPU - its SDK execution;
- dispatch->ack / dispatch->reply p50 and p99: from the devserver's
  ``Dispatch.sent_at``/``acked_at``/``replied_at`` (every request of the
  measured runs);
- peak RSS: ``VmHWM`` at the end of the round; idle CPU and RSS: the worker
  connected and READY with no work for ``--idle`` seconds (before any load),
  CPU from the per-thread ``schedstat`` (ns) and ``VmRSS`` at the end;
- devserver CPU ms per run: this process (devserver + driver) over the
  measured runs, for context: on a small machine it is the bottleneck.

``--scale N`` measures something else, for each worker: a burst of N runs whose one
step awaits ``asyncio.sleep(--hold)`` (60 s), so N steps are in flight at once, with the
gateway's production timings (lease 120 s, extension every 30 s, heartbeat 10 s). It
reports the burst's dispatch->ack latencies, RSS per step in flight, the worker's
event-loop lag while holding them (a 50 ms probe on its main loop), the largest gap
between a step's lease renewals (ACK, extensions, reply) and between heartbeats as the
gateway saw them, and the worker's CPU per lease extension (all its CPU while holding,
divided by the extensions it sent meanwhile: an upper bound).

``--bridge-cost`` adds a third worker to each round of the default mode: connect_worker
with its user-code thread taken out (served with ``engine.userloop.InlineUserLoop``,
which runs the request on the engine's own loop). connect_worker serves with no such
loop: one blocking step would stop every heartbeat and lease extension. The difference
prices that guarantee.

``--tracing`` adds connect_worker with OpenTelemetry tracing on to each round, next to
connect_worker without it: the same worker with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set to a
sink in this process that answers every export (it decodes nothing) and
``OTEL_TRACES_SAMPLER=always_on``, so every step's span is recorded and exported by the
batch processor. Its CPU per run against connect_worker's, per round and as medians, is
the cost of tracing (docs/benchmarks.md).

Internal modes (used by the bench itself): ``sdk-worker`` runs the official
client, ``cw-worker`` runs connect_worker as ``connect_worker run`` does plus the lag
probe (``--inline``: the experiment above), ``sdk-cost`` measures the SDK execution cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from ..devserver import DevServer
    from .fleet import WorkerProcess

CW = "connect_worker"
SDK = "sdk_client"
# An experiment, not a mode connect_worker has: user code on the engine's own loop, no
# thread (``--bridge-cost``). It prices the guarantee the thread buys (see the docstring).
INLINE = "connect_worker_inline"
# connect_worker with tracing on (``--tracing``).
TRACED = "connect_worker_traced"
# connect_worker as ``--scale`` runs it: the bench's cw-worker mode, with the lag probe.
SCALE_CW = "connect_worker_probed"
# connect_worker with CONNECT_WORKER_CONFIRM_BEFORE_RUN=1 (``--confirm-before-run``).
CONFIRMED = "connect_worker_confirm"
WORKERS = (CW, SDK)
LABELS = {CW: "connect_worker", SDK: "SDK client", INLINE: "cw, no thread",
          TRACED: "cw, tracing on", CONFIRMED: "cw, confirm"}
REQUESTS_PER_RUN = 2
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_KB = 1024.0


# -- /proc readers ---------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (exited threads included)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_thread_cpu_ns(pid: int) -> int:
    """Time on CPU (ns) summed over the live threads; precise, for idle windows."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def proc_status_kb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1])
    raise KeyError(key)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    index = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[index]


# -- results ---------------------------------------------------------------------


@dataclass
class Sample:
    """One worker, one round."""

    worker: str
    round: int
    runs: int
    seconds: float
    runs_per_s: float
    cpu_ms_per_run: float
    ack_p50_ms: float
    ack_p99_ms: float
    reply_p50_ms: float
    reply_p99_ms: float
    peak_rss_mb: float
    idle_cpu_ms_per_s: float
    idle_rss_mb: float
    devserver_cpu_ms_per_run: float
    failed_runs: int
    redispatches: int
    exit_code: int | None


@dataclass
class Summary:
    """Medians over the rounds for one worker."""

    worker: str
    runs_per_s: float
    cpu_ms_per_run: float
    sdk_ms_per_run: float
    overhead_ms_per_run: float
    ack_p50_ms: float
    ack_p99_ms: float
    reply_p50_ms: float
    reply_p99_ms: float
    peak_rss_mb: float
    idle_cpu_ms_per_s: float
    idle_rss_mb: float
    devserver_cpu_ms_per_run: float
    failed_runs: int


FIELDS: list[tuple[str, str, str]] = [
    # (Summary attribute, label, format)
    ("runs_per_s", "runs/s", "{:.0f}"),
    ("cpu_ms_per_run", "worker CPU ms/run (total)", "{:.3f}"),
    ("sdk_ms_per_run", "  SDK execution, as it calls it", "{:.3f}"),
    ("overhead_ms_per_run", "  worker's own overhead", "{:.3f}"),
    ("ack_p50_ms", "dispatch->ack p50 ms", "{:.2f}"),
    ("ack_p99_ms", "dispatch->ack p99 ms", "{:.2f}"),
    ("reply_p50_ms", "dispatch->reply p50 ms", "{:.2f}"),
    ("reply_p99_ms", "dispatch->reply p99 ms", "{:.2f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.1f}"),
    ("idle_cpu_ms_per_s", "idle CPU ms/s", "{:.3f}"),
    ("idle_rss_mb", "idle RSS MB", "{:.1f}"),
    ("devserver_cpu_ms_per_run", "devserver CPU ms/run (context)", "{:.3f}"),
    ("failed_runs", "failed runs (sum)", "{:.0f}"),
]


PAIRED = ("runs_per_s", "cpu_ms_per_run", "reply_p50_ms", "reply_p99_ms")


def summarize(worker: str, samples: list[Sample], sdk_costs: list[float]) -> Summary:
    mine = [s for s in samples if s.worker == worker]

    def med(attr: str) -> float:
        return statistics.median(float(getattr(s, attr)) for s in mine)

    sdk = statistics.median(sdk_costs)
    cpu = med("cpu_ms_per_run")
    return Summary(
        worker=worker,
        runs_per_s=med("runs_per_s"),
        cpu_ms_per_run=cpu,
        sdk_ms_per_run=sdk,
        overhead_ms_per_run=cpu - sdk,
        ack_p50_ms=med("ack_p50_ms"),
        ack_p99_ms=med("ack_p99_ms"),
        reply_p50_ms=med("reply_p50_ms"),
        reply_p99_ms=med("reply_p99_ms"),
        peak_rss_mb=med("peak_rss_mb"),
        idle_cpu_ms_per_s=med("idle_cpu_ms_per_s"),
        idle_rss_mb=med("idle_rss_mb"),
        devserver_cpu_ms_per_run=med("devserver_cpu_ms_per_run"),
        failed_runs=sum(s.failed_runs for s in mine),
    )


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def targets(cw: Summary, sdk: Summary) -> list[tuple[str, bool]]:
    return [
        (f"total CPU ratio {ratio(cw.cpu_ms_per_run, sdk.cpu_ms_per_run):.2f} <= 0.65",
         cw.cpu_ms_per_run <= 0.65 * sdk.cpu_ms_per_run),
        (f"own overhead {cw.overhead_ms_per_run:.3f} ms <= 0.35 ms",
         cw.overhead_ms_per_run <= 0.35),
        ("dispatch->reply p50 lower", cw.reply_p50_ms < sdk.reply_p50_ms),
        ("dispatch->reply p99 lower", cw.reply_p99_ms < sdk.reply_p99_ms),
        ("dispatch->ack p50 lower", cw.ack_p50_ms < sdk.ack_p50_ms),
        ("dispatch->ack p99 lower", cw.ack_p99_ms < sdk.ack_p99_ms),
    ]


def paired_ratios(samples: list[Sample], attr: str) -> list[float]:
    """connect_worker / SDK client within each round (the two ran back to back)."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        by_round.setdefault(s.round, {})[s.worker] = float(getattr(s, attr))
    return [ratio(r[CW], r[SDK]) for _, r in sorted(by_round.items()) if CW in r and SDK in r]


def render_bridge_cost(cw: Summary, sdk: Summary, inline: Summary) -> str:
    """The ``--bridge-cost`` lines: what the user-code thread costs per run."""
    return "\n".join([
        "",
        "the user-code thread's cost (--bridge-cost; no thread is an experiment, not a mode):",
        f"  worker CPU ms/run, no thread   {inline.cpu_ms_per_run:.3f}"
        f"  ({ratio(inline.cpu_ms_per_run, sdk.cpu_ms_per_run):.2f}x the SDK client's)",
        f"  the thread costs               {cw.cpu_ms_per_run - inline.cpu_ms_per_run:.3f}"
        f" ms/run ({ratio(cw.cpu_ms_per_run - inline.cpu_ms_per_run, cw.cpu_ms_per_run):.0%}"
        " of connect_worker's CPU)",
        f"  dispatch->reply p50/p99 ms     {inline.reply_p50_ms:.2f} / {inline.reply_p99_ms:.2f}",
    ])


def render_tracing(samples: list[Sample], cw: Summary, traced: Summary) -> str:
    """The ``--tracing`` lines: what tracing on costs per run."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        by_round.setdefault(s.round, {})[s.worker] = s.cpu_ms_per_run
    paired = [ratio(r[TRACED], r[CW]) for _, r in sorted(by_round.items())
              if CW in r and TRACED in r]
    return "\n".join([
        "",
        "tracing on (--tracing: OTLP/HTTP to a local sink, batch processor, always_on):",
        f"  worker CPU ms/run              {traced.cpu_ms_per_run:.3f}"
        f"  ({ratio(traced.cpu_ms_per_run, cw.cpu_ms_per_run) - 1:+.1%} against tracing off,"
        f" {cw.cpu_ms_per_run:.3f})",
        "  per round (on / off)           " + " ".join(f"{r:.2f}" for r in paired),
        f"  dispatch->reply p50/p99 ms     {traced.reply_p50_ms:.2f} / {traced.reply_p99_ms:.2f}",
        f"  peak RSS MB                    {traced.peak_rss_mb:.1f}",
    ])


def render_confirm(samples: list[Sample], cw: Summary, confirmed: Summary) -> str:
    """The ``--confirm-before-run`` lines: what waiting for one lease confirmation per
    request costs (each run is two requests, so two extension round trips)."""
    by_round: dict[int, dict[str, Sample]] = {}
    for s in samples:
        by_round.setdefault(s.round, {})[s.worker] = s
    paired = [(r[CONFIRMED].reply_p50_ms, r[CW].reply_p50_ms)
              for _, r in sorted(by_round.items()) if CW in r and CONFIRMED in r]
    return "\n".join([
        "",
        "confirm-before-run (--confirm-before-run: CONNECT_WORKER_CONFIRM_BEFORE_RUN=1):",
        f"  dispatch->reply p50 ms         {confirmed.reply_p50_ms:.2f}"
        f"  ({confirmed.reply_p50_ms - cw.reply_p50_ms:+.2f} against off, "
        f"{cw.reply_p50_ms:.2f})",
        f"  dispatch->reply p99 ms         {confirmed.reply_p99_ms:.2f}"
        f"  (off {cw.reply_p99_ms:.2f})",
        "  per round p50 (on / off)       "
        + " ".join(f"{on:.2f}/{off:.2f}" for on, off in paired),
        f"  worker CPU ms/run              {confirmed.cpu_ms_per_run:.3f}"
        f"  (off {cw.cpu_ms_per_run:.3f})",
        f"  runs/s                         {confirmed.runs_per_s:.0f}  (off {cw.runs_per_s:.0f})",
    ])


def render(args: argparse.Namespace, cw: Summary, sdk: Summary, ncpu: int,
           paired: dict[str, list[float]]) -> str:
    head = (
        f"N={args.runs} runs x {REQUESTS_PER_RUN} requests (1 no-op step), C={args.concurrency},"
        f" {args.rounds} round(s), warm-up {args.warmup}, idle {args.idle:g}s;"
        f" medians; {ncpu} CPU(s); Python {sys.version.split()[0]}; server: "
        f"{getattr(args, 'server', None) or 'our dev gateway'}"
    )
    width = 32
    lines = [head, "",
             f"{'':<{width}}{LABELS[CW]:>16}{LABELS[SDK]:>14}{'ratio':>9}"]
    for attr, label, fmt in FIELDS:
        a = float(getattr(cw, attr))
        b = float(getattr(sdk, attr))
        r = "" if attr in ("sdk_ms_per_run", "failed_runs") else f"{ratio(a, b):.2f}"
        lines.append(f"{label:<{width}}{fmt.format(a):>16}{fmt.format(b):>14}{r:>9}".rstrip())
    lines.append("")
    lines.append("per-round ratios (back-to-back pairs, shows the spread):")
    for attr, values in paired.items():
        lines.append(f"  {attr:<{width - 2}}" + " ".join(f"{v:.2f}" for v in values))
    lines.append("")
    lines.append("targets (connect_worker vs SDK client):")
    for text, ok in targets(cw, sdk):
        lines.append(f"  [{'met' if ok else 'NOT MET'}] {text}")
    return "\n".join(lines)


# -- driving the devserver -------------------------------------------------------


async def drive(dev: DevServer, n: int, concurrency: int, bound: float) -> list[str]:
    """Start ``n`` runs keeping ``concurrency`` in flight; return their IDs once all ended."""
    from .bench_app import EVENT

    started: list[str] = []
    inflight: set[str] = set()
    runs = dev.runs

    def any_done() -> bool:
        return any(runs[r].status.terminal for r in inflight)

    while len(started) < n or inflight:
        wanted = min(concurrency - len(inflight), n - len(started))
        # At once: on Inngest's server each send waits for its run to be created.
        sent = await asyncio.gather(*(dev.send_event(EVENT, {"i": len(started) + i})
                                      for i in range(max(0, wanted))))
        for ids in sent:
            if len(ids) != 1:
                raise RuntimeError(f"event started {len(ids)} runs (is the worker synced?)")
            started.append(ids[0])
            inflight.add(ids[0])
        await dev.wait_for(any_done, bound)
        inflight.difference_update([r for r in inflight if runs[r].status.terminal])
    return started


def _worker_command(kind: str, instance_id: str) -> list[str]:
    if kind in (CW, TRACED, CONFIRMED):
        return [sys.executable, "-m", "connect_worker", "run", "connect_worker.lab.bench_app"]
    if kind == INLINE:
        return [sys.executable, "-m", "connect_worker.lab.bench", "cw-worker", "--inline"]
    if kind == SCALE_CW:
        return [sys.executable, "-m", "connect_worker.lab.bench", "cw-worker"]
    return [sys.executable, "-m", "connect_worker.lab.bench", "sdk-worker",
            "--instance-id", instance_id]


def _worker(command: list[str], instance_id: str, api_url: str, *,
            traces_to: str | None = None, env: dict[str, str] | None = None) -> WorkerProcess:
    """One bench worker, the fleet's process running ``command``: the worker's own default
    timings, quiet (warnings only), traced to ``traces_to`` when given."""
    from .fleet import WorkerProcess  # not at import time: the bench's workers import us

    extra = {"CONNECT_WORKER_LOG_LEVEL": "warning"}
    if traces_to is not None:
        extra.update({"OTEL_EXPORTER_OTLP_ENDPOINT": traces_to,
                      "OTEL_TRACES_SAMPLER": "always_on"})
    return WorkerProcess("connect_worker.lab.bench_app", api_url, instance_id,
                         drain_timeout=None, reply_ack_timeout=None,
                         env={**extra, **(env or {})}, command=command)


def _cost_env() -> dict[str, str]:
    """The environment of the in-process SDK cost measurement: a bench worker's."""
    env: dict[str, str] = _worker([], "bench-sdk-cost", "http://127.0.0.1:9").environment()
    return env


async def _stop(worker: WorkerProcess, grace: float) -> int | None:
    """SIGTERM and wait; None when it had to be killed."""
    try:
        code: int = await worker.stop(grace)
        return code
    except TimeoutError:
        return None


@contextlib.contextmanager
def _trace_sink(exports: list[int]) -> Iterator[str]:
    """An OTLP/HTTP endpoint on 127.0.0.1 that accepts every export unread (``--tracing``);
    ``exports`` gets the size of each."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Sink(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector does

        def do_POST(self) -> None:
            exports.append(len(self.rfile.read(int(self.headers.get("Content-Length", "0")))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def measure(kind: str, round_no: int, args: argparse.Namespace,
                  traces_to: str | None = None) -> Sample:
    from ..devserver import DevServer, DevServerConfig, RunStatus
    from .real_server import RealServer

    instance_id = f"bench-{kind}-{round_no}"
    cfg = DevServerConfig(interval_format="seconds")
    async with contextlib.AsyncExitStack() as stack:
        env_extra: dict[str, str] = {}
        if args.server:
            # Duck-typed: RealServer answers every DevServer member used here; both
            # workers connect through its recording proxy.
            real = await stack.enter_async_context(RealServer(args.server))
            env_extra = real.worker_env
            dev = cast("DevServer", real)
        else:
            dev = await stack.enter_async_context(DevServer(cfg))
        if kind == CONFIRMED:
            env_extra = {**env_extra, "CONNECT_WORKER_CONFIRM_BEFORE_RUN": "1"}
        proc = await stack.enter_async_context(_worker(
            _worker_command(kind, instance_id), instance_id, dev.api_url,
            traces_to=traces_to if kind == TRACED else None, env=env_extra))
        pid = proc.pid
        exit_code: int | None = None
        try:
            await proc.wait_ready(dev, args.timeout)
            await asyncio.sleep(args.settle)

            # Idle: connected, READY, nothing to do.
            c0, t0 = proc_thread_cpu_ns(pid), time.monotonic()
            await asyncio.sleep(args.idle)
            c1, t1 = proc_thread_cpu_ns(pid), time.monotonic()
            idle_cpu = (c1 - c0) / 1e6 / (t1 - t0)
            idle_rss = proc_status_kb(pid, "VmRSS") / _PAGE_KB

            if args.warmup:
                await drive(dev, args.warmup, args.concurrency, args.timeout)

            first = len(dev.dispatches)
            w0, b0, t0 = proc_cpu_seconds(pid), time.process_time(), time.perf_counter()
            run_ids = await drive(dev, args.runs, args.concurrency, args.timeout)
            t1 = time.perf_counter()
            w1, b1 = proc_cpu_seconds(pid), time.process_time()
            peak_rss = proc_status_kb(pid, "VmHWM") / _PAGE_KB

            measured = set(run_ids)
            dispatches = [d for d in dev.dispatches[first:] if d.run_id in measured]
            acks = [(d.acked_at - d.sent_at) * 1000 for d in dispatches
                    if d.acked_at is not None]
            replies = [(d.replied_at - d.sent_at) * 1000 for d in dispatches
                       if d.replied_at is not None]
            failed = sum(dev.runs[r].status is not RunStatus.COMPLETED for r in run_ids)
            redispatches = len(dispatches) - REQUESTS_PER_RUN * args.runs
        finally:
            exit_code = await _stop(proc, args.timeout)
    seconds = t1 - t0
    return Sample(
        worker=kind,
        round=round_no,
        runs=args.runs,
        seconds=seconds,
        runs_per_s=args.runs / seconds,
        cpu_ms_per_run=(w1 - w0) * 1000 / args.runs,
        ack_p50_ms=percentile(acks, 0.50),
        ack_p99_ms=percentile(acks, 0.99),
        reply_p50_ms=percentile(replies, 0.50),
        reply_p99_ms=percentile(replies, 0.99),
        peak_rss_mb=peak_rss,
        idle_cpu_ms_per_s=idle_cpu,
        idle_rss_mb=idle_rss,
        devserver_cpu_ms_per_run=(b1 - b0) * 1000 / args.runs,
        failed_runs=failed,
        redispatches=redispatches,
        exit_code=exit_code,
    )


async def sdk_cost_subprocess(kind: str, runs: int, bound: float) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connect_worker.lab.bench", "sdk-cost", "--runs", str(runs),
        "--as", kind,
        env=_cost_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), bound)
    if proc.returncode != 0:
        raise RuntimeError(f"sdk-cost failed ({proc.returncode}): {err.decode()[-4000:]}")
    return float(json.loads(out)["ms_per_run"])


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    samples: list[Sample] = []
    sdk_costs: dict[str, list[float]] = {kind: [] for kind in WORKERS}
    exports: list[int] = []  # --tracing: OTLP requests the sink received (bytes each)
    with _trace_sink(exports) if args.tracing else contextlib.nullcontext("") as sink:
        for round_no in range(1, args.rounds + 1):
            order = WORKERS if round_no % 2 else WORKERS[::-1]
            kinds = list(order)
            if args.tracing:
                kinds.insert(1, TRACED)  # next to connect_worker, after it or before it
            if args.confirm_before_run:
                kinds.insert(1, CONFIRMED)
            if args.bridge_cost:
                kinds.append(INLINE)
            for kind in kinds:
                sample = await measure(kind, round_no, args, sink or None)
                samples.append(sample)
                _progress(
                    f"round {round_no}/{args.rounds} {LABELS[kind]:>14}: "
                    f"{sample.runs_per_s:.0f} runs/s, {sample.cpu_ms_per_run:.3f} CPU ms/run, "
                    f"reply p50 {sample.reply_p50_ms:.2f} ms p99 {sample.reply_p99_ms:.2f} ms, "
                    f"failed {sample.failed_runs}, exit {sample.exit_code}"
                )
            for kind in order:
                sdk_costs[kind].append(await sdk_cost_subprocess(kind, args.runs, args.timeout))
            _progress(f"round {round_no}/{args.rounds} SDK execution: "
                      f"{sdk_costs[CW][-1]:.3f} CPU ms/run as connect_worker calls it, "
                      f"{sdk_costs[SDK][-1]:.3f} as the SDK client does")
    cw = summarize(CW, samples, sdk_costs[CW])
    sdk = summarize(SDK, samples, sdk_costs[SDK])
    inline = summarize(INLINE, samples, sdk_costs[CW]) if args.bridge_cost else None
    traced = summarize(TRACED, samples, sdk_costs[CW]) if args.tracing else None
    confirmed = (summarize(CONFIRMED, samples, sdk_costs[CW]) if args.confirm_before_run
                 else None)
    return {
        "config": {k: getattr(args, k) for k in
                   ("runs", "concurrency", "rounds", "warmup", "idle")},
        "cpus": os.cpu_count() or 0,
        "samples": [asdict(s) for s in samples],
        "sdk_costs_ms_per_run": sdk_costs,
        "summary": {CW: asdict(cw), SDK: asdict(sdk),
                    **({INLINE: asdict(inline)} if inline else {}),
                    **({TRACED: asdict(traced)} if traced else {}),
                    **({CONFIRMED: asdict(confirmed)} if confirmed else {})},
        "ratios": {attr: ratio(float(getattr(cw, attr)), float(getattr(sdk, attr)))
                   for attr, _, _ in FIELDS if attr not in ("sdk_ms_per_run", "failed_runs")},
        "targets": dict(targets(cw, sdk)),
        "paired_ratios": {attr: paired_ratios(samples, attr) for attr in PAIRED},
        **({"trace_exports": len(exports), "trace_export_bytes": sum(exports)}
           if args.tracing else {}),
    }


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# -- --scale N -------------------------------------------------------------------

LAG_INTERVAL = 0.05
LAG_FILE_ENV = "CONNECT_WORKER_BENCH_LAG_FILE"


class LagProbe:
    """How late the event loop wakes from a 50 ms sleep, with when (unix time); and the
    garbage collector's pauses (every thread stops for them)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self.gc_pauses: list[tuple[float, int, float]] = []  # (when, generation, seconds)
        self.heartbeats: list[float] = []  # when the worker sent one (connect_worker only)
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def watch_heartbeats(self) -> None:
        """Record when the worker sends each heartbeat (its ``heartbeat.sent`` debug event:
        the gateway's view of them includes its own backlog)."""
        heartbeats = self.heartbeats

        class Heartbeats(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if getattr(record, "event", None) == "heartbeat.sent":
                    heartbeats.append(record.created)

        logger = logging.getLogger("connect_worker")
        logger.setLevel(logging.DEBUG)
        logger.addHandler(Heartbeats(logging.DEBUG))
        warnings = logging.StreamHandler()  # what would have reached stderr without us
        warnings.setLevel(logging.WARNING)
        logger.addHandler(warnings)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses.append(
                (time.time(), info["generation"], time.perf_counter() - self._gc_started)
            )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_INTERVAL)
            # (uvloop's timers round to the millisecond: a wake-up may come a hair early)
            self.samples.append((time.time(), max(0.0, loop.time() - start - LAG_INTERVAL)))

    def write(self) -> None:
        path = os.environ.get(LAG_FILE_ENV)
        if path:
            Path(path).write_text(json.dumps(
                {"lag": self.samples, "gc": self.gc_pauses, "heartbeats": self.heartbeats}
            ))


@dataclass
class ScaleSample:
    """One worker holding ``steps`` steps in flight."""

    worker: str
    steps: int
    hold_s: float
    acked: int
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    burst_s: float  # first dispatch -> last ACK
    idle_rss_mb: float
    held_rss_mb: float
    rss_kb_per_step: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    gc_max_pause_ms: float
    gc_full_collections: int
    heartbeat_max_gap_s: float
    heartbeat_sent_max_gap_s: float  # as the worker sent them (connect_worker only)
    heartbeat_max_gap_at_s: float  # when that gap ended, seconds after the burst began
    extensions: int
    extension_max_gap_s: float  # largest gap between renewals of one step's lease
    leases_lapsed: int  # gaps longer than the lease
    hold_cpu_ms: float
    cpu_us_per_extension: float
    cpu_ms_per_step: float  # all worker CPU from the burst to the last run's end, / steps
    completed: int
    failed: int
    exit_code: int | None
    note: str = ""


async def _poll(predicate: Any, bound: float, every: float = 0.25) -> bool:
    """Poll ``predicate`` until true or ``bound`` seconds passed. Polling, not the
    devserver's wait_for: that re-evaluates on every state change, and a predicate over
    10,000 dispatches evaluated 10,000 times is quadratic."""
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)
    return True


def _extension_cpu(samples: list[tuple[float, float]],
                   extensions: list[float]) -> tuple[float, int]:
    """CPU seconds the extension rounds cost above the worker's idle rate, and how many
    extensions they sent. ``samples``: (time, process CPU) every 0.25 s while holding;
    ``extensions``: when the gateway received each one. A round's span is its first to
    last receipt, widened by 0.5 s each side (the worker's sends come first)."""
    if len(samples) < 3 or not extensions:
        return 0.0, 0
    rounds: list[list[float]] = []
    for ts in sorted(extensions):
        if rounds and ts - rounds[-1][-1] < 1.0:
            rounds[-1].append(ts)
        else:
            rounds.append([ts])
    spans = [(r[0] - 0.5, r[-1] + 0.5) for r in rounds]

    def in_round(a: float, b: float) -> bool:
        return any(a < end and b > start for start, end in spans)

    busy = idle = idle_time = 0.0
    for (a, cpu_a), (b, cpu_b) in itertools.pairwise(samples):
        if in_round(a, b):
            busy += cpu_b - cpu_a
        else:
            idle += cpu_b - cpu_a
            idle_time += b - a
    busy_time = samples[-1][0] - samples[0][0] - idle_time
    rate = idle / idle_time if idle_time else 0.0
    return max(0.0, busy - rate * busy_time), len(extensions)


async def _quiet(pid: int, bound: float) -> None:
    """Wait (at most ``bound`` s) until the process uses under 5% of a CPU for 0.5 s."""
    deadline = time.monotonic() + bound
    last = proc_cpu_seconds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = proc_cpu_seconds(pid)
        if now - last < 0.025:
            return
        last = now


def _max_gap(times: Sequence[float]) -> float:
    ordered = sorted(times)
    return max((b - a for a, b in itertools.pairwise(ordered)), default=0.0)


def _max_gap_end(times: Sequence[float]) -> float:
    pairs = list(itertools.pairwise(sorted(times)))
    return max(pairs, key=lambda p: p[1] - p[0])[1] if pairs else math.nan


async def measure_scale(kind: str, args: argparse.Namespace, log_dir: Path) -> ScaleSample:
    from ..devserver import DevServer, DevServerConfig, RunStatus
    from ..devserver.state import Dispatch
    from .bench_app import WAIT_EVENT

    n, hold = args.scale, args.hold
    instance_id = f"bench-scale-{kind}"
    cfg = DevServerConfig(interval_format="seconds")  # production timings otherwise
    lag_path = log_dir / f"{instance_id}.lag.json"
    note = ""
    # connect_worker with the lag probe (cw-worker) instead of `connect_worker run`
    command = _worker_command(SCALE_CW if kind == CW else kind, instance_id)
    async with DevServer(cfg) as dev, _worker(
        command, instance_id, dev.api_url, env={LAG_FILE_ENV: str(lag_path)},
    ) as proc:
        pid = proc.pid
        try:
            conn = await proc.wait_ready(dev, args.timeout)
            await asyncio.sleep(args.settle)
            idle_rss = proc_status_kb(pid, "VmRSS")

            first = len(dev.dispatches)
            cpu0, t0 = proc_cpu_seconds(pid), time.time()
            run_ids: list[str] = []
            for _ in range(n):
                run_ids.extend(await dev.send_event(WAIT_EVENT, {"seconds": hold}))
            wanted = set(run_ids)

            def burst() -> list[Dispatch]:
                return [d for d in dev.dispatches[first:] if d.run_id in wanted
                        and d.step_id == "step"]

            def all_acked() -> bool:
                return bool(sum(d.acked_at is not None for d in burst()) >= n)

            # The SDK client may not keep up; whatever it ACKs in the bound is reported.
            if not await _poll(all_acked, min(hold / 2, 120.0)):
                note = "not every dispatch was ACKed within hold/2"
            dispatches = burst()
            acks = [(d.acked_at - d.sent_at) * 1000 for d in dispatches
                    if d.acked_at is not None]
            acked_at = [d.acked_at for d in dispatches if d.acked_at is not None]
            burst_s = (max(acked_at) - t0) if acked_at else math.nan

            # Hold window: from when the worker has started every step (its CPU goes
            # quiet) until shortly before the first steps end.
            await _quiet(pid, hold / 2)
            window_start = time.time()
            window_end = t0 + hold - 2.0
            cpu_samples: list[tuple[float, float]] = []
            while time.time() < window_end:  # CPU every 0.25 s: see _extension_cpu
                cpu_samples.append((time.time(), proc_cpu_seconds(pid)))
                if len(cpu_samples) == 40:
                    held_rss = proc_status_kb(pid, "VmRSS")
                await asyncio.sleep(0.25)
            cpu_samples.append((time.time(), proc_cpu_seconds(pid)))
            if len(cpu_samples) <= 40:
                held_rss = proc_status_kb(pid, "VmRSS")

            def all_done() -> bool:
                return all(dev.runs[r].status.terminal for r in run_ids)

            if not await _poll(all_done, hold + 180.0):
                note = (note + "; " if note else "") + "runs still unfinished at the bound"
            cpu1, t1 = proc_cpu_seconds(pid), time.time()
        finally:
            exit_code = await _stop(proc, args.timeout)

        timeline = list(dev.core.state.timeline)
        requests = {d.request_id: d for d in burst()}
        renewals: dict[str, list[float]] = {
            rid: [d.acked_at] for rid, d in requests.items() if d.acked_at is not None
        }
        heartbeats: list[float] = []
        extensions = 0
        window_extensions: list[float] = []
        for entry in timeline:
            if entry.direction != "in" or entry.conn_id != conn.conn_id:
                continue
            if entry.kind == "WORKER_HEARTBEAT":
                heartbeats.append(entry.ts)
            elif entry.kind == "WORKER_REQUEST_EXTEND_LEASE":
                extensions += 1
                if window_start <= entry.ts <= window_end:
                    window_extensions.append(entry.ts)
                if entry.request_id in renewals:
                    renewals[entry.request_id].append(entry.ts)
        for rid, times in renewals.items():
            replied = requests[rid].replied_at
            times.append(replied if replied is not None else t1)
        gaps = [_max_gap(times) for times in renewals.values()]
        statuses = [dev.runs[r].status for r in run_ids]

    probed = json.loads(lag_path.read_text()) if lag_path.exists() else {}
    probed.setdefault("lag", [])
    probed.setdefault("gc", [])
    lag = [value * 1000 for ts, value in probed["lag"] if t0 <= ts <= t1]
    pauses = [(gen, value * 1000) for ts, gen, value in probed["gc"] if t0 <= ts <= t1]
    hold_cpu = (cpu_samples[-1][1] - cpu_samples[0][1]) * 1000
    extension_cpu_s, extensions_measured = _extension_cpu(cpu_samples, window_extensions)
    if not extensions_measured:
        note = (note + "; " if note else "") + (
            "no extension round after the worker went quiet: CPU per extension not measured")
    return ScaleSample(
        worker=kind, steps=n, hold_s=hold, acked=len(acks),
        ack_p50_ms=percentile(acks, 0.50), ack_p99_ms=percentile(acks, 0.99),
        ack_max_ms=max(acks, default=math.nan), burst_s=burst_s,
        idle_rss_mb=idle_rss / _PAGE_KB, held_rss_mb=held_rss / _PAGE_KB,
        rss_kb_per_step=(held_rss - idle_rss) / n,
        lag_p50_ms=percentile(lag, 0.50), lag_p99_ms=percentile(lag, 0.99),
        lag_max_ms=max(lag, default=math.nan),
        gc_max_pause_ms=max((ms for _, ms in pauses), default=0.0),
        gc_full_collections=sum(gen == 2 for gen, _ in pauses),
        heartbeat_max_gap_s=_max_gap(heartbeats),
        heartbeat_sent_max_gap_s=(_max_gap([ts for ts in probed["heartbeats"] if t0 <= ts <= t1])
                                  if probed.get("heartbeats") else math.nan),
        heartbeat_max_gap_at_s=_max_gap_end(heartbeats) - t0,
        extensions=extensions, extension_max_gap_s=max(gaps, default=math.nan),
        leases_lapsed=sum(g > cfg.lease_duration for g in gaps),
        hold_cpu_ms=hold_cpu,
        cpu_us_per_extension=(extension_cpu_s * 1e6 / extensions_measured
                              if extensions_measured else math.nan),
        cpu_ms_per_step=(cpu1 - cpu0) * 1000 / n,
        completed=sum(st is RunStatus.COMPLETED for st in statuses),
        failed=sum(st.terminal and st is not RunStatus.COMPLETED for st in statuses),
        exit_code=exit_code, note=note,
    )


SCALE_FIELDS: list[tuple[str, str, str]] = [
    ("acked", "dispatches ACKed", "{:.0f}"),
    ("ack_p50_ms", "burst dispatch->ack p50 ms", "{:.0f}"),
    ("ack_p99_ms", "burst dispatch->ack p99 ms", "{:.0f}"),
    ("ack_max_ms", "burst dispatch->ack max ms", "{:.0f}"),
    ("burst_s", "burst: first event -> last ACK s", "{:.2f}"),
    ("rss_kb_per_step", "RSS KB per step in flight", "{:.1f}"),
    ("held_rss_mb", "RSS MB holding them", "{:.0f}"),
    ("lag_p50_ms", "event-loop lag p50 ms", "{:.1f}"),
    ("lag_p99_ms", "event-loop lag p99 ms", "{:.1f}"),
    ("lag_max_ms", "event-loop lag max ms", "{:.0f}"),
    ("gc_max_pause_ms", "longest GC pause ms", "{:.0f}"),
    ("gc_full_collections", "full GC collections", "{:.0f}"),
    ("heartbeat_max_gap_s", "largest heartbeat gap s (gateway)", "{:.1f}"),
    ("heartbeat_max_gap_at_s", "  ending s after the burst began", "{:.0f}"),
    ("heartbeat_sent_max_gap_s", "largest heartbeat gap s (as sent)", "{:.1f}"),
    ("extensions", "lease extensions sent", "{:.0f}"),
    ("extension_max_gap_s", "largest lease renewal gap s", "{:.1f}"),
    ("leases_lapsed", "leases lapsed (gap > 120 s)", "{:.0f}"),
    ("cpu_us_per_extension", "CPU us per extension (bound)", "{:.1f}"),
    ("cpu_ms_per_step", "CPU ms per step (all)", "{:.2f}"),
    ("completed", "runs completed", "{:.0f}"),
    ("failed", "runs failed", "{:.0f}"),
]


def render_scale(args: argparse.Namespace, samples: list[ScaleSample]) -> str:
    width = 36
    lines = [
        f"--scale {args.scale}: one burst of {args.scale} runs, each one step awaiting "
        f"{args.hold:g} s; lease 120 s, extension every 30 s, heartbeat 10 s; "
        f"{os.cpu_count()} CPU(s); Python {sys.version.split()[0]}",
        "",
        f"{'':<{width}}" + "".join(f"{LABELS[s.worker]:>16}" for s in samples),
    ]
    for attr, label, fmt in SCALE_FIELDS:
        lines.append(f"{label:<{width}}" + "".join(
            f"{fmt.format(float(getattr(s, attr))):>16}" for s in samples))
    lines.extend(f"{LABELS[s.worker]}: {s.note}" for s in samples if s.note)
    return "\n".join(lines)


async def scale(args: argparse.Namespace) -> dict[str, Any]:
    samples: list[ScaleSample] = []
    with tempfile.TemporaryDirectory(prefix="connect-worker-bench-") as tmp:
        for kind in args.workers:
            _progress(f"--scale {args.scale}: {LABELS[kind]} ...")
            sample = await measure_scale(kind, args, Path(tmp))
            _progress(f"  ack p99 {sample.ack_p99_ms:.0f} ms, lag p99 "
                      f"{sample.lag_p99_ms:.1f} ms, {sample.rss_kb_per_step:.1f} KB/step, "
                      f"{sample.completed} completed, {sample.failed} failed")
            samples.append(sample)
    return {"scale": [asdict(s) for s in samples]}


# -- --instructions N -------------------------------------------------------------
# CPU time on a shared machine moves with the load; instructions executed do not.
# Each worker runs under valgrind's callgrind (about 50x slower): counters are zeroed
# after the warm-up and dumped after N runs (callgrind_control), and the SDK execution
# is counted the same way (sdk-cost for two values of N; the difference cancels
# start-up). Kernel work (system calls) is not counted.


def _callgrind_total(path_prefix: str) -> int:
    """The instruction total of the newest callgrind dump whose name starts so."""
    dumps = sorted(Path(path_prefix).parent.glob(Path(path_prefix).name + "*"),
                   key=lambda p: p.stat().st_mtime)
    for line in dumps[-1].read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {dumps[-1]}")


async def _callgrind_control(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", *args, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed")


async def instructions_per_run(kind: str, args: argparse.Namespace, tmp: Path,
                               traces_to: str | None = None) -> float:
    from ..devserver import DevServer, DevServerConfig

    n = args.instructions
    instance_id = f"bench-instr-{kind}"
    prefix = str(tmp / f"cg.{kind}")
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}.%p"]
    async with DevServer(DevServerConfig(interval_format="seconds")) as dev, _worker(
        [*valgrind, *_worker_command(kind, instance_id)], instance_id, dev.api_url,
        traces_to=traces_to if kind == TRACED else None,
    ) as proc:
        try:
            await proc.wait_ready(dev, max(args.timeout, 180.0))
            await drive(dev, args.warmup, args.concurrency, 600.0)
            await _callgrind_control("-z", str(proc.pid))
            await drive(dev, n, args.concurrency, 600.0)
            await _callgrind_control("-d", str(proc.pid))
        finally:
            await _stop(proc, 120.0)
    return float(_callgrind_total(f"{prefix}.{proc.pid}.") / n)


async def sdk_instructions_per_run(kind: str, args: argparse.Namespace, tmp: Path) -> float:
    totals = []
    small, large = args.instructions, 2 * args.instructions
    for runs in (small, large):
        prefix = str(tmp / f"cg.sdk-cost.{kind}.{runs}")
        proc = await asyncio.create_subprocess_exec(
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={prefix}",
            sys.executable, "-m", "connect_worker.lab.bench", "sdk-cost", "--runs", str(runs),
            "--as", kind,
            env=_cost_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        if await proc.wait() != 0:
            raise RuntimeError("sdk-cost under callgrind failed")
        totals.append(_callgrind_total(prefix))
    return float((totals[1] - totals[0]) / (large - small))


async def instructions(args: argparse.Namespace) -> dict[str, float]:
    exports: list[int] = []
    with tempfile.TemporaryDirectory(prefix="connect-worker-bench-") as tmp, \
            (_trace_sink(exports) if args.tracing else contextlib.nullcontext("")) as sink:
        result = {}
        kinds = [k for k in WORKERS if k in args.workers]
        if args.tracing:
            kinds.insert(1, TRACED)
        for kind in kinds:
            _progress(f"--instructions {args.instructions}: {LABELS[kind]} under callgrind ...")
            result[kind] = await instructions_per_run(kind, args, Path(tmp), sink or None)
        for kind in WORKERS if SDK in args.workers else ():
            _progress(f"--instructions: SDK execution as {LABELS[kind]} calls it, "
                      "under callgrind ...")
            result[f"sdk_execution_{kind}"] = await sdk_instructions_per_run(
                kind, args, Path(tmp))
    return result


def render_instructions(args: argparse.Namespace, result: dict[str, float]) -> str:
    if SDK not in result:  # --workers connect_worker: only ours (and --tracing's)
        lines = [f"--instructions {args.instructions}: user-space instructions per run under "
                 f"callgrind (C={args.concurrency}, warm-up {args.warmup}); millions",
                 f"  {LABELS[CW]:<30}{result[CW] / 1e6:>10.3f}"]
        if TRACED in result:
            lines.append(f"  {LABELS[TRACED]:<30}{result[TRACED] / 1e6:>10.3f}"
                         f"  ({ratio(result[TRACED], result[CW]) - 1:+.1%})")
        return "\n".join(lines)
    cw, client = result[CW], result[SDK]
    cw_sdk, client_sdk = result[f"sdk_execution_{CW}"], result[f"sdk_execution_{SDK}"]
    rows = [
        ("instructions per run (total)", cw, client),
        ("  SDK execution, as it calls it", cw_sdk, client_sdk),
        ("  worker's own overhead", cw - cw_sdk, client - client_sdk),
    ]
    width = 32
    lines = [
        f"--instructions {args.instructions}: user-space instructions per run under "
        f"callgrind (C={args.concurrency}, warm-up {args.warmup}); millions",
        "",
        f"{'':<{width}}{LABELS[CW]:>16}{LABELS[SDK]:>14}{'ratio':>9}",
    ]
    for label, a, b in rows:
        r = "" if label.strip().startswith("SDK") else f"{ratio(a, b):.2f}"
        lines.append(f"{label:<{width}}{a / 1e6:>16.3f}{b / 1e6:>14.3f}{r:>9}".rstrip())
    if TRACED in result:
        traced = result[TRACED]
        lines.append(f"{'  with tracing on (--tracing)':<{width}}{traced / 1e6:>16.3f}"
                     f"{'':>14}{ratio(traced, cw) - 1:>+9.1%}")
    return "\n".join(lines)


# -- internal modes --------------------------------------------------------------


async def run_sdk_worker(instance_id: str) -> None:
    """The official SDK's own Connect client serving ``bench_app``."""
    from inngest.connect import connect

    from . import bench_app

    logging.basicConfig(level=logging.WARNING)
    probe = LagProbe()
    probe_task = asyncio.create_task(probe.run())
    # Through the lab's proxy when one is set (--server), as connect_worker is.
    gateway = os.environ.get("INNGEST_CONNECT_GATEWAY_URL")
    conn = connect([(bench_app.client, list(bench_app.functions))], instance_id=instance_id,
                   rewrite_gateway_endpoint=(lambda _url: gateway) if gateway else None)
    try:
        await conn.start()
    finally:
        probe_task.cancel()
        probe.write()


def run_cw_worker(inline: bool = False) -> int:
    """``connect_worker run connect_worker.lab.bench_app`` plus the lag probe, through the
    engine's public API only: ``serve`` (with ``InlineUserLoop`` for ``--inline``: the
    ``--bridge-cost`` experiment) and, for ``--scale``, the ``heartbeat.sent`` log event."""
    import anyio

    from ..config import Config
    from ..engine.runner import serve
    from ..engine.target import load_target
    from ..engine.userloop import InlineUserLoop, loop_factory

    config = Config.from_env(os.environ)
    apps = load_target("connect_worker.lab.bench_app")
    probe = LagProbe()
    if os.environ.get(LAG_FILE_ENV):
        probe.watch_heartbeats()

    async def main() -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(probe.run)
            code = await serve(config, apps, user_loop=InlineUserLoop() if inline else None)
            tg.cancel_scope.cancel()
        return code

    try:
        return anyio.run(main, backend_options={"loop_factory": loop_factory(config.event_loop)})
    finally:
        probe.write()


def _payload(run_id: str, steps: dict[str, Any], stack: list[str]) -> bytes:
    """A request body shaped like the devserver's (executor.Executor._payload)."""
    event = {"name": "bench/noop", "data": {"i": 0}, "id": "01BENCH", "ts": 0, "user": {}}
    return json.dumps({
        "event": event,
        "events": [event],
        "steps": steps,
        "defers": {},
        "ctx": {
            "fn_id": "00000000-0000-0000-0000-000000000000",
            "run_id": run_id,
            "env": "dev",
            "step_id": "step",
            "attempt": 0,
            "max_attempts": 1,
            "stack": {"stack": stack, "current": len(stack)},
            "qi_id": "01BENCHJOB",
            "request_id": "01BENCHREQ",
            "generation_id": 0,
            "job_id": "01BENCHJOB",
            "disable_immediate_execution": False,
            "use_api": False,
        },
        "version": -1,
        "use_api": False,
    }).encode()


async def sdk_cost(runs: int, warmup: int = 50, kind: str = SDK) -> float:
    """CPU ms per run of the SDK executing the bench function: its two requests,
    straight through ``CommHandler.post`` (no transport, no protobuf), with the request
    timings ``kind`` passes (see the module docstring)."""
    from inngest._internal import comm_lib, const, net, server_lib

    from ..engine.executor import NO_TIMINGS
    from . import bench_app

    def timings() -> net.ServerTimings:
        return NO_TIMINGS if kind == CW else net.ServerTimings()

    handler = comm_lib.CommHandler(
        client=bench_app.client,
        enable_unauthed_sync=None,
        framework=server_lib.Framework.CONNECT,
        functions=list(bench_app.functions),
        streaming=const.Streaming.DISABLE,
    )

    def request(body: bytes) -> comm_lib.CommRequest:
        return comm_lib.CommRequest(
            body=body,
            headers={server_lib.HeaderKey.REQUEST_ID.value: "01BENCHREQ",
                     server_lib.HeaderKey.JOB_ID.value: "01BENCHJOB"},
            is_connect=True,
            public_path=None,
            query_params={
                server_lib.QueryParamKey.FUNCTION_ID.value: bench_app.FUNCTION_SLUG,
                server_lib.QueryParamKey.STEP_ID.value: "step",
            },
            raw_request=None,
            request_url="",
            serve_origin=None,
            serve_path=None,
            timings=timings(),
        )

    first = _payload("01BENCHRUN", {}, [])
    response = await handler.post(request(first))
    body = response.body_bytes()
    if response.status_code != 206 or isinstance(body, Exception):
        raise RuntimeError(f"unexpected first response {response.status_code}: {body!r}")
    op = json.loads(body)[0]
    second = _payload("01BENCHRUN", {op["id"]: {"data": op.get("data")}}, [op["id"]])

    async def one_run() -> None:
        r1 = await handler.post(request(first))
        r1.body_bytes()
        r2 = await handler.post(request(second))
        r2.body_bytes()
        if r1.status_code != 206 or r2.status_code != 200:
            raise RuntimeError(f"unexpected statuses {r1.status_code}, {r2.status_code}")

    for _ in range(warmup):
        await one_run()
    c0 = time.process_time()
    for _ in range(runs):
        await one_run()
    return (time.process_time() - c0) * 1000 / runs


# -- CLI -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="connect_worker vs the official SDK's Connect client through the local "
        "devserver: throughput, CPU per run, dispatch latencies, RSS, idle cost; medians and "
        "ratios (connect_worker / SDK client).",
    )
    parser.add_argument("-n", "--runs", type=int, default=500, help="measured runs per round")
    parser.add_argument("-c", "--concurrency", type=int, default=20, help="runs in flight")
    parser.add_argument("-r", "--rounds", type=int, default=3,
                        help="rounds (each measures both workers, alternating who goes first)")
    parser.add_argument("--warmup", type=int, default=50, help="uncounted runs before measuring")
    parser.add_argument("--idle", type=float, default=5.0,
                        help="seconds of idle measurement per worker per round")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after READY before the idle window")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="bound on each wait (connect, a run, shutdown)")
    parser.add_argument("--json", metavar="PATH", help="also write all samples as JSON here")
    parser.add_argument("--server", metavar="URL",
                        help="measure against a running Inngest dev server (`inngest dev`) "
                        "at URL instead of our dev gateway (the default mode only)")
    parser.add_argument("--scale", type=int, metavar="N", default=0,
                        help="instead: hold N steps in flight per worker (see the docstring)")
    parser.add_argument("--hold", type=float, default=60.0,
                        help="with --scale: seconds each step waits")
    parser.add_argument("--workers", nargs="+", choices=WORKERS, default=list(WORKERS),
                        help="with --scale or --instructions: which workers to measure "
                             "(default both)")
    parser.add_argument("--confirm-before-run", action="store_true",
                        help="also measure connect_worker with "
                        "CONNECT_WORKER_CONFIRM_BEFORE_RUN=1, next to it in each round")
    parser.add_argument("--bridge-cost", action="store_true",
                        help="also measure connect_worker without its user-code thread "
                             "(an experiment: what the thread costs per run)")
    parser.add_argument("--tracing", action="store_true",
                        help="also measure connect_worker with OpenTelemetry tracing on "
                             "(exporting to a local sink): what tracing costs per run")
    parser.add_argument("--instructions", type=int, metavar="N", default=0,
                        help="instead: instructions per run under valgrind's callgrind, "
                        "N runs per worker (load-independent; about 50x slower)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sdk-worker"]:
        sub = argparse.ArgumentParser(prog="bench sdk-worker")
        sub.add_argument("--instance-id", required=True)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_sdk_worker(sub.parse_args(argv[1:]).instance_id))
        return 0
    if argv[:1] == ["cw-worker"]:
        return run_cw_worker(inline="--inline" in argv[1:])
    if argv[:1] == ["sdk-cost"]:
        sub = argparse.ArgumentParser(prog="bench sdk-cost")
        sub.add_argument("--runs", type=int, default=500)
        sub.add_argument("--as", dest="kind", choices=WORKERS, default=SDK)
        parsed = sub.parse_args(argv[1:])
        ms = asyncio.run(sdk_cost(parsed.runs, kind=parsed.kind))
        sys.stdout.write(json.dumps({"ms_per_run": ms}) + "\n")
        return 0
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.concurrency < 1 or args.rounds < 1 or args.warmup < 0:
        sys.stderr.write("scripts/bench: --runs, --concurrency, --rounds must be >= 1\n")
        return 2
    if not Path("/proc/self/stat").exists():
        sys.stderr.write("scripts/bench: needs Linux /proc\n")
        return 2
    if args.server and (args.scale or args.instructions or args.bridge_cost):
        sys.stderr.write("scripts/bench: --server measures the default mode only (not "
                         "--scale, --instructions or --bridge-cost)\n")
        return 2
    if args.instructions:
        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            sys.stderr.write("scripts/bench: --instructions needs valgrind "
                             "(Debian: apt-get install valgrind)\n")
            return 2
        if CW not in args.workers:
            sys.stderr.write("scripts/bench: --instructions measures connect_worker\n")
            return 2
        counted = asyncio.run(instructions(args))
        sys.stdout.write(render_instructions(args, counted) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(counted, indent=2) + "\n")
        return 0
    if args.scale:
        if args.hold < 1:
            sys.stderr.write("scripts/bench: --hold must be >= 1 s\n")
            return 2
        scaled = asyncio.run(scale(args))
        samples = [ScaleSample(**s) for s in scaled["scale"]]
        sys.stdout.write(render_scale(args, samples) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(scaled, indent=2) + "\n")
        return 0
    result = asyncio.run(bench(args))
    cw = Summary(**result["summary"][CW])
    sdk = Summary(**result["summary"][SDK])
    sys.stdout.write(render(args, cw, sdk, result["cpus"], result["paired_ratios"]) + "\n")
    if INLINE in result["summary"]:
        inline = Summary(**result["summary"][INLINE])
        sys.stdout.write(render_bridge_cost(cw, sdk, inline) + "\n")
    if TRACED in result["summary"]:
        traced = Summary(**result["summary"][TRACED])
        sys.stdout.write(render_tracing([Sample(**s) for s in result["samples"]], cw, traced)
                         + "\n")
    if CONFIRMED in result["summary"]:
        confirmed = Summary(**result["summary"][CONFIRMED])
        sys.stdout.write(render_confirm([Sample(**s) for s in result["samples"]], cw,
                                        confirmed) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
