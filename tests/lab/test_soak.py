"""``connect-worker soak``: the fault schedule is a function of the seed, and a short
seeded soak with every fault kind keeps the promise (every run completed, every
duplicate execution explained, no reply lost, every SIGTERMed replica drained)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path

import pytest

from connect_worker import cli
from connect_worker.devserver import DevServer, DevServerConfig
from connect_worker.devserver.fleet import WorkerProcess
from connect_worker.lab import soak
from connect_worker.lab.soak import KIND_NAMES, plan_faults

MINUTES = 0.75
SEED = 7
INTERVAL = (1.5, 3.0)


def test_schedule_depends_on_the_seed_alone() -> None:
    plan = plan_faults(SEED, 600, KIND_NAMES)
    assert plan == plan_faults(SEED, 600, KIND_NAMES)
    assert plan != plan_faults(SEED + 1, 600, KIND_NAMES)
    # A short soak still tries every kind: the first round is each kind once.
    assert sorted(f.kind for f in plan[:len(KIND_NAMES)]) == sorted(KIND_NAMES)
    gaps = [b.at - a.at for a, b in pairwise(plan)]
    assert all(1.5 - 1e-3 <= g <= 4.0 + 1e-3 for g in gaps)
    for fault in plan:
        assert fault.on_draining is False or fault.kind in ("gateway-closing", "drop")
        assert (fault.seconds > 0) == (fault.kind in soak.DURATIONS)
        assert (fault.delay > 0) == (fault.kind in soak.DELAYS)
    # A shorter soak is a prefix of a longer one; a kind switched off never appears.
    assert plan_faults(SEED, 60, KIND_NAMES) == [f for f in plan if f.at < 60]
    without = plan_faults(SEED, 600, tuple(k for k in KIND_NAMES if k != "crash"))
    assert without and all(f.kind != "crash" for f in without)


def test_cli_prints_the_plan_and_rejects_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["soak", "--plan", "--minutes", "1", "--seed", "3", "--no-slow-acks"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = tuple(k for k in KIND_NAMES if k != "slow-acks")
    assert lines == [asdict(f) for f in plan_faults(3, 60, kinds)]
    with pytest.raises(SystemExit):
        cli.main(["soak", "--step-seconds", "3-1"])
    assert "LOW <= HIGH" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_short_soak_keeps_the_promise(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "soak.json"
    code = cli.main(["soak", "--minutes", str(MINUTES), "--seed", str(SEED),
                     "--fault-interval", f"{INTERVAL[0]}-{INTERVAL[1]}", "--json", str(out)])
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0, table
    assert report["ok"] and report["failures"] == []
    # The faults applied are exactly the seed's plan, and every kind was among them.
    planned = [asdict(f) for f in plan_faults(SEED, MINUTES * 60, KIND_NAMES, INTERVAL)]
    applied = [{k: f[k] for k in planned[0]} for f in report["faults"]]
    assert applied == planned
    assert set(report["faults_by_kind"]) == set(KIND_NAMES)
    # Invariants, counted.
    runs = report["runs"]
    assert runs["started"] == runs["completed"] > 0
    assert report["duplicates"].get("unexplained", 0) == 0
    assert not [r for r in report["races"] if r["ran_to_end_twice"]]
    assert report["lost_replies"] == []
    assert set(report["exit_codes"]) <= {"0", "3", "SIGKILL"}
    assert report["exit_codes"]["SIGKILL"] == report["faults_by_kind"]["crash"]
    assert report["step_executions"] >= 4 * runs["completed"]
    assert any(len(samples) >= 2 for samples in report["rss"].values())
    assert "every duplicate explained" in table


async def test_a_worker_that_cannot_start_fails_at_once() -> None:
    """A precondition failure is one line as soon as the worker exits, not a timeout."""
    async with DevServer(DevServerConfig.fast()) as dev, WorkerProcess(
        "no_such_module_here", api_url=dev.api_url, instance_id="broken"
    ) as worker:
        started = time.monotonic()
        with pytest.raises(RuntimeError) as failed:
            await worker.wait_ready(dev, timeout=60)
        assert time.monotonic() - started < 30  # not the 60 s timeout
    message = str(failed.value)
    assert "\n" not in message and "exited with code 2 before it was ready" in message
    assert "no_such_module_here" in message
