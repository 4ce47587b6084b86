"""Opcodes: what an SDK's NOT_COMPLETED reply or checkpoint asks of a run (Inngest's
executor, handleGeneratorOp): which opcodes exist, their order, and what each does:
memoize a step, plan one, sleep, wait for an event, invoke a function, defer a run.
The runs (executor.py) retry and finish; this module keeps the waits and the defers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ..protocol.durations import parse_go_duration
from .core import app_uuid, function_uuid
from .state import DevState, Event, QueueItem, Run, RunStatus
from .ulid import new_ulid

log = logging.getLogger(__name__)

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


@dataclass
class Defer:
    """A deferred run scheduled by DeferAdd; started when the parent run finishes."""

    fn_slug: str
    input: dict[str, Any]
    status: str = "after_run"  # or "aborted"


def matches(trigger: Any, name: str) -> bool:
    """Whether an event trigger (``{"event": pattern}``; a final ``*`` matches a prefix)
    matches the event ``name``: for function triggers and WaitForEvent alike."""
    if not isinstance(trigger, dict):
        return False
    pattern = trigger.get("event")
    if not isinstance(pattern, str):
        return False
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return pattern == name


class Runs(Protocol):
    """What opcode handling asks of the runs (the executor)."""

    def history(self, run: Run, kind: str, **fields: Any) -> None: ...

    def finish(self, run: Run, status: RunStatus, *, output: Any = None,
               error: Any = None) -> None: ...

    def invoke(self, slug: str, data: Any, parent: str | None = None) -> Run: ...

    def start_run(self, app: str, slug: str, event: Event,
                  parent: str | None = None) -> Run: ...


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


def parse_opcodes(body: Any) -> tuple[list[dict[str, Any]], str | None]:
    """The opcode list of a NOT_COMPLETED reply or a checkpoint, or what is wrong with it."""
    if not isinstance(body, list) or not body:
        return [], f"expected a non-empty list of opcodes, got {preview(body)}"
    for op in body:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            return [], f"opcode without an 'op' name: {preview(op)}"
        if op["op"] not in KNOWN_OPCODES:
            return [], (f"unknown opcode {op['op']!r} (known: {', '.join(sorted(KNOWN_OPCODES))})")
    return body, None


def ordered(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Priority ops first (as Inngest's executor), RunComplete after every other op."""
    return sorted(ops, key=lambda op: (op["op"] not in PRIORITY_OPCODES) + 2 * (
        op["op"] == "RunComplete"))


def preview(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


class Opcodes:
    def __init__(self, state: DevState, runs: Runs) -> None:
        self.state = state
        self.runs = runs
        self._event_waiters: list[tuple[str, asyncio.Future[Event]]] = []
        self._defers: dict[str, dict[str, Defer]] = {}

    def event_received(self, event: Event) -> None:
        """Wake the WaitForEvent ops waiting for this event's name."""
        for name_wanted, fut in list(self._event_waiters):
            if matches({"event": name_wanted}, event.name) and not fut.done():
                fut.set_result(event)

    def defers(self, run_id: str) -> dict[str, Defer]:
        """The run's registered defers (abortable until it ends)."""
        return self._defers.get(run_id, {})

    def run_ended(self, run: Run, status: RunStatus) -> None:
        if status in (RunStatus.COMPLETED, RunStatus.FAILED):
            self._start_defers(run)
        self._defers.pop(run.run_id, None)

    def memo(self, run: Run, step_id: str, value: Any) -> None:
        if step_id not in run.steps:
            run.stack.append(step_id)
        run.steps[step_id] = value

    def memo_step(self, run: Run, op: dict[str, Any], via: str) -> None:
        """A finished step (Step / StepRun): memoize its output."""
        step_id = str(op.get("id", ""))
        data = op.get("data")
        if op["op"] == "Step" and isinstance(data, dict) and set(data) <= {"data", "error"}:
            value = data  # the legacy opcode may carry an already wrapped result
        else:
            value = {"data": data}
        self.memo(run, step_id, value)
        name = op.get("displayName") or op.get("name")
        if via == "response":
            self.runs.history(run, "step_completed", step=step_id, name=name)
        else:
            self.runs.history(run, "step_completed", step=step_id, name=name, via=via)

    def defer(self, run: Run, op: dict[str, Any]) -> None:
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
                self.runs.history(run, "defer_rejected", step=step_id, opts=opts)
                return
            defers.setdefault(step_id, Defer(slug, data or {}))
            self.runs.history(run, "defer_added", step=step_id, function=slug)
            return
        target = str(opts.get("target_hashed_id") or "")
        if target in defers:
            defers[target].status = "aborted"
        self.runs.history(run, "defer_aborted", step=target)

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
            child = self.runs.start_run(app, slug, event, parent=run.run_id)
            event.run_ids.append(child.run_id)

    def _resolve_slug(self, app: str, slug: str) -> tuple[str, str] | None:
        """A function by its full slug, or by its ID within ``app`` (SDKs send either)."""
        for candidate in (slug, f"{app}-{slug}"):
            for app_name, fns in self.state.functions.items():
                if candidate in fns:
                    return app_name, candidate
        return None

    async def handle(
        self, run: Run, item: QueueItem, op: dict[str, Any]
    ) -> tuple[list[QueueItem], bool]:
        """Return (items to enqueue, retry this item)."""
        code = op["op"]
        step_id = str(op.get("id", ""))
        name = op.get("displayName") or op.get("name")
        if code in ("StepRun", "Step"):
            self.memo_step(run, op, "response")
            return [QueueItem(run.run_id, "step", "")], False
        if code == "RunComplete":
            # The function returned; its output rides in the op (SDKs that checkpoint
            # end runs this way instead of a DONE response).
            self.runs.finish(run, RunStatus.COMPLETED, output=op.get("data"))
            return [], False
        if code == "DiscoveryRequest":
            self.runs.history(run, "discovery_requested", step=step_id)
            return [QueueItem(run.run_id, "step", "")], False
        if code in LAZY_OPCODES:
            self.defer(run, op)
            return [], False
        if code == "StepFailed":
            self.memo(run, step_id, {"error": op.get("error")})
            self.runs.history(run, "step_failed", step=step_id, name=name, error=op.get("error"))
            return [QueueItem(run.run_id, "step", "")], False
        if code == "StepError":
            self.runs.history(run, "step_errored", step=step_id, name=name, attempt=item.attempt,
                          error=op.get("error"))
            return [], True
        if code == "StepPlanned":
            self.runs.history(run, "step_planned", step=step_id, name=name)
            return [QueueItem(run.run_id, step_id, new_ulid())], False
        if code == "Sleep":
            delay = _parse_wake(str(op.get("name") or ""), op.get("opts"))
            self.runs.history(run, "sleep", step=step_id, seconds=delay)
            await asyncio.sleep(delay)
            self.memo(run, step_id, None)
            return [QueueItem(run.run_id, "step", "")], False
        if code == "WaitForEvent":
            opts = op.get("opts") if isinstance(op.get("opts"), dict) else {}
            assert isinstance(opts, dict)
            wanted = str(opts.get("event") or op.get("name") or "")
            timeout = _parse_wake(str(opts.get("timeout") or "0s"), None)
            self.runs.history(run, "wait_for_event", step=step_id, event=wanted)
            fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
            entry = (wanted, fut)
            self._event_waiters.append(entry)
            try:
                async with asyncio.timeout(timeout or None):
                    event = await fut
                self.memo(run, step_id, event.to_payload())
            except TimeoutError:
                self.memo(run, step_id, None)
            finally:
                self._event_waiters.remove(entry)
            return [QueueItem(run.run_id, "step", "")], False
        if code == "InvokeFunction":
            opts = op.get("opts") if isinstance(op.get("opts"), dict) else {}
            assert isinstance(opts, dict)
            target = str(opts.get("function_id") or "")
            payload = opts.get("payload") if isinstance(opts.get("payload"), dict) else {}
            assert isinstance(payload, dict)
            child: Run | None = None
            with contextlib.suppress(KeyError):
                child = self.runs.invoke(target, payload.get("data"), parent=run.run_id)
            self.runs.history(run, "invoke", step=step_id, function=target,
                          child_run_id=child.run_id if child else None)
            if child is None:
                self.memo(run, step_id, {"error": {"name": "Error",
                                                    "message": f"no function {target}"}})
            else:
                await self.state.wait_for(lambda: child.status.terminal, 7 * 24 * 3600)
                if child.status is RunStatus.COMPLETED:
                    self.memo(run, step_id, {"data": child.output})
                else:
                    self.memo(run, step_id, {"error": child.error})
            return [QueueItem(run.run_id, "step", "")], False
        if code in UNSUPPORTED_OPCODES:
            # Known to Inngest, but needs services the dev gateway does not have: fail the
            # run with a reason rather than leave it waiting forever.
            message = f"opcode {code} is not supported by the dev gateway"
            log.error("run %s: %s", run.run_id, message)
            self.runs.history(run, "opcode_error", step=step_id, error=message)
            self.runs.finish(run, RunStatus.FAILED,
                         error={"name": "UnsupportedOpcode", "message": message})
            return [], False
        # "None": this branch of a parallel fan-out ended; nothing to schedule.
        return [], False

