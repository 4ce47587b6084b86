"""The executor and the Connect proxy: turn events into runs and drive each run
step by step over the gateway, like Inngest's executor (spec §5.2, §5.9).

Per queue item (a discovery call ``step_id="step"`` or a targeted planned step):
new request_id per dispatch, stable job_id across retries, attempt counting per
item. Per dispatch (the proxy): lease, route, forward and wait for the ACK (up
to ``forward_attempts`` times), then wait for the reply while checking the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..protocol import pb
from ..protocol.durations import parse_go_duration
from . import logfmt
from .core import ACCOUNT_ID, ENV_ID, Core, app_uuid, function_uuid
from .gateway import Gateway
from .state import Dispatch, Event, Run, RunStatus
from .ulid import new_ulid

log = logging.getLogger(__name__)

STOPPED_RESPONDING = "connect_worker_stopped_responding"
ROUTE_FAILED = "failed to route request to gateway"

# The opcodes of Inngest's executor (pkg/enums/opcode.go, handleGeneratorOp). Anything else
# in an SDK response is a protocol error: logged, recorded in the run, and retried like
# any executor error, never silently dropped.
KNOWN_OPCODES = frozenset({
    "None", "Step", "StepRun", "StepError", "StepPlanned", "Sleep", "WaitForEvent",
    "InvokeFunction", "AIGateway", "Gateway", "WaitForSignal", "RunComplete", "StepFailed",
    "SyncRunComplete", "DiscoveryRequest", "DeferAdd", "DeferAbort",
})
# Opcodes the dev gateway knows but does not run (they need services it does not have).
UNSUPPORTED_OPCODES = frozenset({"AIGateway", "Gateway", "WaitForSignal", "SyncRunComplete"})
# Opcodes an SDK may checkpoint while it keeps running (enums.OpcodeIsSync); the async
# checkpoint endpoint stores only steps and lazy ops (checkpoint.go: checkpointAsyncSteps).
SYNC_OPCODES = frozenset({
    "Step", "StepRun", "StepPlanned", "RunComplete", "SyncRunComplete", "StepFailed",
    "DeferAdd", "DeferAbort",
})
# Piggybacked on a host op; they never count as parallel steps (enums.OpcodeIsLazy).
LAZY_OPCODES = frozenset({"DeferAdd", "DeferAbort"})
# Handled before the others of a response (enums.OpcodeIsPriority).
PRIORITY_OPCODES = frozenset({"WaitForEvent", "DeferAdd", "DeferAbort"})
DEFERRED_EVENT = "inngest/deferred.schedule"


class CheckpointRejected(Exception):
    """A checkpoint the API refuses: ``status`` is the HTTP status Inngest's API uses."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
class Defer:
    """A deferred run scheduled by DeferAdd; started when the parent run finishes."""

    fn_slug: str
    input: dict[str, Any]
    status: str = "after_run"  # or "aborted"


@dataclass
class ProxyResult:
    response: pb.SDKResponse | None
    error: str | None  # transport-level step error (syscode or message)


def _trace_ctx() -> bytes:
    trace = new_ulid().lower().rjust(32, "0")[:32]
    span = new_ulid().lower()[-16:]
    # Only the traceparent: the propagator leaves out an empty tracestate.
    return json.dumps({"traceparent": f"00-{trace}-{span}-01"}).encode()


def _user_trace_ctx(run_id: str, app_id: str, function_id: str) -> bytes:
    """As Inngest sends it: the run's trace (one trace id for all its steps, on whatever
    worker they run), a new parent span per request, and Inngest's app and function IDs in
    the tracestate (trace.HeadersFromTraceState; the real one may add inngest@traceref)."""
    trace = hashlib.sha256(run_id.encode()).hexdigest()[:32]
    span = hashlib.sha256(new_ulid().encode()).hexdigest()[:16]
    return json.dumps({"traceparent": f"00-{trace}-{span}-01",
                       "tracestate": f"inngest@fn={function_id},inngest@app={app_id}"}).encode()


def _max_attempts(config: dict[str, Any], default_retries: int) -> int:
    """retries + 1, from the function config's ``steps.*.retries.attempts`` if present."""
    steps = config.get("steps")
    if isinstance(steps, dict):
        for step in steps.values():
            retries = step.get("retries") if isinstance(step, dict) else None
            if isinstance(retries, dict) and isinstance(retries.get("attempts"), int):
                return int(retries["attempts"]) + 1
    return default_retries + 1


def _matches(trigger: Any, name: str) -> bool:
    if not isinstance(trigger, dict):
        return False
    pattern = trigger.get("event")
    if not isinstance(pattern, str):
        return False
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


def _parse_wake(name: str, opts: Any) -> float:
    """Seconds from now until a Sleep op's wake time (ISO time or Go-ish duration)."""
    text = name
    if isinstance(opts, dict) and isinstance(opts.get("duration"), str):
        text = opts["duration"]
    with contextlib.suppress(ValueError):
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return max(0.0, when.timestamp() - time.time())
    with contextlib.suppress(ValueError):
        return max(0.0, parse_go_duration(text))
    return 0.0


def _opcodes(body: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The opcode list of a NOT_COMPLETED reply or a checkpoint, or what is wrong with it."""
    if not isinstance(body, list) or not body:
        return [], f"expected a non-empty list of opcodes, got {_preview(body)}"
    for op in body:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            return [], f"opcode without an 'op' name: {_preview(op)}"
        if op["op"] not in KNOWN_OPCODES:
            return [], (f"unknown opcode {op['op']!r} (known: {', '.join(sorted(KNOWN_OPCODES))})")
    return body, None


def _ordered(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Priority ops first (as Inngest's executor), RunComplete after every other op."""
    return sorted(ops, key=lambda op: (op["op"] not in PRIORITY_OPCODES) + 2 * (
        op["op"] == "RunComplete"))


def _preview(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


class Executor:
    def __init__(self, core: Core, gateway: Gateway) -> None:
        self.core = core
        self.state = core.state
        self.config = core.config
        self.gateway = gateway
        self._tasks: set[asyncio.Task[None]] = set()
        self._event_waiters: list[tuple[str, asyncio.Future[Event]]] = []
        # Queue items being executed, by job ID (async checkpoints name theirs).
        self._live: dict[str, QueueItem] = {}
        # Runs that reported parallel steps: every later step is planned first.
        self._force_plan: set[str] = set()
        self._defers: dict[str, dict[str, Defer]] = {}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for run in self.state.runs.values():
            if run.status is RunStatus.RUNNING:
                run.status = RunStatus.CANCELLED
                run.ended_at = time.time()

    # -- events and runs -------------------------------------------------------

    def receive_event(self, raw: dict[str, Any]) -> Event:
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("event needs a non-empty 'name'")
        data = raw.get("data") or {}
        user = raw.get("user") if isinstance(raw.get("user"), dict) else {}
        ts = raw.get("ts")
        event = Event(
            id=str(raw.get("id") or new_ulid()),
            name=name,
            data=data,
            ts=int(ts) if isinstance(ts, int | float) and ts else int(time.time() * 1000),
            user=user or {},
            v=str(raw["v"]) if raw.get("v") is not None else None,
        )
        self.state.events[event.id] = event
        for name_wanted, fut in list(self._event_waiters):
            if _matches({"event": name_wanted}, name) and not fut.done():
                fut.set_result(event)
        for app, fns in self.state.functions.items():
            for slug, config in fns.items():
                if any(_matches(t, name) for t in config.get("triggers") or []):
                    run = self.start_run(app, slug, event)
                    event.run_ids.append(run.run_id)
        self.state.notify()
        log.info("event received: %s id %s, runs started: %s", name, event.id,
                 ", ".join(event.run_ids) or "none (no synced function has this trigger)")
        return event

    def invoke(self, slug: str, data: Any) -> Run:
        for app, fns in self.state.functions.items():
            if slug in fns:
                event = Event(new_ulid(), "inngest/function.invoked", data,
                              int(time.time() * 1000))
                self.state.events[event.id] = event
                run = self.start_run(app, slug, event)
                event.run_ids.append(run.run_id)
                return run
        raise KeyError(slug)

    def start_run(self, app: str, slug: str, event: Event, parent: str | None = None) -> Run:
        config = self.state.functions[app][slug]
        run = Run(
            run_id=new_ulid(),
            function_slug=slug,
            app_name=app,
            event=event,
            events=[event],
            max_attempts=_max_attempts(config, self.config.default_retries),
            parent_run_id=parent,
        )
        self.state.runs[run.run_id] = run
        self._history(run, "run_started", event=event.name)
        log.info("run started: %s run %s (%s attempts per step)", slug, run.run_id,
                 run.max_attempts)
        task = asyncio.create_task(self._drive(run), name=f"run-{run.run_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    def cancel_run(self, run_id: str) -> bool:
        run = self.state.runs.get(run_id)
        if run is None or run.status.terminal:
            return False
        for task in self._tasks:
            if task.get_name() == f"run-{run_id}":
                task.cancel()
        self._finish(run, RunStatus.CANCELLED)
        return True

    def _history(self, run: Run, kind: str, **fields: Any) -> None:
        run.history.append({"ts": time.time(), "type": kind, **fields})
        self.state.notify()

    def _finish(
        self, run: Run, status: RunStatus, *, output: Any = None, error: Any = None
    ) -> None:
        if run.status.terminal:
            return
        run.status = status
        run.output = output
        run.error = error
        run.ended_at = time.time()
        self._history(run, f"run_{status.value}", output=output, error=error)
        self._force_plan.discard(run.run_id)
        if status in (RunStatus.COMPLETED, RunStatus.FAILED):
            self._start_defers(run)
        self._defers.pop(run.run_id, None)
        log.info("run %s: %s run %s in %.2f s%s", status.value, run.function_slug, run.run_id,
                 run.ended_at - run.started_at, logfmt.error(error, ": "))

    # -- driving a run ---------------------------------------------------------

    async def _drive(self, run: Run) -> None:
        items = [QueueItem(run.run_id, "step", new_ulid())]
        try:
            while items and not run.status.terminal:
                # Planned (parallel) steps run concurrently; discovery resumes
                # once all of them finished.
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._execute_item(run, it)) for it in items]
                nxt: list[QueueItem] = []
                discovery = False
                for task in tasks:
                    for item in task.result():
                        if item.step_id == "step":
                            discovery = True
                        else:
                            nxt.append(item)
                if discovery:
                    nxt.append(QueueItem(run.run_id, "step", new_ulid()))
                items = nxt
            if not run.status.terminal:
                # All branches ended without a final result (should not happen).
                self._finish(run, RunStatus.FAILED, error={"message": "run stalled"})
        except asyncio.CancelledError:
            self._finish(run, RunStatus.CANCELLED)
            raise
        except Exception as exc:
            log.exception("executor failed on run %s", run.run_id)
            self.state.error(f"executor crashed on run {run.run_id}: {exc!r}")
            self._finish(run, RunStatus.FAILED, error={"message": f"devserver error: {exc!r}"})

    async def _backoff(self, retry_after: str | None = None) -> None:
        delay = self.config.retry_backoff
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = float(retry_after)
            with contextlib.suppress(ValueError):
                when = datetime.fromisoformat(retry_after.replace("Z", "+00:00"))
                delay = when.timestamp() - time.time()
            delay = min(max(delay, 0.0), 3600.0)
        await asyncio.sleep(delay)

    async def _execute_item(self, run: Run, item: QueueItem) -> list[QueueItem]:
        """Run one queue item to completion (with retries); return the items it enqueues."""
        self._live[item.job_id] = item
        try:
            return await self._run_item(run, item)
        finally:
            self._live.pop(item.job_id, None)

    async def _run_item(self, run: Run, item: QueueItem) -> list[QueueItem]:
        while not run.status.terminal:
            result = await self._proxy(run, item)
            if result.response is None:
                self._history(run, "step_error", step_id=item.step_id, attempt=item.attempt,
                              job_id=item.job_id, error=result.error)
                if item.attempt + 1 < run.max_attempts:
                    item.attempt += 1
                    log.info("retrying %s of run %s (attempt %d of %d): %s",
                             logfmt.step(run, item.step_id), run.run_id, item.attempt + 1,
                             run.max_attempts, result.error)
                    await self._backoff()
                    continue
                error = {"name": "StepError", "message": result.error}
                self._finish(run, RunStatus.FAILED, error=error)
                return []
            resp = result.response
            if resp.request_version:
                run.version = resp.request_version
            body: Any
            try:
                body = json.loads(resp.body) if resp.body else None
            except ValueError:
                body = resp.body.decode("utf-8", "replace")
            if resp.status == pb.SDKResponseStatus.DONE:
                self._finish(run, RunStatus.COMPLETED, output=body)
                return []
            if resp.status == pb.SDKResponseStatus.ERROR:
                self._history(run, "function_error", step_id=item.step_id,
                              attempt=item.attempt, error=body, no_retry=resp.no_retry)
                if resp.no_retry or item.attempt + 1 >= run.max_attempts:
                    self._finish(run, RunStatus.FAILED, error=body)
                    return []
                item.attempt += 1
                log.info("retrying run %s (attempt %d of %d): the function raised %s",
                         run.run_id, item.attempt + 1, run.max_attempts, logfmt.error(body))
                await self._backoff(resp.retry_after if resp.HasField("retry_after") else None)
                continue
            # NOT_COMPLETED: a list of opcodes.
            ops, problem = _opcodes(body)
            if problem is not None:
                if self._protocol_error(run, item, problem):
                    await self._backoff()
                    continue
                return []
            produced: list[QueueItem] = []
            retry_same = False
            if sum(op["op"] not in LAZY_OPCODES for op in ops) > 1:
                # Parallel steps: from now on every step is planned, not run at once
                # (Inngest's ForceStepPlan -> ctx.disable_immediate_execution).
                self._force_plan.add(run.run_id)
            if all(op["op"] == "None" and not op.get("id") for op in ops):
                # Only empty no-ops cannot advance the run: re-drive discovery.
                log.warning("run %s: response held only empty None ops; re-driving discovery",
                            run.run_id)
                self._history(run, "redrive", step_id=item.step_id, reason="only empty None ops")
                return [QueueItem(run.run_id, "step", "")]
            for op in _ordered(ops):
                more, retry = await self._handle_op(run, item, op)
                produced.extend(more)
                retry_same = retry_same or retry
            if all(op["op"] in LAZY_OPCODES for op in ops) and not run.status.terminal:
                # Lazy ops without a host op would leave the run with nothing queued.
                produced.append(QueueItem(run.run_id, "step", ""))
            if retry_same:
                if item.attempt + 1 < run.max_attempts:
                    item.attempt += 1
                    log.info("retrying a step of run %s (attempt %d of %d): it raised an error",
                             run.run_id, item.attempt + 1, run.max_attempts)
                    await self._backoff(resp.retry_after if resp.HasField("retry_after") else None)
                    continue
                self._finish(run, RunStatus.FAILED, error={"message": "step attempts exhausted"})
                return []
            return produced
        return []

    def _protocol_error(self, run: Run, item: QueueItem, problem: str) -> bool:
        """Record an SDK response the executor cannot act on; True = retry the item.

        Inngest's executor returns an error for it, so the queue retries the item
        until its attempts run out, then the run fails with that error.
        """
        message = f"run {run.run_id} ({run.function_slug}), step {item.step_id}: {problem}"
        log.error("bad SDK response: %s", message)
        self.state.errors.append(f"bad SDK response: {message}")
        self._history(run, "opcode_error", step_id=item.step_id, attempt=item.attempt,
                      job_id=item.job_id, error=problem)
        if item.attempt + 1 < run.max_attempts:
            item.attempt += 1
            return True
        self._finish(run, RunStatus.FAILED, error={"name": "OpcodeError", "message": problem})
        return False

    def _memo(self, run: Run, step_id: str, value: Any) -> None:
        if step_id not in run.steps:
            run.stack.append(step_id)
        run.steps[step_id] = value

    def _memo_step(self, run: Run, op: dict[str, Any], via: str) -> None:
        """A finished step (Step / StepRun): memoize its output."""
        step_id = str(op.get("id", ""))
        data = op.get("data")
        if op["op"] == "Step" and isinstance(data, dict) and set(data) <= {"data", "error"}:
            value = data  # the legacy opcode may carry an already wrapped result
        else:
            value = {"data": data}
        self._memo(run, step_id, value)
        name = op.get("displayName") or op.get("name")
        if via == "response":
            self._history(run, "step_completed", step=step_id, name=name)
        else:
            self._history(run, "step_completed", step=step_id, name=name, via=via)

    def _defer(self, run: Run, op: dict[str, Any]) -> None:
        """DeferAdd / DeferAbort: schedule or cancel a run started when this one ends."""
        step_id = str(op.get("id", ""))
        opts = op.get("opts") if isinstance(op.get("opts"), dict) else {}
        assert isinstance(opts, dict)
        defers = self._defers.setdefault(run.run_id, {})
        if op["op"] == "DeferAdd":
            slug, data = opts.get("fn_slug"), opts.get("input")
            if not isinstance(slug, str) or not slug or not isinstance(data, dict | None):
                # Inngest soft-rejects a bad defer: the parent run goes on without it.
                log.warning("run %s: DeferAdd %s rejected: needs opts.fn_slug and an object "
                            "opts.input", run.run_id, step_id)
                self._history(run, "defer_rejected", step=step_id, opts=opts)
                return
            defers.setdefault(step_id, Defer(slug, data or {}))
            self._history(run, "defer_added", step=step_id, function=slug)
            return
        target = str(opts.get("target_hashed_id") or "")
        if target in defers:
            defers[target].status = "aborted"
        self._history(run, "defer_aborted", step=target)

    def _start_defers(self, run: Run) -> None:
        for hashed_id, entry in self._defers.pop(run.run_id, {}).items():
            if entry.status != "after_run":
                continue
            # The routing metadata Inngest adds (event.DeferredScheduleMetadata).
            data = {**entry.input, "_inngest": {
                "fn_slug": entry.fn_slug, "parent_app_id": app_uuid(run.app_name),
                "parent_fn_id": function_uuid(run.function_slug),
                "parent_fn_slug": run.function_slug, "parent_run_id": run.run_id}}
            target = self._resolve_slug(run.app_name, entry.fn_slug)
            if target is None:
                log.warning("run %s: deferred function %r not found; defer %s dropped",
                            run.run_id, entry.fn_slug, hashed_id)
                continue
            app, slug = target
            event = Event(new_ulid(), DEFERRED_EVENT, data, int(time.time() * 1000))
            self.state.events[event.id] = event
            child = self.start_run(app, slug, event, parent=run.run_id)
            event.run_ids.append(child.run_id)

    def _resolve_slug(self, app: str, slug: str) -> tuple[str, str] | None:
        """A function by its full slug, or by its ID within ``app`` (SDKs send either)."""
        for candidate in (slug, f"{app}-{slug}"):
            for app_name, fns in self.state.functions.items():
                if candidate in fns:
                    return app_name, candidate
        return None

    async def _handle_op(
        self, run: Run, item: QueueItem, op: dict[str, Any]
    ) -> tuple[list[QueueItem], bool]:
        """Return (items to enqueue, retry this item)."""
        code = op["op"]
        step_id = str(op.get("id", ""))
        name = op.get("displayName") or op.get("name")
        if code in ("StepRun", "Step"):
            self._memo_step(run, op, "response")
            return [QueueItem(run.run_id, "step", "")], False
        if code == "RunComplete":
            # The function returned; its output rides in the op (SDKs that checkpoint
            # end runs this way instead of a DONE response).
            self._finish(run, RunStatus.COMPLETED, output=op.get("data"))
            return [], False
        if code == "DiscoveryRequest":
            self._history(run, "discovery_requested", step=step_id)
            return [QueueItem(run.run_id, "step", "")], False
        if code in LAZY_OPCODES:
            self._defer(run, op)
            return [], False
        if code == "StepFailed":
            self._memo(run, step_id, {"error": op.get("error")})
            self._history(run, "step_failed", step=step_id, name=name, error=op.get("error"))
            return [QueueItem(run.run_id, "step", "")], False
        if code == "StepError":
            self._history(run, "step_errored", step=step_id, name=name, attempt=item.attempt,
                          error=op.get("error"))
            return [], True
        if code == "StepPlanned":
            self._history(run, "step_planned", step=step_id, name=name)
            return [QueueItem(run.run_id, step_id, new_ulid())], False
        if code == "Sleep":
            delay = _parse_wake(str(op.get("name") or ""), op.get("opts"))
            self._history(run, "sleep", step=step_id, seconds=delay)
            await asyncio.sleep(delay)
            self._memo(run, step_id, None)
            return [QueueItem(run.run_id, "step", "")], False
        if code == "WaitForEvent":
            opts = op.get("opts") if isinstance(op.get("opts"), dict) else {}
            assert isinstance(opts, dict)
            wanted = str(opts.get("event") or op.get("name") or "")
            timeout = _parse_wake(str(opts.get("timeout") or "0s"), None)
            self._history(run, "wait_for_event", step=step_id, event=wanted)
            fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
            entry = (wanted, fut)
            self._event_waiters.append(entry)
            try:
                async with asyncio.timeout(timeout or None):
                    event = await fut
                self._memo(run, step_id, event.to_payload())
            except TimeoutError:
                self._memo(run, step_id, None)
            finally:
                self._event_waiters.remove(entry)
            return [QueueItem(run.run_id, "step", "")], False
        if code == "InvokeFunction":
            opts = op.get("opts") if isinstance(op.get("opts"), dict) else {}
            assert isinstance(opts, dict)
            target = str(opts.get("function_id") or "")
            payload = opts.get("payload") if isinstance(opts.get("payload"), dict) else {}
            assert isinstance(payload, dict)
            child = self._find_and_start(target, payload.get("data"), run.run_id)
            self._history(run, "invoke", step=step_id, function=target,
                          child_run_id=child.run_id if child else None)
            if child is None:
                self._memo(run, step_id, {"error": {"name": "Error",
                                                    "message": f"no function {target}"}})
            else:
                await self.state.wait_for(lambda: child.status.terminal, 7 * 24 * 3600)
                if child.status is RunStatus.COMPLETED:
                    self._memo(run, step_id, {"data": child.output})
                else:
                    self._memo(run, step_id, {"error": child.error})
            return [QueueItem(run.run_id, "step", "")], False
        if code in UNSUPPORTED_OPCODES:
            # Known to Inngest, but needs services the dev gateway does not have: fail the
            # run with a reason rather than leave it waiting forever.
            message = f"opcode {code} is not supported by the dev gateway"
            log.error("run %s: %s", run.run_id, message)
            self._history(run, "opcode_error", step=step_id, error=message)
            self._finish(run, RunStatus.FAILED,
                         error={"name": "UnsupportedOpcode", "message": message})
            return [], False
        # "None": this branch of a parallel fan-out ended; nothing to schedule.
        return [], False

    # -- async checkpoints (POST /v1/checkpoint/{run_id}/async) -----------------

    def checkpoint_async(self, run_id: str, body: Any) -> None:
        """Store the steps an SDK ran inside one request (checkpoint.go: checkpointAsyncSteps).

        The SDK keeps running the function after this returns; its reply later ends the
        request (often with RunComplete). Raises CheckpointRejected with Inngest's status.
        """
        if not isinstance(body, dict):
            raise CheckpointRejected(400, "invalid request body: expected a JSON object")
        run = self.state.runs.get(run_id)
        if run is None:
            raise CheckpointRejected(404, f"run {run_id} not found")
        if str(body.get("run_id") or run_id) != run_id:
            raise CheckpointRejected(400, "run_id in the body differs from the one in the path")
        if run.status.terminal:
            raise CheckpointRejected(404, f"run {run_id} already {run.status.value}")
        ops, problem = _opcodes(body.get("steps"))
        if problem is not None:
            self._checkpoint_error(run, problem)
            raise CheckpointRejected(400, problem)
        if any(op["op"] not in SYNC_OPCODES for op in ops):
            problem = "cannot checkpoint async steps"
            self._checkpoint_error(run, f"{problem}: {[op['op'] for op in ops]}")
            raise CheckpointRejected(400, problem)
        self._check_dispatch(run, body)
        log.info("checkpoint over HTTP for run %s: %s", run_id, logfmt.ops(ops))
        for op in ops:
            code = op["op"]
            if code in ("StepRun", "Step"):
                if str(op.get("id", "")) in run.steps:
                    log.warning("run %s: duplicate checkpoint of step %s ignored",
                                run.run_id, op.get("id"))
                    continue
                self._memo_step(run, op, "checkpoint")
            elif code == "StepPlanned":
                self._history(run, "step_planned", step=str(op.get("id", "")),
                              name=op.get("displayName") or op.get("name"), via="checkpoint")
            elif code in LAZY_OPCODES:
                self._defer(run, op)
            else:  # RunComplete, StepFailed, ...: only valid in a reply
                problem = f"cannot checkpoint opcode: {code}"
                self._checkpoint_error(run, problem)
                raise CheckpointRejected(400, problem)
        # A step that made progress starts its queue item's attempts afresh.
        live = self._live.get(str(body.get("qi_id") or ""))
        if live is not None and live.run_id == run_id:
            live.attempt = 0

    def _check_dispatch(self, run: Run, body: dict[str, Any]) -> None:
        """409 for a checkpoint from a dispatch the executor has given up on.

        Inngest skips this check for requests younger than 10 s (``request_started_at``),
        a shortcut that holds with its 2-minute leases but not with test timings, so the
        dev gateway always checks.
        """
        generation = body.get("generation_id")
        if not isinstance(generation, int) or generation == 0:
            return  # SDKs that send none are not validated (as in Inngest)
        live = self._live.get(str(body.get("qi_id") or ""))
        if live is None or live.run_id != run.run_id:
            reason = "queue item not found"
        elif live.generation != generation:
            reason = (f"dispatch generation {generation} does not match queue item "
                      f"generation {live.generation}")
        else:
            return
        log.warning("run %s: stale dispatch checkpoint refused (%s)", run.run_id, reason)
        self._history(run, "checkpoint_stale", job_id=body.get("qi_id"), reason=reason)
        raise CheckpointRejected(409, f"stale dispatch: {reason}")

    def _checkpoint_error(self, run: Run, problem: str) -> None:
        log.error("bad checkpoint for run %s (%s): %s", run.run_id, run.function_slug, problem)
        self.state.errors.append(f"bad checkpoint for run {run.run_id}: {problem}")
        self._history(run, "checkpoint_error", error=problem)

    def _find_and_start(self, slug: str, data: Any, parent: str) -> Run | None:
        for app, fns in self.state.functions.items():
            if slug in fns:
                event = Event(new_ulid(), "inngest/function.invoked", data or {},
                              int(time.time() * 1000))
                return self.start_run(app, slug, event, parent=parent)
        return None

    # -- the proxy (grpc/proxy.go) ---------------------------------------------

    def _payload(self, run: Run, item: QueueItem, request_id: str) -> bytes:
        body = {
            "event": run.event.to_payload(),
            "events": [e.to_payload() for e in run.events],
            "steps": {sid: run.steps[sid] for sid in run.stack},
            # Defers already registered; abortable until the run ends (driver.go).
            "defers": {hid: {"abortable": d.status == "after_run"}
                       for hid, d in self._defers.get(run.run_id, {}).items()},
            "ctx": {
                "fn_id": function_uuid(run.function_slug),
                "run_id": run.run_id,
                "env": self.config.env_name,
                "step_id": item.step_id,
                "attempt": item.attempt,
                "max_attempts": run.max_attempts,
                "stack": {"stack": list(run.stack), "current": len(run.stack)},
                "qi_id": item.job_id,
                "request_id": request_id,
                "generation_id": item.generation,
                "job_id": item.job_id,
                "disable_immediate_execution": run.run_id in self._force_plan,
                "use_api": False,
            },
            "version": run.version,
            "use_api": False,
        }
        return json.dumps(body).encode()

    async def _proxy(self, run: Run, item: QueueItem) -> ProxyResult:
        core = self.core
        request_id = new_ulid()
        item.generation += 1
        lease = core.leases.lease(request_id)
        poke = asyncio.Event()
        core.leases.pokes[request_id] = poke
        reply = core.buffer.waiter(request_id)
        trace = _trace_ctx()
        try:
            request = pb.GatewayExecutorRequestData(
                request_id=request_id,
                account_id=ACCOUNT_ID,
                env_id=ENV_ID,
                app_id=app_uuid(run.app_name),
                app_name=run.app_name,
                function_id=function_uuid(run.function_slug),
                function_slug=run.function_slug,
                step_id=item.step_id,
                request_payload=self._payload(run, item, request_id),
                system_trace_ctx=trace,
                user_trace_ctx=_user_trace_ctx(run.run_id, app_uuid(run.app_name),
                                               function_uuid(run.function_slug)),
                run_id=run.run_id,
                lease_id=lease.lease_id,
                job_id=item.job_id if self.config.send_job_id else "",
            )
            error = await self._forward(run, item, request)
            if error is not None:
                return ProxyResult(None, error)
            result = await self._await_reply(request_id, reply, poke)
            if result.response is not None:
                core.leases.release(request_id)
            return result
        finally:
            core.buffer.forget_waiter(request_id)
            core.buffer.delete(request_id)
            core.leases.give_up(request_id)  # a no-op after release
            self.gateway.dual_owners.pop(request_id, None)
            self.state.notify()

    async def _forward(
        self, run: Run, item: QueueItem, request: pb.GatewayExecutorRequestData
    ) -> str | None:
        """Route and forward up to ``forward_attempts`` times; None once ACKed."""
        core = self.core
        last_error = ROUTE_FAILED
        for attempt in range(1, self.config.forward_attempts + 1):
            route = core.router.route(run.app_name, run.function_slug)
            if route.conn_id is None:
                with contextlib.suppress(TimeoutError):
                    await self.state.wait_for(
                        lambda: core.router.route(run.app_name, run.function_slug).conn_id
                        is not None,
                        self.config.route_wait,
                    )
                route = core.router.route(run.app_name, run.function_slug)
                if route.conn_id is not None:
                    # Inngest does not wait for a route (GetRoute fails at once and the
                    # queue retries with a new lease): the wait must not eat the lease,
                    # or the step is forwarded with a lease about to lapse and runs twice.
                    core.leases.restart(request.request_id)
            if route.conn_id is None:
                return route.error or ROUTE_FAILED
            if self.state.faults.dual_dispatch > 0:
                twin = core.router.route(run.app_name, run.function_slug,
                                         exclude=frozenset({route.conn_id}))
                if twin.conn_id is not None:
                    self.state.faults.dual_dispatch -= 1
                    if await self._forward_twice(run, item, request, attempt,
                                                 (route.conn_id, twin.conn_id)):
                        return None
                    continue
            conn = self.gateway.live.get(route.conn_id)
            instance = conn.info.instance_id if conn else None
            core.leases.assign(request.request_id, instance)
            dispatch = Dispatch(
                request_id=request.request_id,
                job_id=item.job_id,
                run_id=run.run_id,
                function_slug=run.function_slug,
                step_id=item.step_id,
                attempt=item.attempt,
                conn_id=route.conn_id,
                forward_attempt=attempt,
                sent_at=time.time(),
            )
            self.state.dispatches.append(dispatch)
            self.state.notify()
            log.info("dispatching %s of %s run %s (attempt %d) to %s: request %s",
                     logfmt.step(run, item.step_id), run.function_slug, run.run_id,
                     item.attempt + 1, logfmt.who(conn.info if conn else None),
                     request.request_id)
            if await self.gateway.forward(route.conn_id, request):
                dispatch.acked_at = time.time()
                dispatch.outcome = "acked"
                self.state.notify()
                log.info("request %s ACKed by %s", request.request_id, instance)
                return None
            log.info("request %s not ACKed by %s (forward %d of %d)", request.request_id,
                     instance, attempt, self.config.forward_attempts)
            dispatch.outcome = "forward_failed"
            core.leases.assign(request.request_id, None)
            self.state.notify()
        return last_error

    async def _forward_twice(self, run: Run, item: QueueItem,
                             request: pb.GatewayExecutorRequestData, attempt: int,
                             conn_ids: tuple[str, str]) -> bool:
        """Faults.dual_dispatch: write the request to both connections at once. The
        first WORKER_REQUEST_ACK owns the lease (the gateway NACKs the other copy's
        extensions, so its worker cancels it); a reply from either copy is accepted,
        the first one stored wins. True once either ACKed."""
        dispatches = {
            conn_id: Dispatch(request_id=request.request_id, job_id=item.job_id,
                              run_id=run.run_id, function_slug=run.function_slug,
                              step_id=item.step_id, attempt=item.attempt, conn_id=conn_id,
                              forward_attempt=attempt, sent_at=time.time())
            for conn_id in conn_ids}
        self.state.dispatches.extend(dispatches.values())
        self.state.notify()
        log.info("dispatching %s of %s run %s to two workers at once (fault): %s: request %s",
                 logfmt.step(run, item.step_id), run.function_slug, run.run_id,
                 " and ".join(str(logfmt.who(self.state.connections.get(c))) for c in conn_ids),
                 request.request_id)
        acked: list[str] = []

        async def forward(conn_id: str) -> None:
            ok = await self.gateway.forward(conn_id, request)
            log.info("request %s %s on conn %s (dual dispatch)", request.request_id,
                     "ACKed" if ok else "not ACKed", conn_id)
            dispatches[conn_id].outcome = "acked" if ok else "forward_failed"
            if ok:
                dispatches[conn_id].acked_at = time.time()
                acked.append(conn_id)  # in the order the ACKs were processed
                live = self.gateway.live.get(conn_id)
                if len(acked) == 1 and live is not None:  # the first ACK owns the lease
                    self.gateway.dual_owners[request.request_id] = live.info.instance_id
                    self.core.leases.assign(request.request_id, live.info.instance_id)
            self.state.notify()

        tasks = [asyncio.create_task(forward(conn_id)) for conn_id in conn_ids]
        for task in tasks:
            # The second copy's ACK may still be on its way; it completes in the background.
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending and not acked:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        return bool(acked)

    async def _await_reply(
        self, request_id: str, reply: asyncio.Future[pb.SDKResponse], poke: asyncio.Event
    ) -> ProxyResult:
        cfg = self.config
        leases = self.core.leases
        while True:
            poked: asyncio.Task[bool] = asyncio.create_task(poke.wait())
            waitables: list[asyncio.Future[Any]] = [reply, poked]
            try:
                await asyncio.wait(
                    waitables,
                    timeout=cfg.lease_check_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                poked.cancel()
            poke.clear()
            if reply.done():
                self._mark(request_id, "replied")
                return ProxyResult(reply.result(), None)
            if not cfg.enforce_lease_expiry or leases.is_live(request_id):
                continue
            # Lease lapsed: give the worker a grace period for a late reply.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(cfg.lease_grace):
                    await asyncio.shield(reply)
            if reply.done() and not reply.cancelled():
                self._mark(request_id, "replied")
                return ProxyResult(reply.result(), None)
            # Like the real proxy: an extension during the grace period comes too late.
            self._mark(request_id, "lease_lost")
            log.info("lease expired: request %s got no reply or lease extension for %.0f s "
                     "(the worker stopped responding)", request_id, cfg.lease_duration)
            return ProxyResult(None, STOPPED_RESPONDING)

    def _mark(self, request_id: str, outcome: str) -> None:
        for d in reversed(self.state.dispatches):
            if d.request_id == request_id:
                d.outcome = outcome
                break
        self.state.notify()
