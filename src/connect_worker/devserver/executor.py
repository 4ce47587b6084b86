"""The executor's runs: turn events into runs and drive each run step by step over
the gateway, like Inngest's executor (spec §5.2, §5.9).

Per queue item (a discovery call ``step_id="step"`` or a targeted planned step):
new request_id per dispatch, stable job_id across retries, attempt counting per
item, and how a run ends. Each dispatch goes through the proxy (proxy.py); what a
reply's opcodes do is opcodes.py; the async checkpoint API is checkpoint.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import datetime
from typing import Any

from ..protocol import pb
from . import logfmt
from .checkpoint import Checkpoints
from .core import Core, function_uuid
from .gateway import Gateway
from .opcodes import LAZY_OPCODES, Opcodes, matches, ordered, parse_opcodes
from .proxy import Proxy
from .state import Event, QueueItem, Run, RunStatus
from .ulid import new_ulid

log = logging.getLogger(__name__)


def _max_attempts(config: dict[str, Any], default_retries: int) -> int:
    """retries + 1, from the function config's ``steps.*.retries.attempts`` if present."""
    steps = config.get("steps")
    if isinstance(steps, dict):
        for step in steps.values():
            retries = step.get("retries") if isinstance(step, dict) else None
            if isinstance(retries, dict) and isinstance(retries.get("attempts"), int):
                return int(retries["attempts"]) + 1
    return default_retries + 1


class Executor:
    def __init__(self, core: Core, gateway: Gateway) -> None:
        self.core = core
        self.state = core.state
        self.config = core.config
        self.gateway = gateway
        self._tasks: set[asyncio.Task[None]] = set()
        # Queue items being executed, by job ID (async checkpoints name theirs).
        self._live: dict[str, QueueItem] = {}
        # Runs that reported parallel steps: every later step is planned first.
        self._force_plan: set[str] = set()
        self.opcodes = Opcodes(self.state, self)
        self.checkpoints = Checkpoints(self.state, self._live, self.opcodes, self)
        self.proxy = Proxy(core, gateway, self._tasks)

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
        self.opcodes.event_received(event)
        for app, fns in self.state.functions.items():
            for slug, config in fns.items():
                if any(matches(t, name) for t in config.get("triggers") or []):
                    run = self.start_run(app, slug, event)
                    event.run_ids.append(run.run_id)
        self.state.notify()
        log.info("event received: %s id %s, runs started: %s", name, event.id,
                 ", ".join(event.run_ids) or "none (no synced function has this trigger)")
        return event

    def invoke(self, slug: str, data: Any, parent: str | None = None) -> Run:
        """Start ``slug`` with an ``inngest/function.invoked`` event; KeyError if unknown.

        The one way to invoke a function: the HTTP API, the dev gateway's Python API and
        the InvokeFunction opcode (``parent`` = the invoking run) all come through here.
        """
        for app, fns in self.state.functions.items():
            if slug in fns:
                event = Event(new_ulid(), "inngest/function.invoked", data or {},
                              int(time.time() * 1000))
                self.state.events[event.id] = event
                run = self.start_run(app, slug, event, parent=parent)
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
        self.history(run, "run_started", event=event.name)
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
        self.finish(run, RunStatus.CANCELLED)
        return True

    def history(self, run: Run, kind: str, **fields: Any) -> None:
        run.history.append({"ts": time.time(), "type": kind, **fields})
        self.state.notify()

    def finish(
        self, run: Run, status: RunStatus, *, output: Any = None, error: Any = None
    ) -> None:
        if run.status.terminal:
            return
        run.status = status
        run.output = output
        run.error = error
        run.ended_at = time.time()
        self.history(run, f"run_{status.value}", output=output, error=error)
        self._force_plan.discard(run.run_id)
        self.opcodes.run_ended(run, status)
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
                self.finish(run, RunStatus.FAILED, error={"message": "run stalled"})
        except asyncio.CancelledError:
            self.finish(run, RunStatus.CANCELLED)
            raise
        except Exception as exc:
            log.exception("executor failed on run %s", run.run_id)
            self.state.error(f"executor crashed on run {run.run_id}: {exc!r}")
            self.finish(run, RunStatus.FAILED, error={"message": f"devserver error: {exc!r}"})

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
            result = await self.proxy.dispatch(
                run, item, lambda request_id: self._payload(run, item, request_id))
            if result.response is None:
                self.history(run, "step_error", step_id=item.step_id, attempt=item.attempt,
                              job_id=item.job_id, error=result.error)
                if self._next_attempt(run, item):
                    log.info("retrying %s of run %s (attempt %d of %d): %s",
                             logfmt.step(run, item.step_id), run.run_id, item.attempt + 1,
                             run.max_attempts, result.error)
                    await self._backoff()
                    continue
                error = {"name": "StepError", "message": result.error}
                self.finish(run, RunStatus.FAILED, error=error)
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
                self.finish(run, RunStatus.COMPLETED, output=body)
                return []
            if resp.status == pb.SDKResponseStatus.ERROR:
                self.history(run, "function_error", step_id=item.step_id,
                              attempt=item.attempt, error=body, no_retry=resp.no_retry)
                if resp.no_retry or not self._next_attempt(run, item):
                    self.finish(run, RunStatus.FAILED, error=body)
                    return []
                log.info("retrying run %s (attempt %d of %d): the function raised %s",
                         run.run_id, item.attempt + 1, run.max_attempts, logfmt.error(body))
                await self._backoff(resp.retry_after if resp.HasField("retry_after") else None)
                continue
            # NOT_COMPLETED: a list of opcodes.
            ops, problem = parse_opcodes(body)
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
                self.history(run, "redrive", step_id=item.step_id, reason="only empty None ops")
                return [QueueItem(run.run_id, "step", "")]
            for op in ordered(ops):
                more, retry = await self.opcodes.handle(run, item, op)
                produced.extend(more)
                retry_same = retry_same or retry
            if all(op["op"] in LAZY_OPCODES for op in ops) and not run.status.terminal:
                # Lazy ops without a host op would leave the run with nothing queued.
                produced.append(QueueItem(run.run_id, "step", ""))
            if retry_same:
                if self._next_attempt(run, item):
                    log.info("retrying a step of run %s (attempt %d of %d): it raised an error",
                             run.run_id, item.attempt + 1, run.max_attempts)
                    await self._backoff(resp.retry_after if resp.HasField("retry_after") else None)
                    continue
                self.finish(run, RunStatus.FAILED, error={"message": "step attempts exhausted"})
                return []
            return produced
        return []

    @staticmethod
    def _next_attempt(run: Run, item: QueueItem) -> bool:
        """Count one more attempt of ``item`` if the run allows it; False = exhausted.

        The one retry check: a failed dispatch, a function error, a step error and a
        bad SDK response all spend the same per-item budget of ``run.max_attempts``.
        """
        if item.attempt + 1 >= run.max_attempts:
            return False
        item.attempt += 1
        return True

    def _protocol_error(self, run: Run, item: QueueItem, problem: str) -> bool:
        """Record an SDK response the executor cannot act on; True = retry the item.

        Inngest's executor returns an error for it, so the queue retries the item
        until its attempts run out, then the run fails with that error.
        """
        message = f"run {run.run_id} ({run.function_slug}), step {item.step_id}: {problem}"
        log.error("bad SDK response: %s", message)
        self.state.errors.append(f"bad SDK response: {message}")
        self.history(run, "opcode_error", step_id=item.step_id, attempt=item.attempt,
                      job_id=item.job_id, error=problem)
        if self._next_attempt(run, item):
            return True
        self.finish(run, RunStatus.FAILED, error={"name": "OpcodeError", "message": problem})
        return False

    # -- the request body ------------------------------------------------------

    def _payload(self, run: Run, item: QueueItem, request_id: str) -> bytes:
        body = {
            "event": run.event.to_payload(),
            "events": [e.to_payload() for e in run.events],
            "steps": {sid: run.steps[sid] for sid in run.stack},
            # Defers already registered; abortable until the run ends (driver.go).
            "defers": {hid: {"abortable": d.status == "after_run"}
                       for hid, d in self.opcodes.defers(run.run_id).items()},
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

