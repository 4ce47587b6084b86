"""Which step a model call belongs to, and which of its identical calls it is.

The identity keys the result cache and the claims: an explicit ``key``, else the Connect
request's ``job_id`` (the same across every retry of one step, on every worker). The
occurrence numbers identical calls within one attempt, so a step that asks the same
question twice gets two answers, and its retry gets the same two back.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass

from ..context import current_request
from ..ops.logs import event

log = logging.getLogger("connect_worker.llm")

# Identical calls made outside an executor request are numbered per asyncio task.
_task_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "connect_worker_llm_scope", default=None)
# Identical calls are numbered per (attempt, identity, request), process-wide, so two LLM
# objects used by one step agree. Old attempts fall off the end.
_occurrences: OrderedDict[tuple[str, str, str], int] = OrderedDict()
_lock = threading.Lock()
_MAX_SCOPES = 10_000
_warned_no_job_id = False


@dataclass(frozen=True, slots=True)
class Identity:
    key: str | None  # None: nothing to key a cache entry on
    scope: str  # one attempt of one step
    run_id: str | None
    # An executor request with no job_id (servers before Inngest v1.19.3): no identity.
    no_job_id: bool = False


def identity_for(key: str | None, run_id: str | None) -> Identity:
    """The identity of a call made now: inside an executor request, its job; else ``key``."""
    request = current_request()
    if request is not None:
        if key is None and not request.job_id:
            # An empty job_id would make "job:" the identity of every step of every
            # run: one run's stored answer served to another. No identity instead.
            _warn_no_job_id_once()
            return Identity(None, request.request_id, run_id or request.run_id,
                            no_job_id=True)
        return Identity(key or f"job:{request.job_id}", request.request_id,
                        run_id or request.run_id)
    scope = _task_scope.get()
    if scope is None:
        scope = str(uuid.uuid4())
        _task_scope.set(scope)
    return Identity(key, scope, run_id)


def next_occurrence(scope: str, identity: str, digest: str) -> int:
    """How many calls identical to this one (same digest) ``scope`` has made before it."""
    slot = (scope, identity, digest)
    with _lock:
        count = _occurrences.pop(slot, 0)
        _occurrences[slot] = count + 1
        while len(_occurrences) > _MAX_SCOPES:
            _occurrences.popitem(last=False)
    return count


def _warn_no_job_id_once() -> None:
    global _warned_no_job_id
    with _lock:
        if _warned_no_job_id:
            return
        _warned_no_job_id = True
    event(log, "llm.no_identity", level=logging.WARNING,
          reason="the executor request has no job_id (Inngest servers before v1.19.3 do "
          "not send one): LLM answers are neither cached nor claimed for such requests; "
          "pass key= to LLM.complete for a stable identity, or upgrade the server")
