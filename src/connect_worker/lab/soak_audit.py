"""The soak's audit: what the promise says (0 interrupted, 0 duplicates, 0 lost), checked
from evidence the worker under test does not write.

Evidence, and who writes it:

- the step bodies (the soak's app, ``lab/apps/soak.py``): one line when a copy of a body
  starts, one when it returns or is cancelled, each with the request id, the process id
  and a copy id; a SIGKILLed copy writes neither end nor cancellation. The copy id is also
  in the step's result, so a reply says which copy's result it carries;
- the gateway (our dev gateway's records): every forward and its outcome (ACKed, ACK not
  counted, lease lost), every reply it processed (socket or flush, with its body) and
  every reply it discarded, and each run's memoized step results;
- the soak's own fault log: each fault applied, when, and which replica it hit; when each
  replica was SIGKILLed or SIGTERMed, and its exit code (from the OS).

The worker's own log lines are never evidence here: a worker that vouched for itself
("I abandoned it", "my lease was lost") could hide the very bug the soak looks for.
"""

from __future__ import annotations

import json
import re
import signal
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..devserver import RunStatus
from .apps.soak import COPY_KEY
from .fleet import WorkerProcess, read_executions

if TYPE_CHECKING:
    from ..devserver import DevServer
    from .soak import SoakResult

# Faults that act on the whole gateway for a while (the others hit one replica).
GATEWAY_WIDE = frozenset({"withhold-ack", "gateway-restart", "flush-outage", "latency",
                          "slow-acks", "reply-close"})
# A fault explains a re-route or a lease lapse up to this long after it ended: the gateway
# gives up on a lease after lease + grace, and a replica reconnects with backoff.
CAUSE_WINDOW_EXTRA = 10.0
_COPY = re.compile(COPY_KEY.encode() + rb'\\*"\s*:\s*\\*"([0-9]+-[0-9]+)')


@dataclass
class Race:
    """A request whose body started more than once: the gateway re-routed it while the
    first replica's ACK was on the wire, or forwarded it again to the same replica."""

    request_id: str
    run_id: str
    step: str
    winner: str | None
    losers: list[str]
    loser_ran_for: list[float]  # seconds each cancelled losing copy ran
    ran_to_end_twice: bool


@dataclass
class Copy:
    """One copy of one step body, as the body itself recorded it."""

    copy: str
    pid: int
    request_id: str
    run_id: str
    step: str
    started: float
    ended: float | None = None
    cancelled: float | None = None
    landed: float | None = None  # when the gateway first processed this copy's reply

    @property
    def ran_to_end(self) -> bool:
        return self.ended is not None


@dataclass(frozen=True)
class Cause:
    """The fault that explains a copy, from the soak's fault log."""

    kind: str
    at: float
    replica: str | None  # None for a gateway-wide fault

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "at": round(self.at, 3), "replica": self.replica}


def copies_from(records: Iterable[dict[str, Any]]) -> list[Copy]:
    """The copies, in the order they started."""
    by_id: dict[str, Copy] = {}
    for r in records:
        copy_id = str(r.get("copy") or f"{r['pid']}-{r['request_id']}-{r['ts']}")
        if r.get("phase") == "start":
            by_id[copy_id] = Copy(copy_id, int(r["pid"]), str(r["request_id"]),
                                  str(r["run_id"]), str(r["step"]), float(r["ts"]))
    for r in records:
        found = by_id.get(str(r.get("copy")))
        if found is None:
            continue
        if r.get("phase") == "end":
            found.ended = float(r["ts"])
        elif r.get("phase") == "cancelled":
            found.cancelled = float(r["ts"])
    return sorted(by_id.values(), key=lambda c: c.started)


def copy_ids_in(data: Any) -> list[str]:
    """Copy ids in a reply body or a memoized step result (bytes, str or JSON)."""
    if isinstance(data, str):
        data = data.encode()
    elif not isinstance(data, bytes | bytearray):
        data = json.dumps(data, default=str).encode()
    return [m.decode() for m in _COPY.findall(bytes(data))]


class Evidence:
    """The gateway's records and the fault log, indexed for the audit."""

    def __init__(self, result: SoakResult, dev: DevServer, copies: list[Copy]) -> None:
        self.result = result
        self.by_pid = {w.pid: w for w in result.workers if w.started_at}
        self.instance_of = {c.conn_id: c.instance_id for c in dev.connections}
        by_instance = {w.instance_id: w for w in result.workers}
        self.worker_of_conn = {c: by_instance.get(i) for c, i in self.instance_of.items()}
        self.dispatches: dict[str, list[Any]] = defaultdict(list)
        self.job_dispatches: dict[str, list[Any]] = defaultdict(list)
        for d in dev.dispatches:
            self.dispatches[d.request_id].append(d)
            self.job_dispatches[d.job_id].append(d)
        self.discarded = [e for e in dev.timeline if e.kind == "REPLY_DISCARDED"]
        # Which copy each reply carries (its body); against Inngest's own server the
        # lab sees no bodies, so a reply counts for the copies of the replica that sent
        # it (socket: its connection; flush: the process that logged it) that started
        # before it.
        self.error_replies: dict[str, list[float]] = defaultdict(list)
        by_request: dict[str, list[Copy]] = defaultdict(list)
        for c in copies:
            by_request[c.request_id].append(c)
        by_copy = {c.copy: c for c in copies}
        for reply in sorted([*dev.replies, *dev.flushes], key=lambda r: r.ts):
            body = getattr(getattr(reply, "response", None), "body", None)
            if body is not None:
                found = [by_copy[i] for i in copy_ids_in(body) if i in by_copy]
                if not found:
                    self.error_replies[reply.request_id].append(reply.ts)
            else:
                worker = self.worker_of_conn.get(str(getattr(reply, "conn_id", None)))
                pid = getattr(reply, "pid", None) or (worker.pid if worker else None)
                found = [c for c in by_request[reply.request_id]
                         if (pid is None or c.pid == pid) and c.started <= reply.ts]
            for c in found:
                if c.landed is None:
                    c.landed = reply.ts
        # The copy whose result each run kept (memoized by the gateway).
        self.kept: set[str] = set()
        for run_id in result.run_ids:
            run = dev.runs.get(run_id)
            self.kept.update(copy_ids_in(getattr(run, "steps", None) or {}))

    # -- the fault log -----------------------------------------------------------------

    def replica(self, c: Copy) -> WorkerProcess | None:
        return self.by_pid.get(c.pid)

    def faults_on(self, worker: WorkerProcess) -> list[Cause]:
        """Every fault that hit ``worker``: SIGKILL, SIGTERM, socket faults."""
        name = worker.instance_id
        out = [Cause(a.fault.kind, a.started_at, name) for a in self.result.applied
               if name in a.hit and a.fault.kind in ("gateway-closing", "drop", "reply-close")]
        if worker.killed_at is not None:
            out.append(Cause("crash", worker.killed_at, name))
        if worker.signalled_at is not None:
            out.append(Cause("sigterm", worker.signalled_at, name))
        return out

    def cause(self, c: Copy, until: float) -> Cause | None:
        """The latest fault in force between ``c``'s start (less the window) and
        ``until``, on a replica ``c``'s request was forwarded to (``c``'s own included)
        or on the whole gateway."""
        since = c.started - self.result.settings.lease_duration - CAUSE_WINDOW_EXTRA
        replicas = {w.instance_id: w for w in (
            self.replica(c), *(self.worker_of_conn.get(d.conn_id)
                               for d in self.dispatches[c.request_id]))
            if w is not None and w.started_at}
        found = [f for w in replicas.values() for f in self.faults_on(w)
                 if since <= f.at <= until]
        found.extend(Cause(a.fault.kind, a.started_at, None) for a in self.result.applied
                     if a.fault.kind in GATEWAY_WIDE and a.started_at <= until
                     and a.started_at + a.fault.seconds >= since)
        return max(found, key=lambda f: f.at, default=None)

    def rerouted(self, c: Copy) -> float | None:
        """When the gateway forwarded ``c``'s request again after a forward whose ACK did
        not count (it came after the connection left READY, or not at all): from then on
        two replicas may run it, ``c``'s being either (the first to extend the lease
        keeps it; the other copy is cancelled when its extension is refused)."""
        forwards = self.dispatches[c.request_id]
        failed = [d for d in forwards if _failed(d, forwards)]
        if not failed or c.pid not in {self._pid_of_conn(d.conn_id) for d in forwards}:
            return None
        first = min(d.sent_at for d in failed)
        later = [d.sent_at for d in forwards if d.sent_at > first and d not in failed]
        return min(later, default=None)

    def lapsed(self, c: Copy) -> float | None:
        """When the gateway re-dispatched ``c``'s job after it declared the lease of a
        forward of ``c``'s request to ``c``'s replica lost."""
        lost = [d for d in self.dispatches[c.request_id]
                if getattr(d, "outcome", None) == "lease_lost"
                and self._pid_of_conn(d.conn_id) == c.pid]
        if not lost:
            return None
        job = lost[0].job_id
        later = [d.sent_at for d in self.job_dispatches[job]
                 if d.request_id != c.request_id and d.sent_at > lost[0].sent_at]
        return min(later, default=None)

    def redispatched_after(self, c: Copy, t: float) -> float | None:
        """The first forward of ``c``'s job (the same request re-routed, or a retry) to
        another replica after ``t``."""
        jobs = {d.job_id for d in self.dispatches[c.request_id]}
        later = [d.sent_at for j in jobs for d in self.job_dispatches[j]
                 if d.sent_at > t and self._pid_of_conn(d.conn_id) != c.pid]
        return min(later, default=None)

    def _pid_of_conn(self, conn_id: str) -> int | None:
        worker = self.worker_of_conn.get(conn_id)
        return worker.pid if worker is not None and worker.started_at else None


def _live_at(c: Copy, t: float) -> bool:
    """Whether copy ``c`` was in flight at ``t``: started, not cancelled, and its result
    not yet at the gateway (a body that ended but whose reply had not landed counts)."""
    return c.started < t and (c.cancelled is None or c.cancelled >= t) and \
        (c.landed is None or c.landed > t)


def explain(ev: Evidence, c: Copy) -> tuple[str, Cause | None, str]:
    """Why copy ``c`` (not the one whose result the run kept) ran: (class, cause, why).
    Class "unexplained" when the evidence explains nothing."""
    worker = ev.replica(c)
    if worker is not None and worker.killed_at is not None and \
            _live_at(c, worker.killed_at):
        return "crash", Cause("crash", worker.killed_at, worker.instance_id), \
            "in flight on a replica the soak SIGKILLed"
    if worker is not None and worker.signalled_at is not None and worker.returncode == 3 \
            and c.landed is None and c.started < (worker.exited_at or float("inf")) \
            and (c.cancelled is None or c.cancelled >= worker.signalled_at):
        if ev.redispatched_after(c, worker.signalled_at) is not None:
            return "abandoned", Cause("sigterm", worker.signalled_at, worker.instance_id), \
                "live at the drain deadline of a replica that exited 3; the gateway " \
                "dispatched the step again"
    rerouted = ev.rerouted(c)
    if rerouted is not None and not c.ran_to_end:
        cause = ev.cause(c, rerouted)
        if cause is not None:
            return "race", cause, "the gateway re-routed the request (an ACK did not " \
                "count) and this copy did not run to the end"
    lapsed = ev.lapsed(c)
    if lapsed is not None and not c.ran_to_end:
        cause = ev.cause(c, lapsed)
        if cause is not None:
            return "lapsed", cause, "the gateway declared its lease lost and retried; this " \
                "copy did not run to the end"
    if rerouted is not None and c.ran_to_end:
        return "unexplained", ev.cause(c, rerouted), "re-routed, and this copy ran to the end"
    return "unexplained", None, "no fault and no gateway record explains it"


def audit(result: SoakResult, dev: DevServer, exec_log: str) -> None:
    """Check the invariants (see docs/reliability.md) and fill in the counts."""
    statuses = Counter(dev.runs[r].status for r in result.run_ids)
    result.runs_completed = statuses[RunStatus.COMPLETED]
    result.runs_failed = statuses[RunStatus.FAILED] + statuses[RunStatus.CANCELLED]
    result.runs_unfinished = statuses[RunStatus.RUNNING]
    result.late_acks_ignored = sum(1 for e in dev.timeline if e.kind == "ACK_IGNORED")

    copies = copies_from(read_executions(exec_log))
    ev = Evidence(result, dev, copies)
    result.step_executions = len(copies)
    result.replies_discarded = len(ev.discarded)

    # Duplicates: per (run, step), every copy but the one whose result the run kept must
    # be explained by the fault log and the gateway's records.
    per_step: dict[tuple[str, str], list[Copy]] = defaultdict(list)
    for c in copies:
        per_step[(c.run_id, c.step)].append(c)
    classes: dict[str, tuple[str, Cause | None, str]] = {}
    for (run_id, step), runs in per_step.items():
        if len(runs) < 2:
            continue
        # Without the run's memos (Inngest's API does not show them): the copy whose
        # reply landed, and of those one that ran to the end (a cancelled copy's reply
        # carries no result), the first to land.
        kept = [c for c in runs if c.copy in ev.kept] or \
            [min(runs, key=lambda c: (c.landed is None, not c.ran_to_end,
                                      c.landed or 0.0, c.started))]
        unexplained = []
        for c in runs:
            if c is kept[0]:
                continue
            classes[c.copy] = found = explain(ev, c)
            result.duplicates[found[0]] += 1
            if found[0] == "unexplained":
                unexplained.append((c, found))
            else:
                result.explained.append({"run_id": run_id, "step": step,
                                         **_describe(ev, c, found, False)})
        if unexplained:
            result.unexplained.append({
                "run_id": run_id, "step": step,
                "copies": [_describe(ev, c, classes.get(c.copy), c is kept[0]) for c in runs]})

    # Re-route races: one request whose body started more than once.
    by_request: dict[str, list[Copy]] = defaultdict(list)
    for c in copies:
        by_request[c.request_id].append(c)
    for request_id, runs in by_request.items():
        if len(runs) < 2:
            continue
        # A copy that ended on a replica SIGKILLed before its reply landed lost its result
        # with the process: the crash explains it, not the race.
        finished = [c for c in runs if c.ran_to_end
                    and classes.get(c.copy, ("",))[0] not in ("crash", "abandoned")]
        winner = next((c for c in runs if c.copy in ev.kept), finished[0] if finished else None)
        losers = [c for c in runs if c is not winner]
        result.races.append(Race(
            request_id=request_id, run_id=runs[0].run_id, step=runs[0].step,
            winner=_name(ev, winner.pid) if winner else None,
            losers=[_name(ev, c.pid) for c in losers],
            loser_ran_for=[round(c.cancelled - c.started, 3) for c in losers
                           if c.cancelled is not None],
            ran_to_end_twice=len(finished) > 1,
        ))

    # Replies: a copy that ran to the end had its result reach the gateway, unless a fault
    # took it (its replica SIGKILLed, or drained to exit 3) and the step then ran again
    # and another copy's result reached the gateway.
    for runs in per_step.values():
        landed_later = {c.copy for c in runs if c.landed is not None}
        for c in runs:
            if not c.ran_to_end or c.landed is not None:
                continue
            cls = classes.get(c.copy, ("unexplained",))[0]
            if cls in ("crash", "abandoned") and landed_later:
                continue
            worker = ev.replica(c)
            result.lost_replies.append(c.request_id)
            result.lost.append({
                **_describe(ev, c, classes.get(c.copy), False),
                "exit_code": worker.returncode if worker else None,
                "discarded_by_gateway": [round(e.ts, 3) for e in ev.discarded
                                         if e.request_id == c.request_id],
            })

    # Abandoned steps: from the gateway's side, how soon after the SIGTERM it dispatched
    # each again, and how many got a reply without a result (the hand-back's error reply).
    abandoned = [c for c in copies if classes.get(c.copy, ("",))[0] == "abandoned"]
    result.abandoned = len(abandoned)
    for c in abandoned:
        worker = ev.replica(c)
        assert worker is not None and worker.signalled_at is not None
        if any(t > worker.signalled_at for t in ev.error_replies.get(c.request_id, [])):
            result.handed_back += 1
        again = ev.redispatched_after(c, worker.signalled_at)
        if again is not None:
            result.retry_after_sigterm.append(round(again - worker.signalled_at, 3))

    _audit_exits(result, ev, copies)


def _audit_exits(result: SoakResult, ev: Evidence, copies: list[Copy]) -> None:
    """Every SIGTERMed replica exited 0, or 3 (the drain deadline passed with steps live:
    documented, and no work is lost when every step it held ran again elsewhere)."""
    conns = Counter(ev.instance_of.values())
    ran_in = Counter(c.pid for c in copies)
    for w in result.workers:
        if not w.started_at:
            continue
        if w.killed_at is not None:
            result.exit_codes["SIGKILL"] += 1
            continue
        if w.signalled_at is None:
            continue
        code = w.returncode
        if code == -signal.SIGTERM and not conns[w.instance_id] and not ran_in[w.pid]:
            # SIGTERM before the interpreter reached our handler (the first ~0.1 s after
            # exec, longer under load): the default action ends the process. It never
            # connected and ran nothing, so nothing can be lost. A platform does this too
            # when a deploy is superseded while its replica starts.
            result.exit_codes["SIGTERM before start"] += 1
            continue
        result.exit_codes[str(code)] += 1
        if w.exited_at is not None:
            result.drain_seconds.append(round(w.exited_at - w.signalled_at, 3))
        if code == 3:
            held = [c for c in copies if c.pid == w.pid and c.landed is None
                    and (w.exited_at is None or c.started < w.exited_at)
                    and (c.cancelled is None or c.cancelled >= w.signalled_at)]
            if not held:
                result.bad_exits.append(f"{w.instance_id} exited 3 but held no step at its "
                                        "exit (no copy without a result at the gateway)")
            for c in held:
                if ev.redispatched_after(c, w.signalled_at) is None:
                    result.bad_exits.append(
                        f"{w.instance_id} exited 3 and its step {c.run_id}/{c.step} "
                        f"(request {c.request_id}) was never dispatched again")
        elif code != 0:
            result.bad_exits.append(f"{w.instance_id} exited {code} after SIGTERM")


def _failed(d: Any, forwards: list[Any]) -> bool:
    """Whether forward ``d`` did not count. Our gateway records it; through the proxy in
    front of Inngest's own server (no outcome seen) a forward counts as failed when the
    same request was forwarded again to another connection after it."""
    outcome = getattr(d, "outcome", "unknown")
    if outcome != "unknown":
        return bool(outcome == "forward_failed")
    return any(o.sent_at > d.sent_at and o.conn_id != d.conn_id for o in forwards)


def _name(ev: Evidence, pid: int) -> str:
    worker = ev.by_pid.get(pid)
    return worker.instance_id if worker else f"pid {pid}"


def _describe(ev: Evidence, c: Copy, found: tuple[str, Cause | None, str] | None,
              kept: bool) -> dict[str, Any]:
    """One copy, for the report: enough to rebuild its timeline."""
    worker = ev.replica(c)
    out: dict[str, Any] = {
        "replica": _name(ev, c.pid), "request_id": c.request_id, "copy": c.copy,
        "started": c.started, "ended": c.ended, "cancelled": c.cancelled,
        "landed": c.landed, "ran_to_end": c.ran_to_end, "kept": kept,
        "signalled_at": worker.signalled_at if worker else None,
        "killed_at": worker.killed_at if worker else None,
        "forwards": [{"conn_id": d.conn_id, "sent_at": d.sent_at, "acked_at": d.acked_at,
                      "outcome": getattr(d, "outcome", None),
                      "replica": _name(ev, ev._pid_of_conn(d.conn_id) or 0)}
                     for d in ev.dispatches[c.request_id]],
    }
    if found is not None:
        out["class"], cause, out["why"] = found
        out["cause"] = cause.to_json() if cause else None
    return out
