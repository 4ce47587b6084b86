"""``connect-worker compat``: would this code continue the recorded runs without drift?

Each recorded history (a run's memos, their completion order, step names) is replayed
against the new code for every prefix of its completion order, the way the gateway would
call the new code at each point of the run: a memoized step returns its stored output;
the first step with no memo stops the replay before anything runs (no step body, sleep,
wait, invoke or model call). A prefix is compatible when the function consumed every memo
of the prefix before it reached a new step or returned. The same per-request tracker as
the run-time guard (``engine/drift.py``) judges it, so ``compat`` and
``CONNECT_WORKER_ON_DRIFT`` agree on what drift is.

Histories come from ``CONNECT_WORKER_RECORD_HISTORY`` files or from the dev gateway
(``--from-gateway URL`` live, or ``connect-worker runs --export DIR`` files).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .engine import drift, history
from .engine.executor import STATUS_ERROR, App, Executor
from .protocol import ExecutorRequest

EXIT_DRIFT = 1
LISTED = 10  # runs listed per function in the table
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class History:
    """One run as recorded: what a request for it would carry."""

    run_id: str
    function: str
    status: str
    event: dict[str, Any]
    events: list[dict[str, Any]] | None
    stack: list[str]
    steps: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def in_flight(self) -> bool:
        return self.status not in TERMINAL


def history_from_record(doc: dict[str, Any], source: str = "") -> History:
    """A ``CONNECT_WORKER_RECORD_HISTORY`` file (or a ``runs --export`` one)."""
    if doc.get("format") != history.HISTORY_FORMAT:
        raise ValueError(f"{source}: not a connect-worker history (format "
                         f"{doc.get('format')!r})")
    return History(run_id=str(doc["run_id"]), function=str(doc["function"]),
                   status=str(doc.get("status") or "running"), event=doc.get("event") or {},
                   events=doc.get("events"), stack=list(doc.get("stack") or []),
                   steps=dict(doc.get("steps") or {}), names=dict(doc.get("names") or {}),
                   source=source)


def history_from_gateway(run: dict[str, Any], source: str = "") -> History:
    """A dev gateway run (``GET /v1/runs/{id}``)."""
    names = {str(h["step"]): str(h["name"]) for h in run.get("history", [])
             if h.get("type") == "step_completed" and h.get("name")}
    event = run.get("event") or {"name": "", "data": {}}
    return History(run_id=str(run["run_id"]), function=str(run["function_slug"]),
                   status=str(run.get("status") or "running"), event=event,
                   events=run.get("events"), stack=list(run.get("stack") or []),
                   steps=dict(run.get("steps") or {}), names=names, source=source)


def load_histories(paths: Iterable[str | Path]) -> list[History]:
    """Every ``*.json`` history in ``paths`` (files or directories)."""
    out: list[History] = []
    for path in map(Path, paths):
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            doc = json.loads(file.read_text())
            out.append(history_from_record(doc, str(file)))
    return out


def fetch_gateway(url: str, limit: int = 1000) -> list[History]:
    """The dev gateway's newest ``limit`` runs, with their memos (live)."""
    from .devclient import _request

    url = url.rstrip("/")
    listed = _request(url, "GET", f"/v1/runs?limit={limit}")["data"]
    out = []
    for item in listed:
        run = _request(url, "GET", f"/v1/runs/{item['run_id']}")["data"]
        out.append(history_from_gateway(run, f"{url}/v1/runs/{item['run_id']}"))
    return out


def export_gateway(url: str, directory: str | Path, limit: int = 1000) -> int:
    """Write the dev gateway's runs as history files; returns how many."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    histories = fetch_gateway(url, limit)
    for h in histories:
        doc = {"format": history.HISTORY_FORMAT, **asdict(h)}
        (directory / f"{h.run_id}.json").write_text(json.dumps(doc))
    return len(histories)


# -- the replay --------------------------------------------------------------------------


@dataclass
class Problem:
    run_id: str
    prefix: int  # how many memos (in completion order) the replayed request carried
    kind: str  # added | unconsumed | output_shape | error
    new_step: str | None
    unconsumed: list[str]
    detail: str = ""
    in_flight: bool = False
    # Found by replaying the step the run is executing now, as other recorded runs
    # completed it: the run breaks once that step finishes on the old version.
    next_step: bool = False


@dataclass
class FunctionReport:
    function: str
    runs: int = 0
    in_flight: int = 0
    prefixes: int = 0
    problems: list[Problem] = field(default_factory=list)
    served: bool = True

    @property
    def status(self) -> str:
        if not self.served:
            return "not served"
        if any(p.kind == "added" for p in self.problems):
            return "new step where a memo was expected"
        return "drift" if self.problems else "compatible"

    @property
    def broken_runs(self) -> set[str]:
        return {p.run_id for p in self.problems}

    @property
    def broken_in_flight(self) -> set[str]:
        return {p.run_id for p in self.problems if p.in_flight}


class _ReplayGuard(drift.DriftGuard):
    def __init__(self) -> None:
        super().__init__(on_drift="warn")
        self.last: drift.RequestDrift | None = None

    def watches(self, memos: int, step_id: str | None) -> bool:
        return True  # a replay with no memos stops at its first step

    def begin(self, request: drift.Request) -> drift.RequestDrift:
        self.last = drift.RequestDrift(self, request, replay=True)
        return self.last


def _request(h: History, app: str, prefix: int) -> ExecutorRequest:
    stack = h.stack[:prefix]
    payload = {
        "event": h.event, "events": h.events or [h.event],
        "steps": {k: h.steps[k] for k in stack if k in h.steps},
        "ctx": {"run_id": h.run_id, "attempt": 0, "max_attempts": 1,
                "disable_immediate_execution": False, "use_api": False,
                "stack": {"stack": stack, "current": prefix}},
        "version": 1, "use_api": False,
    }
    return ExecutorRequest(
        request_id=f"compat-{h.run_id}-{prefix}", account_id="", env_id="", app_id="",
        app_name=app, function_id="", function_slug=h.function, step_id="step",
        request_payload=json.dumps(payload).encode(), system_trace_ctx=b"",
        user_trace_ctx=b"", run_id=h.run_id, lease_id="", job_id="")


def replay(apps: Sequence[App], histories: Sequence[History]) -> list[FunctionReport]:
    """Replay every prefix of every history against ``apps``; one report per function."""
    replayer = _Replayer(apps, histories)
    reports: dict[str, FunctionReport] = {}
    # The SDK logs each replayed function error; replay reports them itself.
    quiet = [logging.getLogger(n) for n in ("inngest", "connect_worker.engine.executor")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    replayer.executor.start()
    try:
        for h in histories:
            report = reports.setdefault(h.function, FunctionReport(h.function))
            report.runs += 1
            report.in_flight += h.in_flight
            if h.function not in replayer.apps:
                report.served = False
                continue
            found = [replayer.one(report, h, prefix) for prefix in range(len(h.stack) + 1)]
            if h.in_flight and not any(found):
                for ahead in _next_steps(h, histories):
                    if replayer.one(report, ahead, len(ahead.stack), next_step=True):
                        break
    finally:
        replayer.executor.stop()
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    return sorted(reports.values(), key=lambda r: r.function)


class _Replayer:
    def __init__(self, apps: Sequence[App], histories: Sequence[History]) -> None:
        self.guard = _ReplayGuard()
        self.executor = Executor(apps, drift=self.guard)
        self.apps = {slug: app.app_name for app in self.executor.apps
                     for slug in app.function_slugs}
        self.names: dict[str, str] = {}
        for h in histories:
            self.names.update(h.names)

    def one(self, report: FunctionReport, run: History, prefix: int,
            next_step: bool = False) -> bool:
        """Replay ``run``'s first ``prefix`` memos; whether it drifted."""
        report.prefixes += 1
        request = _request(run, self.apps[run.function], prefix)
        outcome = asyncio.run_coroutine_threadsafe(
            self.executor._call(request), self.executor.user_loop.loop).result()
        tracker = self.guard.last
        assert tracker is not None
        self.names.update(tracker.names)
        for d in tracker.drifts:
            report.problems.append(Problem(
                run.run_id, prefix, d.kind, d.new_step,
                [drift.name_of(x, self.names) for x in d.unconsumed], d.detail,
                run.in_flight, next_step))
        if (outcome.status == STATUS_ERROR and tracker.stopped_at is None
                and not tracker.drifts and run.status != "failed"):
            report.problems.append(Problem(
                run.run_id, prefix, "error", None, [], _error_message(outcome.body),
                run.in_flight, next_step))
        return bool(tracker.drifts)


def _next_steps(h: History, histories: Sequence[History]) -> list[History]:
    """``h`` extended by the step it is executing now, as each other recorded run of the
    function that passed the same steps completed it (memo keys are hashes of step ids,
    so equal prefixes mean the same steps): a run in flight finishes its current step on
    the old version, then meets the new code."""
    k = len(h.stack)
    out: dict[str, History] = {}
    for g in histories:
        if g.function == h.function and len(g.stack) > k and g.stack[:k] == h.stack:
            step = g.stack[k]
            if step not in out and step in g.steps:
                out[step] = History(
                    run_id=h.run_id, function=h.function, status=h.status, event=h.event,
                    events=h.events, stack=[*h.stack, step],
                    steps={**h.steps, step: g.steps[step]}, names=h.names, source=h.source)
    return list(out.values())


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(doc, dict):
        return f"{doc.get('name', 'Error')}: {doc.get('message', '')}"[:200]
    return str(doc)[:200]


# -- output ------------------------------------------------------------------------------


def _first_problems(report: FunctionReport) -> list[Problem]:
    """The first problem of each run (later prefixes repeat it)."""
    seen: set[str] = set()
    out = []
    for p in report.problems:
        if p.run_id not in seen:
            seen.add(p.run_id)
            out.append(p)
    return out


def _describe(p: Problem) -> str:
    left = ", ".join(p.unconsumed)
    if p.kind == "added":
        return f"new step {p.new_step!r} where a memo of [{left}] was expected"
    if p.kind == "output_shape":
        return f"memo of {p.new_step!r} does not fit its type ({p.detail})"
    if p.kind == "error":
        return f"the function raised: {p.detail}"
    return f"memos [{left}] never reached{p.detail}"


def print_table(reports: Sequence[FunctionReport], out: TextIO) -> None:
    rows = [("FUNCTION", "RUNS", "IN FLIGHT", "PREFIXES", "RESULT", "BREAKS")]
    for r in reports:
        breaks = (f"{len(r.broken_runs)} runs ({len(r.broken_in_flight)} in flight)"
                  if r.problems else "-")
        rows.append((r.function, str(r.runs), str(r.in_flight), str(r.prefixes),
                     r.status, breaks))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")
    for r in reports:
        problems = _first_problems(r)
        # Runs in flight first: those are what the deploy would break now.
        problems.sort(key=lambda p: not p.in_flight)
        for p in problems[:LISTED]:
            flight = (" (in flight, once its running step completes)" if p.next_step
                      else " (in flight)" if p.in_flight else "")
            out.write(f"  {r.function} run {p.run_id}{flight}, after {p.prefix} memos: "
                      f"{_describe(p)}\n")
        if len(problems) > LISTED:
            out.write(f"  {r.function}: and {len(problems) - LISTED} more runs (--json lists "
                      "them all)\n")
    total = sum(len(r.broken_in_flight) for r in reports)
    flying = sum(r.in_flight for r in reports)
    out.write(f"this deploy would break {total} of {flying} runs in flight\n")


def as_json(reports: Sequence[FunctionReport]) -> dict[str, Any]:
    return {
        "compatible": all(r.status == "compatible" for r in reports),
        "runs_in_flight": sum(r.in_flight for r in reports),
        "runs_in_flight_broken": sum(len(r.broken_in_flight) for r in reports),
        "functions": [
            {"function": r.function, "status": r.status, "runs": r.runs,
             "in_flight": r.in_flight, "prefixes": r.prefixes,
             "broken_runs": sorted(r.broken_runs),
             "broken_in_flight": sorted(r.broken_in_flight),
             "problems": [asdict(p) for p in _first_problems(r)]}
            for r in reports
        ],
    }


def run(target: str, *, histories: Sequence[str], gateway: str | None, as_json_out: bool,
        out: TextIO = sys.stdout) -> int:
    """The CLI command: 0 compatible, 1 drift, 2 usage (bad target or histories)."""
    from .engine.target import load_target

    apps = load_target(target)
    found = load_histories(histories)
    if gateway:
        found += fetch_gateway(gateway)
    reports = replay(apps, found)
    if as_json_out:
        out.write(json.dumps(as_json(reports), indent=2) + "\n")
    else:
        print_table(reports, out)
    return 0 if all(r.status == "compatible" for r in reports) else EXIT_DRIFT
