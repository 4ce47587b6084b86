"""Run histories, recorded by the worker for ``connect-worker compat``.

With ``CONNECT_WORKER_RECORD_HISTORY=DIR`` each request's end writes ``DIR/<run>.json``:
the memos the run's request carried plus the step output the request reported, their
completion order, the step names seen (old versions' names included, for drift reports),
the event and the run's status. ``CONNECT_WORKER_RECORD_HISTORY_SHAPE_ONLY`` reduces
outputs and events to their shape. Recording is an aid: it never fails a run.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from inngest._internal.step_lib.base import Output

from ..ops.logs import event

if TYPE_CHECKING:
    from .drift import RequestDrift

log = logging.getLogger(__name__)

HISTORY_FORMAT = "connect-worker-history/1"


def shape_of(value: object) -> object:
    """``value`` with every leaf replaced by a neutral value of its type: the structure a
    replay and a type check need, none of the data."""
    if isinstance(value, dict):
        return {k: shape_of(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape_of(v) for v in value[:1]]
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0
    if isinstance(value, float):
        return 0.0
    if isinstance(value, str):
        return ""
    return None


class HistoryRecorder:
    """Writes one JSON file per run (``CONNECT_WORKER_RECORD_HISTORY=DIR``): the memos,
    their completion order and their step names, as the worker last saw them."""

    def __init__(self, directory: str | os.PathLike[str], *, shape_only: bool = False,
                 app_version: str | None = None) -> None:
        self.directory = Path(directory)
        self.shape_only = shape_only
        self.app_version = app_version
        self._lock = threading.Lock()
        self._failed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._unwritable(exc)

    def names_for(self, run_id: str) -> dict[str, str]:
        """The step names recorded for ``run_id`` by any worker writing here."""
        try:
            names = json.loads((self.directory / f"{_safe(run_id)}.json").read_text())["names"]
        except (OSError, ValueError, KeyError, TypeError):
            return {}
        return dict(names) if isinstance(names, dict) else {}

    def record(self, tracker: RequestDrift, *, returned: bool, failed: bool,
               body: bytes = b"") -> None:
        req = tracker.request
        try:
            payload = json.loads(req.payload or b"{}")
        except ValueError:
            payload = {}
        ctx = payload.get("ctx") or {}
        stack = list(((ctx.get("stack") or {}).get("stack")) or [])
        steps = dict(payload.get("steps") or {})
        if payload.get("use_api"):  # the memos came from the API, not the payload
            steps = {h: _raw_memo(o) for h, o in tracker.snapshot.items()}
        if not stack:
            stack = list(steps)
        for hashed, memo in _completed_ops(body):
            # The step this request ran: its memo arrives with the run's next request.
            if hashed not in steps:
                stack.append(hashed)
            steps[hashed] = memo
        event_data = payload.get("event")
        events = payload.get("events")
        if self.shape_only:
            steps = {h: shape_of(v) for h, v in steps.items()}
            event_data = shape_of(event_data)
            events = shape_of(events)
        path = self.directory / f"{_safe(req.run_id)}.json"
        with self._lock:
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError):
                old = {}
            names = dict(old.get("names") or {})
            names.update(tracker.names)
            status = "failed" if failed else ("completed" if returned else "running")
            doc = {
                "format": HISTORY_FORMAT,
                "run_id": req.run_id,
                "function": req.function_slug,
                "app_version": old.get("app_version") or self.app_version,
                "last_app_version": self.app_version,
                "status": status,
                "shape_only": self.shape_only,
                "event": event_data,
                "events": events,
                "stack": stack,
                "steps": steps,
                "names": names,
            }
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(doc, default=str))
                tmp.replace(path)
            except OSError as exc:
                self._unwritable(exc)

    def _unwritable(self, exc: OSError) -> None:
        # Recording is an aid: a full disk or a bad path must not fail the runs.
        if not self._failed:
            self._failed = True
            event(log, "drift.history_unwritable", level=logging.ERROR,
                  directory=str(self.directory), error=str(exc))


def _completed_ops(body: bytes) -> list[tuple[str, object]]:
    """(hashed id, memo) of each step the SDK's answer reports as done (StepRun)."""
    if b'"StepRun"' not in body:
        return []
    try:
        ops = json.loads(body)
    except ValueError:
        return []
    if not isinstance(ops, list):
        return []
    return [(str(op["id"]), {"data": op.get("data")}) for op in ops
            if isinstance(op, dict) and op.get("op") == "StepRun" and "id" in op]


def _raw_memo(output: Output) -> object:
    if output.error is not None:
        return {"error": output.error.model_dump()}
    return {"data": output.data}


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text) or "run"
