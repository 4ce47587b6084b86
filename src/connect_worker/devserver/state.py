"""Everything the devserver records, in one place, plus the change signal that
``DevServer.wait_for`` waits on.

Every mutation that a test might wait for calls :meth:`DevState.notify`; waiters
re-evaluate their predicate on each notification (no polling).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from ..protocol import pb
from .config import DevServerConfig

log = logging.getLogger(__name__)


class Phase(enum.IntEnum):
    """In-memory phase of one gateway connection (gateway_phase.go); only moves forward."""

    NEW = 0
    HANDSHAKING = 1
    READY = 2
    DRAINING = 3
    DISCONNECTING = 4
    CLOSED = 5


class ConnStatus(enum.Enum):
    """The Redis-visible connection status the router reads."""

    CONNECTED = "CONNECTED"
    READY = "READY"
    DRAINING = "DRAINING"
    DISCONNECTING = "DISCONNECTING"
    DISCONNECTED = "DISCONNECTED"


class RunStatus(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self is not RunStatus.RUNNING


@dataclass
class ConnectionInfo:
    conn_id: str
    instance_id: str
    gateway_group: str
    env: str
    connect_request: pb.WorkerConnectRequestData
    start_headers: dict[str, str]
    manual_readiness: bool
    apps: list[str]
    app_version: dict[str, str]
    functions: dict[str, list[str]]  # app name -> function slugs
    group_hashes: dict[str, str]  # app name -> worker group hash
    max_worker_concurrency: int | None
    status: ConnStatus = ConnStatus.CONNECTED
    phase: Phase = Phase.HANDSHAKING
    connected_at: float = field(default_factory=time.time)
    last_heartbeat: float = field(default_factory=time.monotonic)
    heartbeats: int = 0
    paused: bool = False
    gateway_closing_sent: bool = False
    close_code: int | None = None
    close_reason: str | None = None
    # "WORKER_SHUTDOWN" (1000 + that reason), "UNEXPECTED" (empty reason), the
    # reason verbatim otherwise, or "GATEWAY:<reason>" when the gateway closed it.
    close_class: str | None = None
    closed_at: float | None = None

    def set_phase(self, phase: Phase) -> bool:
        """Move forward only; return True if the phase changed."""
        if phase <= self.phase:
            return False
        self.phase = phase
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "instance_id": self.instance_id,
            "gateway_group": self.gateway_group,
            "env": self.env,
            "status": self.status.value,
            "phase": self.phase.name,
            "manual_readiness": self.manual_readiness,
            "apps": self.apps,
            "app_version": self.app_version,
            "functions": self.functions,
            "group_hashes": self.group_hashes,
            "max_worker_concurrency": self.max_worker_concurrency,
            "sdk_language": self.connect_request.sdk_language,
            "sdk_version": self.connect_request.sdk_version,
            "connected_at": self.connected_at,
            "heartbeats": self.heartbeats,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
            "close_class": self.close_class,
        }


@dataclass
class Dispatch:
    """One GATEWAY_EXECUTOR_REQUEST write (one forward attempt of one request)."""

    request_id: str
    job_id: str
    run_id: str
    function_slug: str
    step_id: str
    attempt: int
    conn_id: str
    forward_attempt: int
    sent_at: float
    acked_at: float | None = None
    replied_at: float | None = None
    reply_via: str | None = None
    # "acked", "no_ack", "forward_failed", "replied", "lease_lost", "abandoned"
    outcome: str | None = None


@dataclass
class ReplyRecord:
    ts: float
    via: str  # "ws" or "flush"
    conn_id: str | None
    request_id: str
    response: pb.SDKResponse
    stored: bool  # True if this one went into the (set-if-absent) buffer
    acked: bool = False


@dataclass
class StartCall:
    ts: float
    headers: dict[str, str]
    exclude_gateways: list[str]
    status: int
    env: str | None = None
    connection_id: str | None = None
    gateway_group: str | None = None


@dataclass
class SyncRecord:
    """One app sync (the in-process ``/fn/register``): a new worker group appeared."""

    ts: float
    app: str
    group_hash: str
    conn_id: str
    changed: bool  # the app's function configuration differs from before


@dataclass
class TimelineEntry:
    ts: float
    direction: str  # "in" (worker -> devserver) or "out"
    kind: str
    conn_id: str | None = None
    request_id: str | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "direction": self.direction,
            "kind": self.kind,
            "conn_id": self.conn_id,
            "request_id": self.request_id,
            "detail": self.detail,
        }


@dataclass
class Event:
    id: str
    name: str
    data: Any
    ts: int
    user: dict[str, Any] = field(default_factory=dict)
    v: str | None = None
    run_ids: list[str] = field(default_factory=list)

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "data": self.data,
            "id": self.id,
            "ts": self.ts,
            "user": self.user,
        }
        if self.v is not None:
            out["v"] = self.v
        return out


@dataclass
class QueueItem:
    run_id: str
    step_id: str  # "step" (discovery) or a hashed step ID (targeted)
    job_id: str
    attempt: int = 0
    # Bumped on every dispatch of this item; SDKs echo it in async checkpoints so a
    # checkpoint from an abandoned dispatch is refused (409), as Inngest's queue does.
    generation: int = 0


@dataclass
class Run:
    run_id: str
    function_slug: str
    app_name: str
    event: Event
    events: list[Event]
    max_attempts: int
    status: RunStatus = RunStatus.RUNNING
    output: Any = None
    error: Any = None
    # Memoized step outputs by hashed step ID, and the order they completed in.
    steps: dict[str, Any] = field(default_factory=dict)
    stack: list[str] = field(default_factory=list)
    version: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    parent_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "function_slug": self.function_slug,
            "app_name": self.app_name,
            "event_id": self.event.id,
            "event": self.event.to_payload(),
            "status": self.status.value,
            "output": self.output,
            "error": self.error,
            "steps": self.steps,
            "stack": self.stack,
            "history": self.history,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }


Predicate = bool | Callable[[str], bool]


def check(flag: Predicate, request_id: str) -> bool:
    """Evaluate a fault flag that may be a bool or a per-request callable."""
    if callable(flag):
        return bool(flag(request_id))
    return bool(flag)


@dataclass
class Faults:
    """Fault injection knobs. Each affects behaviour from the moment it is set."""

    # WORKER_REPLY: persist it but never write WORKER_REPLY_ACK.
    withhold_reply_ack: Predicate = False
    # WORKER_REPLY: write the ACK this many seconds late.
    delay_reply_ack: float = 0.0
    # WORKER_REPLY: read the frame and drop it (not persisted, not ACKed): the
    # gateway's "reply read, then socket closed" window (§5.3).
    drop_replies: Predicate = False
    # WORKER_REPLY: process it this many seconds after reading it, and discard it
    # if the socket closed in the meantime (the "reply read, then socket
    # closed" race of §5.3, for workers that close right after their last reply).
    reply_close_race: float = 0.0
    # WORKER_REQUEST_EXTEND_LEASE: answer with a NACK (no new_lease_id).
    nack_extensions: Predicate = False
    # WORKER_REQUEST_EXTEND_LEASE: apply the extension but write no ACK.
    withhold_extend_ack: Predicate = False
    # WORKER_REQUEST_EXTEND_LEASE: write the ACK this many seconds late.
    delay_extend_ack: float = 0.0
    # WORKER_REQUEST_ACK: process it this many seconds late, so a WORKER_PAUSE
    # read just after it wins the race (the gateway handles control and data
    # frames on different goroutines, §5.2).
    delay_request_ack: float = 0.0
    # Status codes returned by the next start calls (consumed one per call).
    start_failures: list[int] = field(default_factory=list)
    start_delay: float = 0.0
    # Next WORKER_CONNECT gets SYNC_FAILED{code, message} + close 1008 reason=code.
    sync_failure: tuple[str, str] | None = None
    # Keep failing every sync (a function configuration the API always rejects).
    sync_failure_persistent: bool = False
    sync_delay: float = 0.0
    # Router override: given candidate conn IDs, return the one to use (or None
    # to fall back to the weighted random pick).
    route: Callable[[list[str]], str | None] | None = None
    # The next N forwards go to two different READY connections at once (a re-route
    # whose ACK was in flight, a slow replica): the first ACK owns the lease, the
    # other copy runs too but its lease extensions are NACKed, like the loser of a
    # re-route race. Decremented per forward that found a second connection.
    dual_dispatch: int = 0
    # A whole-gateway restart (DevServer.restart_gateway drops every socket): until
    # this time.monotonic(), /v0/connect/start answers 503 and upgrades are refused.
    gateway_down_until: float = 0.0
    # /v0/connect/flush answers 503 until this time.monotonic() (DevServer.fail_flush).
    flush_failing_until: float = 0.0
    # Seconds added to every frame in each direction, like a slow network: frames keep
    # their order, and a frame in flight when the socket drops is lost.
    frame_latency: float = 0.0

    def gateway_down(self) -> bool:
        return time.monotonic() < self.gateway_down_until


class DevState:
    """Records + change notification. Shared by every devserver component."""

    def __init__(self, config: DevServerConfig) -> None:
        self.config = config
        self.faults = Faults()
        self.connections: dict[str, ConnectionInfo] = {}
        self.dispatches: list[Dispatch] = []
        self.replies: list[ReplyRecord] = []
        self.flushes: list[ReplyRecord] = []
        self.start_calls: list[StartCall] = []
        self.timeline: list[TimelineEntry] = []
        self.runs: dict[str, Run] = {}
        self.events: dict[str, Event] = {}
        # app name -> function slug -> function config (last sync wins)
        self.functions: dict[str, dict[str, dict[str, Any]]] = {}
        # worker group hash -> creation time (deleted with its last connection)
        self.groups: dict[str, float] = {}
        self.syncs: list[SyncRecord] = []
        self.errors: list[str] = []
        self._changed = asyncio.Event()
        self._timeline_file: TextIO | None = None
        self._closed = False

    def close(self) -> None:
        self._closed = True
        if self._timeline_file is not None:
            self._timeline_file.close()
            self._timeline_file = None

    # -- change signal -------------------------------------------------------

    def notify(self) -> None:
        """Wake every waiter; they re-check their predicates."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Return once ``predicate()`` is true; TimeoutError after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s")
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                if predicate():
                    return
                raise TimeoutError(f"condition not met within {timeout}s") from None

    # -- recording -----------------------------------------------------------

    def record(
        self,
        direction: str,
        kind: str,
        conn_id: str | None = None,
        request_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        entry = TimelineEntry(time.time(), direction, kind, conn_id, request_id or None, detail)
        self.timeline.append(entry)
        path = self.config.timeline_path
        if path and self._timeline_file is None and not self._closed:
            self._timeline_file = open(path, "a", encoding="utf-8")
        if self._timeline_file is not None:
            self._timeline_file.write(json.dumps(entry.to_json()) + "\n")
            self._timeline_file.flush()
        self.notify()

    def error(self, message: str) -> None:
        """Something a test should know about went wrong inside the devserver."""
        log.warning("devserver: %s", message)
        self.errors.append(message)
        self.notify()

    # -- queries -------------------------------------------------------------

    def dispatch_counts_by_job(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.dispatches:
            counts[d.job_id] = counts.get(d.job_id, 0) + 1
        return counts

    def dispatch_counts_by_step(self) -> dict[tuple[str, str], int]:
        """Dispatches per (run_id, step_id), where step_id is "step" or a targeted ID."""
        counts: dict[tuple[str, str], int] = {}
        for d in self.dispatches:
            key = (d.run_id, d.step_id)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def step_executions(self) -> dict[tuple[str, str], int]:
        """How many distinct requests reported running each (run_id, hashed step ID).

        Counts StepRun/StepError/StepFailed opcodes over every reply received
        (WebSocket and flush, stored or not), deduplicated by request_id. A value
        above 1 for a StepRun means the step body ran more than once.
        """
        seen: set[tuple[str, str, str]] = set()
        by_request = {d.request_id: d.run_id for d in self.dispatches}
        for rec in [*self.replies, *self.flushes]:
            if rec.response.status != pb.SDKResponseStatus.NOT_COMPLETED:
                continue
            run_id = by_request.get(rec.request_id, rec.response.run_id)
            try:
                ops = json.loads(rec.response.body or b"[]")
            except ValueError:
                continue
            if not isinstance(ops, list):
                continue
            for op in ops:
                if isinstance(op, dict) and op.get("op") in ("StepRun", "StepError", "StepFailed"):
                    seen.add((run_id, str(op.get("id")), rec.request_id))
        counts: dict[tuple[str, str], int] = {}
        for run_id, step, _ in seen:
            counts[(run_id, step)] = counts.get((run_id, step), 0) + 1
        return counts

    def dump(self) -> str:
        """A human-readable summary for timeout errors."""
        lines = ["devserver state:"]
        lines.extend(
            f"  conn {c.conn_id} inst={c.instance_id} {c.status.value}/{c.phase.name}"
            f" apps={c.functions} close={c.close_code} {c.close_reason!r}"
            for c in self.connections.values()
        )
        for r in self.runs.values():
            lines.append(f"  run {r.run_id} {r.function_slug} {r.status.value} err={r.error!r}")
            lines.extend(f"    {h}" for h in r.history[-8:])
        lines.extend(
            f"  dispatch {d.request_id} job={d.job_id} step={d.step_id} att={d.attempt}"
            f" conn={d.conn_id} outcome={d.outcome}"
            for d in self.dispatches[-12:]
        )
        lines.extend(f"  error: {e}" for e in self.errors[-10:])
        lines.extend(
            f"  {t.ts:.3f} {t.direction} {t.kind} conn={t.conn_id} req={t.request_id}"
            for t in self.timeline[-25:]
        )
        return "\n".join(lines)
