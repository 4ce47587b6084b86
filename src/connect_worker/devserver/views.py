"""What a person wants to see of the recorded state: runs with their steps by name
(which worker ran each, when, how many attempts, replied by socket or flush) and
connections with their in-flight steps. Served as JSON by ``GET /v1/runs`` and
``GET /v1/connections``; the page at ``/`` and ``connect-worker runs`` render it.

Everything is derived from the records the gateway and the executor already keep
(dispatches, replies, run history); nothing here changes state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ..protocol import pb
from .state import ConnectionInfo, DevState, Dispatch, ReplyRecord, Run

DISCOVERY = "step"
# Opcodes that report a step body having run (or failed to) in that request.
_RAN = ("StepRun", "Step", "StepError", "StepFailed")
# Opcodes that name a step; others (RunComplete, unknown ones) do not make a step row.
_STEP_OPS = (*_RAN, "StepPlanned", "Sleep", "WaitForEvent", "InvokeFunction")


def _ops(response: pb.SDKResponse) -> list[dict[str, Any]]:
    if response.status != pb.SDKResponseStatus.NOT_COMPLETED:
        return []
    try:
        body = json.loads(response.body or b"[]")
    except ValueError:
        return []
    return [op for op in body if isinstance(op, dict)] if isinstance(body, list) else []


def _body(response: pb.SDKResponse) -> Any:
    try:
        return json.loads(response.body) if response.body else None
    except ValueError:
        return response.body.decode("utf-8", "replace")


def _error_text(error: Any) -> str | None:
    """One line out of an SDK error object, a string or None."""
    if error is None:
        return None
    if isinstance(error, dict):
        name, message = error.get("name"), error.get("message")
        if message:
            return f"{name}: {message}" if name else str(message)
        inner = error.get("error")
        if inner is not None:
            return _error_text(inner)
    return str(error)[:300]


def _worker(conn: ConnectionInfo | None, app: str) -> dict[str, Any]:
    if conn is None:
        return {"conn_id": None, "worker": None, "app_version": None}
    return {
        "conn_id": conn.conn_id,
        "worker": conn.instance_id,
        "app_version": conn.app_version.get(app) or None,
    }


@dataclass
class _Step:
    id: str
    name: str | None = None
    status: str = "planned"
    attempts: int = 0
    requests: list[str] = field(default_factory=list)
    worker: dict[str, Any] = field(default_factory=dict)
    started_at: float | None = None
    ended_at: float | None = None
    reply_via: str | None = None
    error: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    # Workers one request for this step was sent to at once (dual dispatch), if > 1.
    copies: list[str] = field(default_factory=list)
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        duration = (self.ended_at - self.started_at
                    if self.ended_at is not None and self.started_at is not None else None)
        return {
            "id": self.id, "name": self.name or self.id[:12], "status": self.status,
            "attempts": self.attempts, "requests": self.requests, **self.worker,
            "started_at": self.started_at, "ended_at": self.ended_at, "duration": duration,
            "reply_via": self.reply_via, "error": self.error, "errors": self.errors,
            "copies": self.copies, "note": self.note,
        }


def _instances(state: DevState, conn_ids: list[str]) -> list[str]:
    names: list[str] = []
    for conn_id in conn_ids:
        conn = state.connections.get(conn_id)
        name = conn.instance_id if conn is not None else conn_id
        if name not in names:
            names.append(name)
    return names


@dataclass
class _Index:
    """The records grouped once per API call (the page asks every second)."""

    replies: dict[str, ReplyRecord]  # request_id -> the reply stored
    # Every way a request's reply arrived, in order: "ws", "flush" or "ws+flush" (the
    # worker flushed over HTTP too, e.g. because its WORKER_REPLY_ACK never came).
    vias: dict[str, list[str]]
    dispatches: dict[str, dict[str, list[Dispatch]]]  # run_id -> request_id -> forwards

    @classmethod
    def of(cls, state: DevState) -> _Index:
        index = cls({}, {}, {})
        for rec in sorted([*state.replies, *state.flushes], key=lambda r: r.ts):
            if rec.stored and rec.request_id not in index.replies:
                index.replies[rec.request_id] = rec
            seen = index.vias.setdefault(rec.request_id, [])
            if rec.via not in seen:
                seen.append(rec.via)
        for d in state.dispatches:
            by_request = index.dispatches.setdefault(d.run_id, {})
            by_request.setdefault(d.request_id, []).append(d)
        return index


def run_view(state: DevState, run: Run, index: _Index | None = None) -> dict[str, Any]:
    """The run with its steps by name and every request the executor sent for it."""
    index = index or _Index.of(state)
    replies, vias = index.replies, index.vias
    by_request = index.dispatches.get(run.run_id, {})
    # When the executor gave up on each (job, attempt): the end of a lost request.
    gave_up = {(h.get("job_id"), h.get("attempt")): h["ts"] for h in run.history
               if h.get("type") == "step_error"}
    requests: list[dict[str, Any]] = []
    steps: dict[str, _Step] = {}
    # job_id -> step that a request of that job reported (names a failed discovery call).
    job_step: dict[str, str] = {}
    for request_id, forwards in by_request.items():
        last = forwards[-1]
        record = replies.get(request_id)
        # In the order the ACKs came: the first one owns the lease.
        acked = sorted((d for d in forwards if d.acked_at is not None),
                       key=lambda d: d.acked_at or 0.0)
        # The worker whose reply was stored, else the one that ACKed first. A request
        # sent to two workers at once (Faults.dual_dispatch) lists both in sent_to.
        conn_id = (record.conn_id if record is not None and record.conn_id
                   else acked[0].conn_id if acked else last.conn_id)
        conn = state.connections.get(conn_id)
        replied_at = next((d.replied_at for d in forwards if d.replied_at is not None), None)
        outcomes = {d.outcome for d in forwards}
        outcome = ("replied" if replied_at is not None or "replied" in outcomes
                   else "lease_lost" if "lease_lost" in outcomes
                   else "acked" if acked else last.outcome)
        entry: dict[str, Any] = {
            "request_id": request_id, "job_id": last.job_id,
            "step_id": None if last.step_id == DISCOVERY else last.step_id,
            "attempt": last.attempt + 1, "forwards": len(forwards),
            **_worker(conn, run.app_name),
            "sent_to": _instances(state, [d.conn_id for d in acked]),
            "sent_at": forwards[0].sent_at,
            "acked_at": min((d.acked_at for d in acked if d.acked_at), default=None),
            "replied_at": replied_at,
            "reply_via": "+".join(vias.get(request_id, [])) or last.reply_via,
            "outcome": outcome, "ops": [], "result": None,
            "ended_at": replied_at,  # or when the executor gave up on it
        }
        if record is not None:
            status = record.response.status
            if status == pb.SDKResponseStatus.DONE:
                entry["result"] = "function returned"
            elif status == pb.SDKResponseStatus.ERROR:
                entry["result"] = "function error: " + (_error_text(_body(record.response)) or "")
            for op in _ops(record.response):
                code, step_id = str(op.get("op")), str(op.get("id", ""))
                name = op.get("displayName") or op.get("name")
                if code == "RunComplete":  # an SDK that checkpoints ends the run this way
                    entry["result"] = "function returned"
                if code not in _STEP_OPS:
                    continue
                entry["ops"].append({"op": code, "step_id": step_id, "name": name})
                step = steps.setdefault(step_id, _Step(step_id))
                step.name = step.name or (str(name) if name else None)
                if code in _RAN:
                    job_step.setdefault(last.job_id, step_id)
                    if len(entry["sent_to"]) > 1:
                        step.copies = entry["sent_to"]
                    step.attempts += 1
                    step.requests.append(request_id)
                    step.worker = _worker(conn, run.app_name)
                    step.started_at = step.started_at or entry["sent_at"]
                    step.ended_at = replied_at
                    step.reply_via = entry["reply_via"]
                if code in ("StepRun", "Step"):
                    step.status, step.error = "completed", None
                elif code == "StepFailed":
                    step.status, step.error = "failed", _error_text(op.get("error"))
                elif code == "StepError":
                    step.status, step.error = "retrying", _error_text(op.get("error"))
                    step.errors.append({"attempt": entry["attempt"], "worker": conn and
                                        conn.instance_id, "error": step.error})
                elif code in ("Sleep", "WaitForEvent", "InvokeFunction"):
                    step.status = "completed" if step_id in run.steps else code.lower()
                    step.started_at = step.started_at or replied_at
        elif outcome == "acked" and run.status.terminal:
            entry["result"] = "lost: no reply before the run ended"
        elif outcome == "acked":
            entry["result"] = "running"
            if conn is not None and conn.closed_at is not None:
                # The "why is it still running?" answer: its worker is gone.
                entry["note"] = (
                    f"{conn.instance_id}'s connection closed ({conn.close_class}); the reply "
                    "can still come on a new connection, else the step is retried once its "
                    f"lease lapses (leases last {state.config.lease_duration:g} s)")
        elif outcome in ("lease_lost", "forward_failed", "abandoned", "no_ack"):
            entry["result"] = "lost: " + ("worker stopped responding (lease expired)"
                                          if outcome == "lease_lost"
                                          else "no worker ACKed the request")
            entry["ended_at"] = gave_up.get((last.job_id, last.attempt))
        requests.append(entry)
    # Transport failures, error replies (a step handed back by a draining worker) and
    # in-flight requests: attribute them to the step their job ran.
    for entry in requests:
        result = entry["result"] or ""
        if entry["ops"] or not result.startswith(("running", "lost", "function error")):
            continue
        sid: str | None = entry["step_id"] or job_step.get(entry["job_id"])
        entry["step_id"] = sid
        if sid is None:
            continue
        step = steps.setdefault(sid, _Step(sid))
        entry["ops"] = [{"op": None, "step_id": sid, "name": step.name}]
        if entry["result"] == "running":
            step.status = "running"
            step.note = entry.get("note")
            step.worker = {k: entry[k] for k in ("conn_id", "worker", "app_version")}
            step.started_at = step.started_at or entry["sent_at"]
        else:
            step.attempts += 1
            step.errors.append({"attempt": entry["attempt"], "worker": entry["worker"],
                                "error": entry["result"]})
            # A step's time runs from its first attempt, retries included.
            step.started_at = min(t for t in (step.started_at, entry["sent_at"]) if t)
    # History names planned steps (parallel) before any request reports them, has the
    # steps an SDK checkpointed over HTTP while its request kept running, and when
    # sleeps began and how long they were.
    checkpointed_until: dict[str, float] = {}  # request_id -> its last checkpoint
    for h in run.history:
        kind, sid = h.get("type"), str(h.get("step"))
        if kind == "step_planned" and sid in steps:
            steps[sid].name = steps[sid].name or h.get("name")
        elif kind == "sleep" and sid in steps and isinstance(h.get("seconds"), int | float):
            steps[sid].started_at = h["ts"]
            steps[sid].ended_at = h["ts"] + h["seconds"] if sid in run.steps else None
        elif kind == "step_completed" and sid not in steps:
            step = steps[sid] = _Step(sid, name=h.get("name"), status="completed", attempts=1)
            step.ended_at = h.get("ts")
            step.reply_via = str(h.get("via") or "checkpoint")
            during = _request_at(requests, step.ended_at)
            if during is not None:
                # It ran after the request's previous checkpoint (or the request's start).
                step.started_at = checkpointed_until.get(during["request_id"],
                                                         during["acked_at"] or during["sent_at"])
                checkpointed_until[during["request_id"]] = h["ts"]
                step.requests.append(during["request_id"])
                step.worker = {k: during[k] for k in ("conn_id", "worker", "app_version")}
    for step in steps.values():
        step.errors.sort(key=lambda e: e["attempt"])
    running = [e for e in requests if e["result"] == "running" and e["step_id"] is None]
    ended = run.ended_at
    return {
        "run_id": run.run_id,
        "function": run.function_slug,
        "app": run.app_name,
        "status": run.status.value,
        "event": {"id": run.event.id, "name": run.event.name},
        "started_at": run.started_at,
        "ended_at": ended,
        "duration": (ended or time.time()) - run.started_at,
        "output": run.output,
        "error": _error_text(run.error),
        "steps": [s.to_json() for s in steps.values()],
        # Requests in flight whose step is not known yet (a discovery call running
        # the next step: its name comes with the reply).
        "running": running,
        "requests": requests,
    }


def _request_at(requests: list[dict[str, Any]], ts: float | None) -> dict[str, Any] | None:
    """The request that was running at ``ts`` (the one a checkpoint came from)."""
    if ts is None:
        return None
    found = None
    for req in requests:
        started = req["acked_at"] or req["sent_at"]
        if started <= ts and (req["replied_at"] is None or req["replied_at"] >= ts):
            found = req
    return found


def runs_view(state: DevState, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` runs, newest first."""
    runs = sorted(state.runs.values(), key=lambda r: r.started_at, reverse=True)[:limit]
    index = _Index.of(state)
    return [run_view(state, run, index) for run in runs]


def _finished(state: DevState) -> set[str]:
    return {d.request_id for d in state.dispatches
            if d.replied_at is not None or d.outcome in ("replied", "lease_lost")}


def connection_view(state: DevState, conn: ConnectionInfo, live: bool,
                    finished: set[str] | None = None) -> dict[str, Any]:
    in_flight = []
    finished = _finished(state) if finished is None else finished
    seen: set[str] = set()
    for d in reversed(state.dispatches):
        if d.request_id in seen or d.conn_id != conn.conn_id or d.request_id in finished:
            continue
        seen.add(d.request_id)
        if d.outcome == "acked" and d.replied_at is None:
            run = state.runs.get(d.run_id)
            in_flight.append({
                "request_id": d.request_id, "run_id": d.run_id, "function": d.function_slug,
                "step_id": None if d.step_id == DISCOVERY else d.step_id,
                "step": _step_name(run, d.step_id), "attempt": d.attempt + 1,
                "since": d.acked_at or d.sent_at,
            })
    return {
        "conn_id": conn.conn_id,
        "worker": conn.instance_id,
        "apps": conn.apps,
        "app_version": conn.app_version,
        "functions": conn.functions,
        "sdk": f"{conn.connect_request.sdk_language} {conn.connect_request.sdk_version}",
        "gateway_group": conn.gateway_group,
        "live": live,
        "status": conn.status.value,
        "phase": conn.phase.name,
        "paused": conn.paused,
        "gateway_closing_sent": conn.gateway_closing_sent,
        "connected_at": conn.connected_at,
        "closed_at": conn.closed_at,
        "close": (f"{conn.close_code} {conn.close_class}" if conn.close_code is not None
                  else None),
        "heartbeats": conn.heartbeats,
        "in_flight": list(reversed(in_flight)),
    }


def _step_name(run: Run | None, step_id: str) -> str | None:
    if step_id == DISCOVERY:
        return None
    for h in run.history if run else []:
        if h.get("step") == step_id and h.get("name"):
            return str(h["name"])
    return step_id[:12]


def connections_view(
    state: DevState, live_ids: set[str], limit: int = 50
) -> list[dict[str, Any]]:
    """Live connections first, then the most recently closed ones."""
    conns = sorted(state.connections.values(),
                   key=lambda c: (c.conn_id in live_ids, c.connected_at), reverse=True)
    finished = _finished(state)
    return [connection_view(state, c, c.conn_id in live_ids, finished) for c in conns[:limit]]
