"""scripts/rss-curve: the slope it reports, and a short curve from a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from connect_worker.lab.rss_curve import slope_mb_per_10k


def test_slope_is_mb_per_10k_runs() -> None:
    assert slope_mb_per_10k([(10_000, 60.0), (20_000, 60.0), (30_000, 60.0)]) == 0.0
    assert slope_mb_per_10k([(10_000, 60.0), (20_000, 60.5), (30_000, 61.0)]) == \
        pytest.approx(0.5)
    assert slope_mb_per_10k([(0, 1.0), (50_000, 2.0)]) == pytest.approx(0.2)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_short_curve_samples_the_worker(tmp_path: Path) -> None:
    out = tmp_path / "curve.json"
    subprocess.run(
        [sys.executable, "-m", "connect_worker.lab.rss_curve", "--runs", "300", "--every",
         "100", "--warmup", "50", "--json", str(out)],
        check=True, timeout=120, capture_output=True,
    )
    result = json.loads(out.read_text())
    assert [runs for runs, _ in result["points"]] == [0, 100, 200, 300]
    assert all(20 < mb < 500 for _, mb in result["points"])
