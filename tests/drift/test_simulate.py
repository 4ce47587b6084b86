"""The deploy rehearsal with a code change: v1 -> a v2 that renames an LLM step, real
worker processes, the simulated model. Under fail nothing is paid twice, every run the
change broke failed with the drift message, and compat said so before the deploy."""

from __future__ import annotations

import re
from pathlib import Path

from connect_worker.lab.simulate import SimulationSettings, run_simulation


async def test_rename_under_fail_pays_nothing_twice(tmp_path: Path) -> None:
    settings = SimulationSettings(replicas=2, deploys=1, reports_in_flight=6,
                                  step_seconds=0.3, deploy_interval=3.0,
                                  change="rename-llm-step", on_drift="fail", seed=3)
    result = await run_simulation(settings, workdir=tmp_path)
    change = result.change
    assert change is not None
    assert change.compat_exit == 1, change.compat_summary  # v1's histories break on v2
    assert change.paid_twice == 0 and change.model_requests == result.step_executions
    assert change.drift_failed_runs == result.reports_failed == change.drifted_runs
    # Steps hop both ways during a roll: v2 meets v1's `write` memo, or a v1 replica still
    # up meets v2's `write-draft` memo (which v1 can name only by its hash).
    if change.drifted_runs:
        assert re.search(r"step '(write|write-draft)' has no memo", change.drift_message)
    assert result.ok, result.table()
