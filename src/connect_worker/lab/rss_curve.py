"""The worker's RSS over a long stream of no-op runs: a bounded cache from a leak.

One ``connect_worker run connect_worker.lab.bench_app`` subprocess against the dev
gateway in this process, the bench's ``noop`` function (two requests per run), ``C``
runs in flight; ``VmRSS`` of the worker is sampled after the warm-up and every
``--every`` runs. The figure is the slope after the first ``--every`` runs (MB per 10k
runs, least squares): the delivered-reply memory (``Ledger``, 1024 replies) fills in the
first few hundred runs, so anything that still grows after that is not that cache.

``--tracemalloc`` runs the worker as ``python -m connect_worker.lab.rss_curve cw-worker``
with tracemalloc on, and prints the 15 largest growths between the snapshot after the
first sample and the one at the end (grouped by line): where the growth is.

    python -m connect_worker.lab.rss_curve --runs 200000 --every 10000 --concurrency 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from .bench import _stop, _worker, drive, proc_status_kb

_SNAPSHOT_ENV = "CONNECT_WORKER_RSS_CURVE_SNAPSHOTS"


def slope_mb_per_10k(points: Sequence[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) over runs, per 10,000 runs."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return sxy / sxx * 10_000


async def curve(args: argparse.Namespace) -> dict[str, object]:
    from ..devserver import DevServer, DevServerConfig

    instance_id = "rss-curve"
    command = [sys.executable, "-m", "connect_worker", "run", "connect_worker.lab.bench_app"]
    snapshots = Path(tempfile.mkdtemp(prefix="rss-curve-"))
    if args.tracemalloc:
        command = [sys.executable, "-m", "connect_worker.lab.rss_curve", "cw-worker"]
    points: list[tuple[int, float]] = []
    async with DevServer(DevServerConfig(interval_format="seconds")) as dev, _worker(
        command, instance_id, dev.api_url, env={_SNAPSHOT_ENV: str(snapshots)},
    ) as proc:
        try:
            await proc.wait_ready(dev, args.timeout)
            await drive(dev, args.warmup, args.concurrency, args.timeout)
            done = 0
            t0 = time.monotonic()
            points.append((0, proc_status_kb(proc.pid, "VmRSS") / 1024))
            _progress(f"after {args.warmup} warm-up runs: {points[-1][1]:.2f} MB")
            while done < args.runs:
                chunk = min(args.every, args.runs - done)
                await drive(dev, chunk, args.concurrency, args.timeout)
                done += chunk
                points.append((done, proc_status_kb(proc.pid, "VmRSS") / 1024))
                if args.tracemalloc and done in (args.every, args.runs):
                    proc.send_signal(signal.SIGUSR1)
                    await asyncio.sleep(2.0)  # the snapshot is written by the worker
                _progress(f"{done} runs: {points[-1][1]:.2f} MB "
                          f"({done / (time.monotonic() - t0):.0f} runs/s)")
        finally:
            await _stop(proc, args.timeout)
    after = [p for p in points if p[0] >= args.every]
    result: dict[str, object] = {
        "runs": args.runs, "every": args.every, "concurrency": args.concurrency,
        "warmup": args.warmup, "points": points,
        "slope_mb_per_10k_after_first": slope_mb_per_10k(after),
        "growth_mb_after_first": after[-1][1] - after[0][1] if after else float("nan"),
    }
    if args.tracemalloc:
        result["top_growth"] = _diff(snapshots)
    return result


def _diff(directory: Path) -> list[str]:
    import tracemalloc

    files = sorted(directory.glob("snap-*.tracemalloc"), key=lambda p: int(p.stem[5:]))
    if len(files) < 2:
        return [f"fewer than two snapshots in {directory}"]
    first = tracemalloc.Snapshot.load(str(files[0]))
    last = tracemalloc.Snapshot.load(str(files[-1]))
    return [str(stat) for stat in last.compare_to(first, "lineno")[:15]]


def run_cw_worker() -> int:
    """``connect_worker run connect_worker.lab.bench_app`` with tracemalloc on; each
    SIGUSR1 writes a snapshot into the directory named by the environment."""
    import tracemalloc

    tracemalloc.start(1)
    directory = Path(os.environ[_SNAPSHOT_ENV])
    taken = [0]

    def snapshot(_sig: int, _frame: object) -> None:
        taken[0] += 1
        tracemalloc.take_snapshot().dump(str(directory / f"snap-{taken[0]}.tracemalloc"))

    signal.signal(signal.SIGUSR1, snapshot)
    from ..cli import main as cli_main

    return cli_main(["run", "connect_worker.lab.bench_app"])


def _progress(text: str) -> None:
    sys.stderr.write(f"[rss-curve] {text}\n")
    sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cw-worker"]:
        return run_cw_worker()
    parser = argparse.ArgumentParser(
        prog="rss-curve", description="The worker's RSS every N no-op runs (Linux /proc).")
    parser.add_argument("--runs", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=10_000)
    parser.add_argument("-c", "--concurrency", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--tracemalloc", action="store_true",
                        help="run the worker with tracemalloc and print the top growths")
    parser.add_argument("--json", help="also write the curve as JSON here")
    args = parser.parse_args(argv)
    result = asyncio.run(curve(args))
    points = cast("list[tuple[int, float]]", result["points"])
    lines = ["runs    RSS MB"] + [f"{x:>7} {y:8.2f}" for x, y in points]
    lines.append(f"slope after the first {args.every} runs: "
                 f"{result['slope_mb_per_10k_after_first']:.3f} MB per 10k runs "
                 f"(growth {result['growth_mb_after_first']:.2f} MB)")
    lines.extend(f"  {line}" for line in cast("list[str]", result.get("top_growth", [])))
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
