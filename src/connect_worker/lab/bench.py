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
  CPU ms per run. Both workers pay it; ``own overhead`` = worker CPU - this;
- dispatch->ack / dispatch->reply p50 and p99: from the devserver's
  ``Dispatch.sent_at``/``acked_at``/``replied_at`` (every request of the
  measured runs);
- peak RSS: ``VmHWM`` at the end of the round; idle CPU and RSS: the worker
  connected and READY with no work for ``--idle`` seconds (before any load),
  CPU from the per-thread ``schedstat`` (ns) and ``VmRSS`` at the end;
- devserver CPU ms per run: this process (devserver + driver) over the
  measured runs, for context: on a small machine it is the bottleneck.

Internal modes (used by the bench itself): ``sdk-worker`` runs the official
client, ``sdk-cost`` measures the SDK execution cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..devserver import DevServer

CW = "connect_worker"
SDK = "sdk_client"
WORKERS = (CW, SDK)
LABELS = {CW: "connect_worker", SDK: "SDK client"}
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
    ("sdk_ms_per_run", "  SDK execution, shared", "{:.3f}"),
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
        (f"own overhead ratio {ratio(cw.overhead_ms_per_run, sdk.overhead_ms_per_run):.2f}"
         " <= 0.33", cw.overhead_ms_per_run <= sdk.overhead_ms_per_run / 3),
        (f"total CPU ratio {ratio(cw.cpu_ms_per_run, sdk.cpu_ms_per_run):.2f} <= 0.70",
         cw.cpu_ms_per_run <= 0.7 * sdk.cpu_ms_per_run),
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


def render(args: argparse.Namespace, cw: Summary, sdk: Summary, ncpu: int,
           paired: dict[str, list[float]]) -> str:
    head = (
        f"N={args.runs} runs x {REQUESTS_PER_RUN} requests (1 no-op step), C={args.concurrency},"
        f" {args.rounds} round(s), warm-up {args.warmup}, idle {args.idle:g}s;"
        f" medians; {ncpu} CPU(s); Python {sys.version.split()[0]}"
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
        while len(inflight) < concurrency and len(started) < n:
            ids = await dev.send_event(EVENT, {"i": len(started)})
            if len(ids) != 1:
                raise RuntimeError(f"event started {len(ids)} runs (is the worker synced?)")
            started.append(ids[0])
            inflight.add(ids[0])
        await dev.wait_for(any_done, bound)
        inflight.difference_update([r for r in inflight if runs[r].status.terminal])
    return started


def _worker_command(kind: str, instance_id: str) -> list[str]:
    if kind == CW:
        return [sys.executable, "-m", "connect_worker", "run", "connect_worker.lab.bench_app"]
    return [sys.executable, "-m", "connect_worker.lab.bench", "sdk-worker",
            "--instance-id", instance_id]


def _worker_env(api_url: str, instance_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INNGEST_", "CONNECT_WORKER_", "RAILWAY_"))}
    env.update({
        "INNGEST_DEV": "1",
        "INNGEST_API_BASE_URL": api_url,
        "CONNECT_WORKER_HTTP_PORT": "off",
        "CONNECT_WORKER_INSTANCE_ID": instance_id,
        "CONNECT_WORKER_LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
    })
    return env


async def _stop(proc: asyncio.subprocess.Process, grace: float) -> int | None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # our own child only
            await proc.wait()
            return None
    return proc.returncode


async def measure(kind: str, round_no: int, args: argparse.Namespace,
                  log_dir: Path) -> Sample:
    from ..devserver import DevServer, DevServerConfig, RunStatus

    instance_id = f"bench-{kind}-{round_no}"
    cfg = DevServerConfig(interval_format="seconds")
    log_path = log_dir / f"{instance_id}.log"
    async with DevServer(cfg) as dev:
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                *_worker_command(kind, instance_id), env=_worker_env(dev.api_url, instance_id),
                stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            )
        pid = proc.pid
        exit_code: int | None = None
        try:
            try:
                await dev.wait_for_connection(lambda c: c.instance_id == instance_id,
                                              timeout=args.timeout)
            except TimeoutError:
                raise RuntimeError(
                    f"{kind} did not connect; its output:\n{log_path.read_text()[-4000:]}"
                ) from None
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


async def sdk_cost_subprocess(runs: int, bound: float) -> float:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connect_worker.lab.bench", "sdk-cost", "--runs", str(runs),
        env=_worker_env("http://127.0.0.1:9", "bench-sdk-cost"),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), bound)
    if proc.returncode != 0:
        raise RuntimeError(f"sdk-cost failed ({proc.returncode}): {err.decode()[-4000:]}")
    return float(json.loads(out)["ms_per_run"])


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    samples: list[Sample] = []
    sdk_costs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="connect-worker-bench-") as tmp:
        for round_no in range(1, args.rounds + 1):
            order = WORKERS if round_no % 2 else WORKERS[::-1]
            for kind in order:
                sample = await measure(kind, round_no, args, Path(tmp))
                samples.append(sample)
                _progress(
                    f"round {round_no}/{args.rounds} {LABELS[kind]:>14}: "
                    f"{sample.runs_per_s:.0f} runs/s, {sample.cpu_ms_per_run:.3f} CPU ms/run, "
                    f"reply p50 {sample.reply_p50_ms:.2f} ms p99 {sample.reply_p99_ms:.2f} ms, "
                    f"failed {sample.failed_runs}, exit {sample.exit_code}"
                )
            sdk_costs.append(await sdk_cost_subprocess(args.runs, args.timeout))
            _progress(f"round {round_no}/{args.rounds} SDK execution: "
                      f"{sdk_costs[-1]:.3f} CPU ms/run")
    cw = summarize(CW, samples, sdk_costs)
    sdk = summarize(SDK, samples, sdk_costs)
    return {
        "config": {k: getattr(args, k) for k in
                   ("runs", "concurrency", "rounds", "warmup", "idle")},
        "cpus": os.cpu_count() or 0,
        "samples": [asdict(s) for s in samples],
        "sdk_costs_ms_per_run": sdk_costs,
        "summary": {CW: asdict(cw), SDK: asdict(sdk)},
        "ratios": {attr: ratio(float(getattr(cw, attr)), float(getattr(sdk, attr)))
                   for attr, _, _ in FIELDS if attr not in ("sdk_ms_per_run", "failed_runs")},
        "targets": dict(targets(cw, sdk)),
        "paired_ratios": {attr: paired_ratios(samples, attr) for attr in PAIRED},
    }


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# -- internal modes --------------------------------------------------------------


async def run_sdk_worker(instance_id: str) -> None:
    """The official SDK's own Connect client serving ``bench_app``."""
    import logging

    from inngest.connect import connect

    from . import bench_app

    logging.basicConfig(level=logging.WARNING)
    conn = connect([(bench_app.client, list(bench_app.functions))], instance_id=instance_id)
    await conn.start()


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


async def sdk_cost(runs: int, warmup: int = 50) -> float:
    """CPU ms per run of the SDK executing the bench function: its two requests,
    straight through ``CommHandler.post`` (no transport, no protobuf)."""
    from inngest._internal import comm_lib, const, server_lib

    from . import bench_app

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sdk-worker"]:
        sub = argparse.ArgumentParser(prog="bench sdk-worker")
        sub.add_argument("--instance-id", required=True)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_sdk_worker(sub.parse_args(argv[1:]).instance_id))
        return 0
    if argv[:1] == ["sdk-cost"]:
        sub = argparse.ArgumentParser(prog="bench sdk-cost")
        sub.add_argument("--runs", type=int, default=500)
        ms = asyncio.run(sdk_cost(sub.parse_args(argv[1:]).runs))
        sys.stdout.write(json.dumps({"ms_per_run": ms}) + "\n")
        return 0
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.concurrency < 1 or args.rounds < 1 or args.warmup < 0:
        sys.stderr.write("scripts/bench: --runs, --concurrency, --rounds must be >= 1\n")
        return 2
    if not Path("/proc/self/stat").exists():
        sys.stderr.write("scripts/bench: needs Linux /proc\n")
        return 2
    result = asyncio.run(bench(args))
    cw = Summary(**result["summary"][CW])
    sdk = Summary(**result["summary"][SDK])
    sys.stdout.write(render(args, cw, sdk, result["cpus"], result["paired_ratios"]) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
