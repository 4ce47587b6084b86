"""``connect-worker soak``: the fault schedule is a function of the seed, and a short
seeded soak with every fault kind keeps the promise (every run completed, every
duplicate execution explained, no reply lost, every SIGTERMed replica drained)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from connect_worker import cli
from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.lab import soak
from connect_worker.lab.fleet import WorkerProcess
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


def test_faults_inngest_cannot_do_are_refused_in_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["soak", "--server", "http://127.0.0.1:9", "--faults", "deploy,withhold-ack"])
    [line] = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert "cannot be made to do withhold-ack" in line and "deploy, crash, drop, stall" in line
    with pytest.raises(SystemExit):
        cli.main(["soak", "--faults", "stall"])  # a proxy fault: Inngest's server only
    assert "stall needs --server" in capsys.readouterr().err
    # The real server's menu by default, minus --no-<kind>.
    assert cli.main(["soak", "--server", "http://127.0.0.1:9", "--plan", "--no-crash"]) == 0
    kinds = {json.loads(x)["kind"] for x in capsys.readouterr().out.splitlines()}
    assert kinds == {"deploy", "drop", "stall"}


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


@dataclass
class _Worker:
    """What the audit reads of a WorkerProcess."""

    instance_id: str
    pid: int
    returncode: int | None = 0
    signalled_at: float | None = 10.0
    killed_at: float | None = None
    exited_at: float | None = 11.0
    started_at: float = 1.0
    logs: list[dict[str, Any]] = field(default_factory=list)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.logs if e["event"] == name]


def test_audit_classifies_every_duplicate(tmp_path: Path) -> None:
    """The checker on a hand-made record: each class of duplicate, a race that ran to
    the end twice, an unexplained duplicate, a lost reply and a bad exit code."""
    killed = _Worker("killed", 2, returncode=-9, signalled_at=None, killed_at=5.0)
    drained = _Worker("drained", 3, returncode=3, logs=[
        {"event": "drain.step_abandoned", "request_id": "q-abandoned", "handed_back": True}])
    loser = _Worker("loser", 4, logs=[
        {"event": "step.lease_lost", "request_id": "q-race", "ran_for": 0.8},
        {"event": "step.lease_lost", "request_id": "q-again", "ran_for": 0.2}])
    silent = _Worker("silent", 5, returncode=3)  # exit 3, names nothing
    real = _Worker("real", 1, logs=[{"event": "worker.start"}])
    # SIGTERMed before our handler existed (nothing started) / after the worker started.
    unborn = _Worker("unborn", 6, returncode=-15)
    shot = _Worker("shot", 7, returncode=-15, logs=[{"event": "worker.start"}])
    starts = [  # (pid, request, run, step, ran to the end)
        (2, "q-crash", "run1", "part-0", False), (1, "q-crash-retry", "run1", "part-0", True),
        (3, "q-abandoned", "run1", "part-1", False),
        (1, "q-abandoned-retry", "run1", "part-1", True),
        (4, "q-race", "run1", "part-2", False), (1, "q-race", "run1", "part-2", True),
        (1, "q-twice", "run2", "part-0", True), (4, "q-twice", "run2", "part-0", True),
        (1, "q-x", "run2", "part-1", True), (1, "q-y", "run2", "part-1", True),
        # Re-delivered to the same replica, which ran it again until its lease was refused.
        (4, "q-again", "run2", "part-2", True), (4, "q-again", "run2", "part-2", False),
        # Ran to the end on a replica SIGKILLed before its reply landed (its ACK was late,
        # so the gateway re-routed the same request to "real", whose reply landed).
        (2, "q-rerouted", "run3", "part-0", True), (1, "q-rerouted", "run3", "part-0", True),
    ]
    log = tmp_path / "executions.jsonl"
    log.write_text("".join(
        json.dumps({"pid": pid, "request_id": q, "run_id": run, "step": step, "ts": i,
                    "phase": phase}) + "\n"
        for i, (pid, q, run, step, end) in enumerate(starts)
        for phase in (("start", "end") if end else ("start",))))
    replies = [SimpleNamespace(request_id=q, conn_id="c-real") for q in
               ("q-crash-retry", "q-abandoned-retry", "q-race", "q-twice", "q-x", "q-y",
                "q-again", "q-rerouted")]
    dev = SimpleNamespace(
        runs={run: SimpleNamespace(status=RunStatus.COMPLETED)
              for run in ("run1", "run2", "run3")},
        timeline=[SimpleNamespace(kind="ACK_IGNORED")], replies=replies, flushes=[],
        connections=[SimpleNamespace(conn_id="c-real", instance_id="real")],
        dispatches=[SimpleNamespace(request_id="q-lost", job_id="j", conn_id="c-real",
                                    acked_at=2.0, sent_at=1.0)],
    )
    result = soak.SoakResult(soak.SoakSettings(), run_ids=["run1", "run2", "run3"])
    result.workers = [real, killed, drained, loser, silent, unborn,  # type: ignore[list-item]
                      shot]
    soak.audit(result, dev, str(log))  # type: ignore[arg-type]

    assert result.runs_completed == 3 and result.step_executions == len(starts)
    assert dict(result.duplicates) == {"crash": 2, "abandoned": 1, "race": 2,
                                       "unexplained": 2}
    assert [(u["run_id"], u["step"]) for u in result.unexplained] == [
        ("run2", "part-0"), ("run2", "part-1")]
    races = {r.request_id: r for r in result.races}
    assert races["q-race"].loser_ran_for == [0.8] and not races["q-race"].ran_to_end_twice
    assert races["q-twice"].ran_to_end_twice and result.race_ran_twice == 1
    assert races["q-again"].loser_ran_for == [0.2] and not races["q-again"].ran_to_end_twice
    assert not races["q-rerouted"].ran_to_end_twice and races["q-rerouted"].winner == "real"
    assert result.late_acks_ignored == 1
    assert result.lost_replies == ["q-lost"]
    assert result.abandoned == 1 and result.handed_back == 1
    assert result.exit_codes == {"0": 2, "3": 2, "SIGKILL": 1, "-15": 1,
                                 "SIGTERM before start": 1}
    assert result.bad_exits == ["silent exited 3 without naming the steps it abandoned",
                                "shot exited -15 after SIGTERM"]
    assert not result.ok and len(result.failures) == 5
