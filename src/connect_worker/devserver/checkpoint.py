"""The async checkpoint API (POST /v1/checkpoint/{run_id}/async, Inngest's
checkpoint.go): steps an SDK ran inside one request, stored while it keeps running;
a checkpoint from a dispatch the executor gave up on is refused (409).
"""

from __future__ import annotations

import logging
from typing import Any

from . import logfmt
from .opcodes import LAZY_OPCODES, SYNC_OPCODES, Opcodes, Runs, parse_opcodes
from .state import DevState, QueueItem, Run

log = logging.getLogger(__name__)


class CheckpointRejected(Exception):
    """A checkpoint the API refuses: ``status`` is the HTTP status Inngest's API uses."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Checkpoints:
    def __init__(self, state: DevState, live: dict[str, QueueItem], opcodes: Opcodes,
                 runs: Runs) -> None:
        self.state = state
        self._live = live  # the queue items being executed, by job ID
        self.opcodes = opcodes
        self.runs = runs

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
        ops, problem = parse_opcodes(body.get("steps"))
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
                self.opcodes.memo_step(run, op, "checkpoint")
            elif code == "StepPlanned":
                self.runs.history(run, "step_planned", step=str(op.get("id", "")),
                              name=op.get("displayName") or op.get("name"), via="checkpoint")
            elif code in LAZY_OPCODES:
                self.opcodes.defer(run, op)
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
        self.runs.history(run, "checkpoint_stale", job_id=body.get("qi_id"), reason=reason)
        raise CheckpointRejected(409, f"stale dispatch: {reason}")

    def _checkpoint_error(self, run: Run, problem: str) -> None:
        log.error("bad checkpoint for run %s (%s): %s", run.run_id, run.function_slug, problem)
        self.state.errors.append(f"bad checkpoint for run {run.run_id}: {problem}")
        self.runs.history(run, "checkpoint_error", error=problem)

