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
from connect_worker.lab import soak, soak_audit
from connect_worker.lab.apps.soak import COPY_KEY
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
    assert report["lost_replies"] == [] and report["lost"] == []
    # Every explained duplicate names the fault behind it (from the soak's fault log).
    assert all(d["cause"] is not None for d in report["explained_duplicates"])
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


def _reply(ts: float, request_id: str, conn_id: str | None, copy: str | None) -> Any:
    """A reply record as the gateway keeps it: the body carries the step's result."""
    data = {"part": 0, COPY_KEY: copy} if copy else {"error": "handed back"}
    body = json.dumps([{"op": "StepRun", "data": data}]).encode()
    return SimpleNamespace(ts=ts, request_id=request_id, conn_id=conn_id,
                           response=SimpleNamespace(body=body))


def _dispatch(request_id: str, job: str, conn_id: str, sent_at: float,
              outcome: str = "acked") -> Any:
    return SimpleNamespace(request_id=request_id, job_id=job, conn_id=conn_id,
                           sent_at=sent_at, acked_at=sent_at + 0.01, outcome=outcome)


def _fault(kind: str, at: float, hit: list[str], seconds: float = 0.0) -> Any:
    return SimpleNamespace(fault=SimpleNamespace(kind=kind, seconds=seconds),
                           started_at=at, hit=hit)


def test_audit_classifies_every_duplicate(tmp_path: Path) -> None:
    """The checker on a hand-made record, from the bodies' records, the gateway's and
    the fault log only (the workers' logs are empty): each class of duplicate, a race
    that ran to the end twice, an unexplained duplicate, lost replies (on a replica that
    exited 0 and on one SIGKILLed before the step ran again) and bad exit codes."""
    real = _Worker("real", 1)
    killed = _Worker("killed", 2, returncode=-9, signalled_at=None, killed_at=5.0)
    drained = _Worker("drained", 3, returncode=3)  # signalled at 10, exited at 11
    loser = _Worker("loser", 4)
    silent = _Worker("silent", 5, returncode=3)  # exit 3, held nothing
    # SIGTERMed before it connected or ran anything / after it connected.
    unborn = _Worker("unborn", 6, returncode=-15)
    shot = _Worker("shot", 7, returncode=-15)
    # (copy id, pid, request, run, step, started, ended, cancelled)
    copies = [
        ("a", 2, "q-crash", "run1", "part-0", 1.0, None, None),
        ("b", 1, "q-crash-retry", "run1", "part-0", 6.0, 7.0, None),
        ("c", 3, "q-ab", "run1", "part-1", 8.0, None, 10.5),
        ("d", 1, "q-ab-retry", "run1", "part-1", 10.3, 11.0, None),
        ("e", 4, "q-race", "run1", "part-2", 2.0, None, 2.8),
        ("f", 1, "q-race", "run1", "part-2", 2.1, 3.0, None),
        ("g", 1, "q-twice", "run2", "part-0", 3.0, 4.0, None),
        ("h", 4, "q-twice", "run2", "part-0", 3.05, 4.1, None),
        ("x", 1, "q-x", "run2", "part-1", 5.0, 6.0, None),
        ("y", 1, "q-y", "run2", "part-1", 5.5, 6.5, None),
        ("l", 4, "q-lapse", "run2", "part-2", 4.0, None, 8.5),
        ("m", 1, "q-lapse2", "run2", "part-2", 9.0, 9.5, None),
        # Ran to the end on a replica SIGKILLed before its reply landed (its ACK was late,
        # so the gateway re-routed the same request to "real", whose reply landed).
        ("r", 2, "q-rr", "run3", "part-0", 2.0, 3.0, None),
        ("s", 1, "q-rr", "run3", "part-0", 2.5, 3.5, None),
        ("lost", 4, "q-lost", "run3", "part-1", 6.0, 7.0, None),  # loser exited 0
        ("k2", 2, "q-k2", "run3", "part-2", 3.0, 4.0, None),  # killed, never ran again
        # Lost a re-route race and was cancelled, on a replica SIGKILLed later: the race
        # explains it, not the crash (it was no longer running when the kill came).
        ("e2", 2, "q-race2", "run3", "part-3", 1.0, None, 1.5),
        ("f2", 1, "q-race2", "run3", "part-3", 1.1, 2.0, None),
        # A race lost long before "drained" was stopped: not a step it held at its exit.
        ("c0", 3, "q-race3", "run3", "part-4", 0.5, None, 0.8),
        ("f3", 1, "q-race3", "run3", "part-4", 0.6, 1.0, None),
        # The other way round: the copy whose ACK did not count extended the lease first
        # and ran to the end; the re-routed copy (ACKed) was cancelled.
        ("w4", 1, "q-race4", "run4", "part-0", 20.0, 21.0, None),
        ("l4", 4, "q-race4", "run4", "part-0", 20.1, None, 20.4),
    ]
    ids = {c[0]: f"{c[1]}-{i}" for i, c in enumerate(copies)}
    lines = []
    for cid, pid, q, run, step, started, ended, cancelled in copies:
        base = {"pid": pid, "request_id": q, "run_id": run, "step": step, "copy": ids[cid]}
        lines.append({**base, "phase": "start", "ts": started})
        if ended is not None:
            lines.append({**base, "phase": "end", "ts": ended})
        if cancelled is not None:
            lines.append({**base, "phase": "cancelled", "ts": cancelled})
    log = tmp_path / "executions.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    replies = [_reply(7.1, "q-crash-retry", "c1", ids["b"]),
               _reply(10.25, "q-ab", "c3", None),  # the hand-back: no result
               _reply(11.1, "q-ab-retry", "c1", ids["d"]),
               _reply(3.1, "q-race", "c1", ids["f"]),
               _reply(4.1, "q-twice", "c1", ids["g"]), _reply(4.2, "q-twice", "c4", ids["h"]),
               _reply(6.1, "q-x", "c1", ids["x"]), _reply(6.6, "q-y", "c1", ids["y"]),
               _reply(3.6, "q-rr", "c1", ids["s"]), _reply(2.1, "q-race2", "c1", ids["f2"]),
               _reply(1.1, "q-race3", "c1", ids["f3"]), _reply(21.1, "q-race4", "c1", ids["w4"])]
    flushes = [_reply(9.6, "q-lapse2", None, ids["m"])]
    kept = {"run1": ["b", "d", "f"], "run2": ["g", "x", "m"], "run3": ["s", "f2", "f3"],
            "run4": ["w4"]}
    dispatches = [
        _dispatch("q-ab", "j-ab", "c3", 8.0), _dispatch("q-ab-retry", "j-ab", "c1", 10.2),
        _dispatch("q-race", "j-race", "c4", 1.9, "forward_failed"),
        _dispatch("q-race", "j-race", "c1", 2.0),
        _dispatch("q-twice", "j-twice", "c4", 2.9, "forward_failed"),
        _dispatch("q-twice", "j-twice", "c1", 3.0),
        _dispatch("q-lapse", "j-lapse", "c4", 4.0, "lease_lost"),
        _dispatch("q-lapse2", "j-lapse", "c1", 9.0),
        _dispatch("q-rr", "j-rr", "c2", 1.9, "forward_failed"),
        _dispatch("q-rr", "j-rr", "c1", 2.4),
        _dispatch("q-race2", "j-race2", "c2", 0.9, "forward_failed"),
        _dispatch("q-race2", "j-race2", "c1", 1.0),
        _dispatch("q-race3", "j-race3", "c3", 0.4, "forward_failed"),
        _dispatch("q-race3", "j-race3", "c1", 0.5),
        _dispatch("q-race4", "j-race4", "c1", 19.9, "forward_failed"),
        _dispatch("q-race4", "j-race4", "c4", 20.0),
    ]
    dev = SimpleNamespace(
        runs={run: SimpleNamespace(status=RunStatus.COMPLETED, steps={
            str(i): {"part": i, COPY_KEY: ids[k]} for i, k in enumerate(keys)})
            for run, keys in kept.items()},
        timeline=[SimpleNamespace(kind="ACK_IGNORED", ts=2.0, request_id="q-race"),
                  SimpleNamespace(kind="REPLY_DISCARDED", ts=7.05, request_id="q-lost")],
        replies=replies, flushes=flushes, dispatches=dispatches,
        connections=[SimpleNamespace(conn_id=f"c{w.pid}", instance_id=w.instance_id)
                     for w in (real, killed, drained, loser, shot)],
    )
    result = soak.SoakResult(soak.SoakSettings(), run_ids=list(kept))
    result.workers = [real, killed, drained, loser, silent, unborn,  # type: ignore[list-item]
                      shot]
    result.applied = [_fault("gateway-closing", 1.95, ["loser"]),  # type: ignore[list-item]
                      _fault("drop", 2.95, ["loser"]),
                      _fault("latency", 3.5, [], seconds=5.0),
                      _fault("slow-acks", 0.5, [], seconds=2.0),
                      _fault("gateway-closing", 19.95, ["real"])]
    soak.audit(result, dev, str(log))  # type: ignore[arg-type]

    assert result.runs_completed == 4 and result.step_executions == len(copies)
    assert dict(result.duplicates) == {"crash": 2, "abandoned": 1, "race": 4, "lapsed": 1,
                                       "unexplained": 2}
    causes = {c["copy"]: (c["class"], c["cause"]["kind"]) for c in result.explained}
    assert causes == {ids["a"]: ("crash", "crash"), ids["c"]: ("abandoned", "sigterm"),
                      ids["e"]: ("race", "gateway-closing"), ids["l"]: ("lapsed", "latency"),
                      ids["r"]: ("crash", "crash"), ids["e2"]: ("race", "slow-acks"),
                      ids["c0"]: ("race", "slow-acks"),
                      ids["l4"]: ("race", "gateway-closing")}
    assert [(u["run_id"], u["step"]) for u in result.unexplained] == [
        ("run2", "part-0"), ("run2", "part-1")]
    why = {c["copy"]: c for u in result.unexplained for c in u["copies"]}
    assert why[ids["h"]]["class"] == "unexplained" and why[ids["h"]]["cause"] == {
        "kind": "drop", "at": 2.95, "replica": "loser"}
    assert why[ids["y"]]["cause"] is None and why[ids["x"]]["kept"]
    races = {r.request_id: r for r in result.races}
    assert races["q-race"].loser_ran_for == [0.8] and not races["q-race"].ran_to_end_twice
    assert races["q-twice"].ran_to_end_twice and result.race_ran_twice == 1
    assert not races["q-rr"].ran_to_end_twice and races["q-rr"].winner == "real"
    assert result.late_acks_ignored == 1 and result.replies_discarded == 1
    assert sorted(result.lost_replies) == ["q-k2", "q-lost"]
    lost = {x["request_id"]: x for x in result.lost}
    assert lost["q-lost"]["discarded_by_gateway"] == [7.05] and lost["q-lost"]["exit_code"] == 0
    assert result.abandoned == 1 and result.handed_back == 1
    assert result.retry_after_sigterm == [0.2]
    assert result.exit_codes == {"0": 2, "3": 2, "SIGKILL": 1, "-15": 1,
                                 "SIGTERM before start": 1}
    assert result.bad_exits == [
        "silent exited 3 but held no step at its exit (no copy without a result at the "
        "gateway)", "shot exited -15 after SIGTERM"]
    assert not result.ok and len(result.failures) == 5


def test_a_forward_counts_as_failed_when_the_request_went_elsewhere_after_it() -> None:
    """Through the proxy in front of Inngest's server the audit sees no outcome: a forward
    followed by one of the same request to another connection did not count."""
    first, again, other = (SimpleNamespace(conn_id=c, sent_at=t)
                           for c, t in (("p1", 1.0), ("p1", 1.5), ("p2", 2.0)))
    forwards = [first, again, other]
    assert [soak_audit._failed(d, forwards) for d in forwards] == [True, True, False]
    recorded = _dispatch("q", "j", "c1", 1.0, "acked")
    assert not soak_audit._failed(recorded, [recorded, _dispatch("q", "j", "c2", 2.0)])


def test_audit_through_the_proxy_credits_a_flush_to_its_process_and_keeps_a_finished_copy(
        tmp_path: Path) -> None:
    """Against Inngest's server the audit sees no reply bodies and no run memos. A stall
    held w's ACK, a drop cut its socket, and Inngest re-routed the request to l; w's copy
    ran to the end and flushed its reply, l's copy was cancelled. The kept copy is w's
    (the first that ran to the end and landed), not the last one started (l's, whose
    reply carries no result), and w's flush does not count for l's copy: l lost a race."""
    w, loser = _Worker("w", 1), _Worker("l", 2)
    lines = []
    for cid, pid, started, ended, cancelled in (("1-w", 1, 1.0, 3.8, None),
                                                ("2-l", 2, 2.8, None, 4.5)):
        base = {"pid": pid, "request_id": "q", "run_id": "run", "step": "part-0",
                "copy": cid}
        lines.append({**base, "phase": "start", "ts": started})
        lines.append({**base, "phase": "end" if ended else "cancelled",
                      "ts": ended or cancelled})
    log = tmp_path / "executions.jsonl"
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dev = SimpleNamespace(
        runs={"run": SimpleNamespace(status=RunStatus.COMPLETED)},
        timeline=[], replies=[],
        flushes=[SimpleNamespace(ts=3.9, request_id="q", conn_id=None, pid=1)],
        # No outcome through the proxy: a forward followed by another one failed.
        dispatches=[SimpleNamespace(request_id="q", job_id="j", conn_id="c1", sent_at=0.99,
                                    acked_at=1.0),
                    SimpleNamespace(request_id="q", job_id="j", conn_id="c2", sent_at=2.79,
                                    acked_at=2.8)],
        connections=[SimpleNamespace(conn_id=f"c{x.pid}", instance_id=x.instance_id)
                     for x in (w, loser)],
    )
    result = soak.SoakResult(soak.SoakSettings(), run_ids=["run"])
    result.workers = [w, loser]  # type: ignore[list-item]
    result.applied = [_fault("stall", 0.95, [], seconds=4.0),  # type: ignore[list-item]
                      _fault("drop", 2.75, ["w"])]
    soak.audit(result, dev, str(log))  # type: ignore[arg-type]

    assert dict(result.duplicates) == {"race": 1}, result.unexplained
    assert [(c["copy"], c["class"], c["landed"]) for c in result.explained] == [
        ("2-l", "race", None)]  # w's flush is not l's reply
    assert not result.lost_replies and result.ok, result.failures
