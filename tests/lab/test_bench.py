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
         "--timeout", "30", "--bridge-cost", "--tracing", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=90, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    table = result.stdout
    for label in ("connect_worker", "SDK client", "runs/s", "worker CPU ms/run",
                  "worker's own overhead", "dispatch->reply p99 ms", "peak RSS MB",
                  "idle CPU ms/s", "targets"):
        assert label in table, table

    assert "the user-code thread's cost" in table, table
    assert "tracing on" in table, table

    report = json.loads(out.read_text())
    assert {s["worker"] for s in report["samples"]} == {
        "connect_worker", "sdk_client", "connect_worker_inline", "connect_worker_traced"}
    # The experiment without the user-code thread served every run too, and so did the
    # traced worker, whose spans reached the sink.
    assert report["summary"]["connect_worker_inline"]["failed_runs"] == 0
    assert report["summary"]["connect_worker_traced"]["failed_runs"] == 0
    assert report["trace_exports"] > 0
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


def test_bench_scale_reports_a_held_burst(tmp_path: Path) -> None:
    """--scale with a few steps held a few seconds: every figure present, nothing lost."""
    out = tmp_path / "scale.json"
    result = subprocess.run(
        [sys.executable, "-m", "connect_worker.lab.bench", "--scale", "30", "--hold", "3",
         "--workers", "connect_worker", "--settle", "0.2", "--timeout", "30",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for label in ("burst dispatch->ack p99 ms", "RSS KB per step in flight",
                  "event-loop lag p99 ms", "largest lease renewal gap s",
                  "CPU us per extension"):
        assert label in result.stdout, result.stdout
    [sample] = json.loads(out.read_text())["scale"]
    assert sample["worker"] == "connect_worker"
    assert sample["acked"] == sample["completed"] == 30
    assert sample["failed"] == 0 and sample["leases_lapsed"] == 0
    assert sample["exit_code"] == 0
    for key in ("ack_p99_ms", "lag_p99_ms", "held_rss_mb", "extension_max_gap_s"):
        assert math.isfinite(sample[key]) and sample[key] >= 0, (key, sample[key])
