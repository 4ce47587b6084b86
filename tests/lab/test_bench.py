"""Smoke test of scripts/bench: a tiny run measures both workers and reports sane values.

No timing assertions: only that every figure is present, finite and positive."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POSITIVE = (
    "runs_per_s", "cpu_ms_per_run", "sdk_ms_per_run", "ack_p50_ms", "ack_p99_ms",
    "reply_p50_ms", "reply_p99_ms", "peak_rss_mb", "idle_rss_mb", "devserver_cpu_ms_per_run",
)


def test_bench_reports_both_workers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "connect_worker.lab.bench", "--runs", "20", "--concurrency", "4",
         "--rounds", "1", "--warmup", "2", "--idle", "0.3", "--settle", "0.2",
         "--timeout", "30", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=90, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout
    for label in ("connect_worker", "SDK client", "runs/s", "worker CPU ms/run",
                  "worker's own overhead", "dispatch->reply p99 ms", "peak RSS MB",
                  "idle CPU ms/s", "targets"):
        assert label in table, table

    report = json.loads(out.read_text())
    assert {s["worker"] for s in report["samples"]} == {"connect_worker", "sdk_client"}
    for worker in ("connect_worker", "sdk_client"):
        summary = report["summary"][worker]
        for key in POSITIVE:
            value = summary[key]
            assert math.isfinite(value) and value > 0, (worker, key, value)
        assert summary["idle_cpu_ms_per_s"] >= 0
        assert summary["failed_runs"] == 0
        assert summary["reply_p99_ms"] >= summary["reply_p50_ms"] > 0
    for sample in report["samples"]:
        assert sample["redispatches"] == 0, sample
        assert sample["exit_code"] == 0, sample
    ratios = {k: v for k, v in report["ratios"].items() if k != "idle_cpu_ms_per_s"}
    assert all(math.isfinite(r) and r > 0 for r in ratios.values()), report["ratios"]
