"""Version drift: a run that began on one version of a function continues on another.

Each executor request carries the run's memoized steps, keyed by the SHA-1 of the step id
(``id``, then ``id:1``, ``id:2`` for repeats). The inngest SDK (0.5.19/0.5.20) pops a memo
when the function reaches that step and, on a step with no memo, runs its body at once,
even if memos remain that the function never reached: a renamed, removed or reordered
step, or one inserted before steps the run had passed. It logs nothing.

This module watches that lookup: :func:`install_hooks` wraps the SDK's
``ExecutionV0.report_step`` (the one place every step kind asks for its memo: run, sleep,
wait_for_event, invoke, send_event, ai.infer) and ``Step.run`` (to learn declared return
types); the executor attaches a request's tracker to its memos before the handler runs.
A request with no memos and no targeted step cannot drift: it gets no tracker (see
``DriftGuard.watches``). A sequential step
with no memo, reached while memos remain, is drift: logged once per run
(``run.version_drift``), counted, and under ``fail`` stopped before its body runs by a
``BaseException`` the executor turns into a non-retriable error. Steps reached inside
``group.parallel`` or in a request targeting one planned step are judged when the
request ends: there, the SDK only plans new steps or runs the targeted one, and memos of
later siblings are consumed after it (see ``RequestDrift.before_step``).

The same tracker, in replay mode, drives ``connect-worker compat`` (``compat.py``): a
step with no memo stops the function before anything runs.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

import pydantic
from inngest._internal import execution_lib, server_lib, step_lib, types
from inngest._internal.step_lib.base import Output

from ..ops.logs import event
from .history import HistoryRecorder

if typing.TYPE_CHECKING:
    from collections.abc import Sequence

    from ..config import Config
    from ..ops.metrics import WorkerMetrics

log = logging.getLogger(__name__)

ON_DRIFT = ("warn", "fail")
KINDS = ("unconsumed", "added", "output_shape")
# How many repeats of one step id (``id:1``...) are hashed when naming a memo.
_NAMED_REPEATS = 20
_NAMES_KEPT = 20_000
_SEEN_KEPT = 4096


def hash_step_id(step_id: str) -> str:
    """The memo key of a step id, as the SDK computes it."""
    return hashlib.sha1(step_id.encode()).hexdigest()  # the SDK's hash, not for security


def occurrence_ids(step_id: str, repeats: int = _NAMED_REPEATS) -> list[str]:
    """``id``, ``id:1``, ``id:2``...: what the n-th use of one step id is hashed from."""
    return [step_id] + [f"{step_id}:{i}" for i in range(1, repeats)]


def step_label(info: step_lib.StepInfo) -> str:
    index = info.userland.index if info.userland is not None else None
    return info.display_name if not index else f"{info.display_name}:{index}"


# -- per-function policy ---------------------------------------------------------------


@dataclass(frozen=True)
class DriftPolicy:
    """How one function reacts to drift (see :func:`drift_policy`)."""

    on_drift: str | None = None  # None: the worker's CONNECT_WORKER_ON_DRIFT
    renamed: Mapping[str, str] = field(default_factory=dict)  # old step id -> new step id
    retired: tuple[str, ...] = ()  # old step ids, only to name their memos in reports


_policies: dict[str, DriftPolicy] = {}
_policies_lock = threading.Lock()

F = typing.TypeVar("F")


def drift_policy(fn: F, *, on_drift: str | None = None,
                 renamed: Mapping[str, str] | None = None,
                 retired: Iterable[str] = ()) -> F:
    """Set how ``fn`` (an ``inngest.Function`` or its id) reacts to version drift.

    ``on_drift``: ``"warn"`` or ``"fail"`` (default: ``CONNECT_WORKER_ON_DRIFT``).
    ``renamed``: ``{"old-step-id": "new-step-id"}``: a run that memoized the old id
    hands that memo to the new one (a deliberate rename costs nothing).
    ``retired``: step ids the function no longer has; only used to name their memos in
    drift reports. Returns ``fn``, so it can wrap the decorated function.
    """
    if on_drift is not None and on_drift not in ON_DRIFT:
        raise ValueError(f"on_drift={on_drift!r}: expected one of {', '.join(ON_DRIFT)}")
    renamed = dict(renamed or {})
    for old, new in renamed.items():
        if not isinstance(old, str) or not isinstance(new, str) or old == new:
            raise ValueError(f"renamed: {old!r} -> {new!r} is not a rename of step ids")
    key = fn if isinstance(fn, str) else str(getattr(fn, "id"))  # noqa: B009
    policy = DriftPolicy(on_drift=on_drift, renamed=renamed, retired=tuple(retired))
    with _policies_lock:
        _policies[key] = policy
    for step_id in (*renamed, *renamed.values(), *policy.retired):
        remember_names(step_id)
    return fn


_DEFAULT_POLICY = DriftPolicy()


def policy_for(function_id: str, local_id: str | None = None) -> DriftPolicy:
    if not _policies:
        return _DEFAULT_POLICY
    return _policies.get(function_id) or _policies.get(local_id or "") or _DEFAULT_POLICY


def clear_policies() -> None:
    """Forget every per-function policy (tests)."""
    with _policies_lock:
        _policies.clear()


# -- naming memo keys --------------------------------------------------------------------

_names: OrderedDict[str, str] = OrderedDict()
_names_lock = threading.Lock()


def remember_names(step_id: str) -> None:
    """Learn the memo keys of ``step_id`` and its repeats, to name them in reports."""
    with _names_lock:
        for i, text in enumerate(occurrence_ids(step_id)):
            _names[hash_step_id(text)] = step_id if i == 0 else text
        while len(_names) > _NAMES_KEPT:
            _names.popitem(last=False)


def _remember(hashed: str, label: str) -> None:
    if hashed in _names:  # the usual case, without the lock
        return
    with _names_lock:
        if hashed not in _names:
            _names[hashed] = label
            if len(_names) > _NAMES_KEPT:
                _names.popitem(last=False)


def name_of(hashed: str, extra: Mapping[str, str] | None = None) -> str:
    """``step-id`` when known, else the first 12 hex digits of its hash."""
    if extra and hashed in extra:
        return extra[hashed]
    with _names_lock:
        known = _names.get(hashed)
    return known if known is not None else f"#{hashed[:12]}"


# -- output shapes -----------------------------------------------------------------------

_adapters: dict[object, pydantic.TypeAdapter[Any]] = {}


_resolved: dict[tuple[object, str], object] = {}


def declared_type(handler: object, output_type: object) -> object | None:
    """The type a step says it returns: ``output_type``, else the handler's annotation.
    Runs for every ``step.run``: string annotations are resolved once per code object."""
    if output_type is not types.empty_sentinel and output_type is not None:
        return output_type
    annotations = getattr(handler, "__annotations__", None)
    if not annotations:  # lambdas, partials, unannotated handlers
        return None
    hint: object = annotations.get("return")
    if isinstance(hint, str):  # `from __future__ import annotations`
        key = (getattr(handler, "__code__", handler), hint)
        if key not in _resolved:
            try:
                _resolved[key] = typing.get_type_hints(handler).get("return")
            except Exception:  # an unresolvable forward reference: nothing to check
                _resolved[key] = None
        hint = _resolved[key]
    if hint is None or hint is Any or hint is object or hint is type(None):
        return None
    return hint


# A memo of exactly one of these types fits that type: pydantic would only agree, slower.
_PLAIN = frozenset({str, int, float, bool, dict, list})


def shape_error(data: object, declared: object) -> str | None:
    """Why ``data`` (a memo's JSON) does not fit ``declared``, or None if it does."""
    if type(data) is declared and declared in _PLAIN:
        return None
    try:
        adapter = _adapters.get(declared)
        if adapter is None:
            adapter = _adapters[declared] = pydantic.TypeAdapter(declared)  # type: ignore[arg-type]
    except TypeError:  # unhashable or not a type pydantic knows: nothing to check
        return None
    except pydantic.PydanticSchemaGenerationError:
        return None
    try:
        adapter.validate_python(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "value"
        return f"{where}: {first.get('msg', 'invalid')}"
    return None


# -- the per-request tracker -------------------------------------------------------------


class DriftStop(BaseException):
    """Stops the function before a drifted step's body runs (``fail``) or, in replay, at
    the first step with no memo. A BaseException so user code's ``except Exception``
    cannot swallow it; the executor catches it around the SDK call."""


@dataclass
class Drift:
    """One drift found in one request."""

    kind: str
    function: str
    run_id: str
    unconsumed: list[str]  # memo keys (hashes) the function did not reach
    new_step: str | None = None  # the step reached with no memo (label)
    new_step_op: str | None = None
    detail: str = ""

    def message(self, names: Mapping[str, str] | None = None) -> str:
        left = ", ".join(name_of(h, names) for h in self.unconsumed) or "none"
        if self.kind == "added":
            what = (f"step {self.new_step!r} has no memo while memoized step(s) "
                    f"[{left}] were not reached")
        elif self.kind == "output_shape":
            what = (f"the memo of step {self.new_step!r} does not fit its declared type "
                    f"({self.detail})")
        else:
            what = f"memoized step(s) [{left}] were not reached{self.detail}"
        return f"version drift in {self.function} (run {self.run_id}): {what}"


@dataclass
class Request:
    """What the tracker needs to know about the request (see RequestIdentity)."""

    run_id: str
    function_slug: str
    step_id: str | None
    payload: bytes = b""


class RequestDrift:
    """Follows one request's memo lookups. Built by :meth:`DriftGuard.begin`."""

    def __init__(self, guard: DriftGuard, request: Request, *, replay: bool = False) -> None:
        self.guard = guard
        self.request = request
        self.replay = replay
        target = request.step_id
        self.target = target if target and target != server_lib.UNSPECIFIED_STEP_ID else None
        self.policy = _DEFAULT_POLICY
        self.memos: step_lib.StepMemos | None = None
        self.snapshot: dict[str, Output] = {}
        self.consumed: list[str] = []
        self.new_steps: list[step_lib.StepInfo] = []
        self.names: dict[str, str] = {}
        self.declared: dict[str, object] = {}
        self.drifts: list[Drift] = []
        self.failure: str | None = None
        self.stopped_at: step_lib.StepInfo | None = None
        self.attached = False

    def attach(self, execution: Any, function: Any) -> None:
        """Called (by the executor, which builds the execution) before the handler runs."""
        try:
            memos = execution._memos
            raw: object = memos._memos
        except AttributeError as exc:
            # An SDK whose internals moved: run unguarded (as the SDK alone would) rather
            # than fail every run. The contract tests catch this before a release.
            _warn_unsupported(exc)
            return
        if not isinstance(raw, dict):
            _warn_unsupported(TypeError(f"StepMemos._memos is {type(raw).__name__}"))
            return
        self.attached = True
        self.memos = memos
        if _policies:
            self.policy = policy_for(str(function.id), getattr(function, "local_id", None))
        for old, new in self.policy.renamed.items():
            # A deliberate rename: hand each occurrence's old memo to the new id.
            for old_text, new_text in zip(occurrence_ids(old), occurrence_ids(new), strict=True):
                old_hash, new_hash = hash_step_id(old_text), hash_step_id(new_text)
                if old_hash in raw and new_hash not in raw:
                    raw[new_hash] = raw.pop(old_hash)
        if self.guard.recorder is not None:
            self.snapshot = dict(raw)  # memos fetched from the API are not in the payload

    def before_step(self, info: step_lib.StepInfo) -> None:
        """Called before the SDK looks up ``info``'s memo; may raise DriftStop."""
        assert self.memos is not None
        hashed = info.id
        label = step_label(info)
        self.names[hashed] = label
        _remember(hashed, label)
        remaining: dict[str, Output] = self.memos._memos
        memo = remaining.get(hashed)
        if memo is not None:
            self.consumed.append(hashed)
            declared = self.declared.get(info.display_name)
            if (declared is not None and info.op == server_lib.Opcode.STEP_RUN
                    and memo.error is None):
                problem = shape_error(memo.data, declared)
                if problem is not None:
                    self._found(Drift("output_shape", self.request.function_slug,
                                      self.request.run_id, [], label, info.op.value, problem))
            return
        self.new_steps.append(info)
        in_parallel = step_lib.in_parallel.get()
        if self.replay:
            if not in_parallel:
                # Replay runs nothing: the first step with no memo ends it (inside a
                # parallel group the SDK only plans it, and siblings may hold memos).
                self.stopped_at = info
                left = [h for h in remaining if h != hashed]
                if left:
                    self._found(Drift("added", self.request.function_slug,
                                      self.request.run_id, left, label, info.op.value))
                raise DriftStop("replay stopped at a step with no memo")
            return
        if in_parallel or self.target is not None:
            # Not decidable yet: later siblings' memos are consumed after this step.
            return
        if remaining:
            self._found(Drift("added", self.request.function_slug, self.request.run_id,
                              list(remaining), label, info.op.value))

    def _found(self, drift: Drift) -> None:
        self.drifts.append(drift)
        fail = self.guard.report(self, drift)
        if fail and not self.replay:
            self.failure = drift.message(self.guard.names_for(self))
            raise DriftStop(self.failure)

    def finish(self, *, returned: bool) -> None:
        """After the SDK answered: judge what only the end of a request shows."""
        if not self.attached or self.memos is None or self.failure is not None:
            return
        if not self.memos._memos and self.target is None:
            return  # every memo reached: the usual request
        left = list(self.memos._memos)
        reached = set(self.consumed) | {i.id for i in self.new_steps}
        if self.target is not None and self.target not in reached and not self.replay:
            detail = f"; the targeted step #{self.target[:12]} is not in this code"
            self._found_at_end(Drift("unconsumed", self.request.function_slug,
                                     self.request.run_id, left or [self.target],
                                     detail=detail))
            return
        if left and not any(d.kind == "added" for d in self.drifts):
            if self.replay and self.stopped_at is not None:
                return
            detail = "; the function returned" if returned else ""
            new = self.new_steps[0] if self.new_steps else None
            self._found_at_end(Drift("added" if new and not returned else "unconsumed",
                                     self.request.function_slug, self.request.run_id, left,
                                     step_label(new) if new else None,
                                     new.op.value if new else None, detail))

    def _found_at_end(self, drift: Drift) -> None:
        try:
            self._found(drift)
        except DriftStop:
            pass  # self.failure is set: the executor replaces the SDK's answer


# -- the guard ---------------------------------------------------------------------------


class DriftGuard:
    """The worker's drift policy, reporting and optional history recording."""

    def __init__(self, *, on_drift: str = "warn", app_version: str | None = None,
                 count: Callable[[str, str], None] | None = None,
                 recorder: HistoryRecorder | None = None) -> None:
        if on_drift not in ON_DRIFT:
            raise ValueError(f"on_drift={on_drift!r}: expected one of {', '.join(ON_DRIFT)}")
        self.on_drift = on_drift
        self.app_version = app_version
        self.count = count
        self.recorder = recorder
        self._seen: OrderedDict[tuple[str, str, frozenset[str]], None] = OrderedDict()
        self._lock = threading.Lock()

    def watches(self, memos: int, step_id: str | None) -> bool:
        """Whether a request with ``memos`` memos, targeting ``step_id``, needs a tracker.

        With no memo there is nothing to leave unreached, rename or check the shape of,
        and without a targeted step nothing is judged at the end: no drift is possible.
        The history recorder keeps every request, so it watches them all."""
        return (memos > 0 or self.recorder is not None
                or bool(step_id and step_id != server_lib.UNSPECIFIED_STEP_ID))

    def begin(self, request: Request) -> RequestDrift:
        return RequestDrift(self, request)

    def policy(self, tracker: RequestDrift) -> str:
        return tracker.policy.on_drift or self.on_drift

    def report(self, tracker: RequestDrift, drift: Drift) -> bool:
        """Log and count ``drift`` once per run and step; whether the run must fail."""
        step_key = drift.new_step or ""
        key = (drift.run_id, drift.kind + ":" + step_key, frozenset(drift.unconsumed))
        with self._lock:
            fresh = key not in self._seen and not any(
                # Under warn, a run keeps its unreached memos: later requests of the same
                # run carry them again. Report those leftovers once per run.
                k[0] == drift.run_id and key[2] and key[2] <= k[2] for k in self._seen)
            if fresh:
                self._seen[key] = None
                if len(self._seen) > _SEEN_KEPT:
                    self._seen.popitem(last=False)
        policy = self.policy(tracker)
        if fresh and not tracker.replay:
            names = self.names_for(tracker)
            event(log, "run.version_drift", level=logging.WARNING,
                  kind=drift.kind, function=drift.function, run_id=drift.run_id,
                  unconsumed=[name_of(h, names) for h in drift.unconsumed],
                  unconsumed_hashes=drift.unconsumed, new_step=drift.new_step,
                  new_step_op=drift.new_step_op, detail=drift.detail or None,
                  app_version=self.app_version, on_drift=policy)
            if self.count is not None:
                self.count(drift.function, drift.kind)
        return policy == "fail"

    def names_for(self, tracker: RequestDrift) -> dict[str, str]:
        """Step names for ``tracker``'s memo keys: this request's, then the run's recorded
        history (names an older version used)."""
        names = {}
        if self.recorder is not None and not tracker.replay:
            names.update(self.recorder.names_for(tracker.request.run_id))
        names.update(tracker.names)
        return names

    def finish(self, tracker: RequestDrift, *, returned: bool, failed: bool,
               body: bytes = b"") -> str | None:
        """End of a request: the drift message if the run must fail now, else None.
        ``body`` is the SDK's answer (the recorder keeps the step output it reports)."""
        tracker.finish(returned=returned)
        if self.recorder is not None and tracker.attached:
            self.recorder.record(tracker, returned=returned, failed=failed, body=body)
        return tracker.failure


def guard_from_config(config: Config, apps: Sequence[tuple[Any, Any]],
                      metrics: WorkerMetrics | None = None) -> DriftGuard:
    """The worker's guard: CONNECT_WORKER_ON_DRIFT, the app version, the drift counter
    and, with CONNECT_WORKER_RECORD_HISTORY, the history recorder."""
    version = config.app_version or next(
        (str(c.app_version) for c, _ in apps if getattr(c, "app_version", None)), None)
    recorder = None
    if config.record_history:
        recorder = HistoryRecorder(config.record_history,
                                   shape_only=config.record_history_shape_only,
                                   app_version=version)
    count = None
    if metrics is not None:
        counter = metrics.version_drift_total

        def count(function: str, kind: str) -> None:
            counter.labels(function=function, kind=kind).inc()

    return DriftGuard(on_drift=config.on_drift, app_version=version, count=count,
                      recorder=recorder)


# The tracker of the request being served. Set by the executor around the SDK call and
# read by the hooks below, in the request's context (a worker thread for ``def``
# functions: the executor's thread pool carries the context).
_tracker: ContextVar[RequestDrift | None] = ContextVar("connect_worker_drift", default=None)


def set_tracker(tracker: RequestDrift | None) -> Token[RequestDrift | None]:
    return _tracker.set(tracker)


def reset_tracker(token: Token[RequestDrift | None]) -> None:
    _tracker.reset(token)


_unsupported_warned = threading.Event()


def _warn_unsupported(exc: Exception) -> None:
    if not _unsupported_warned.is_set():
        _unsupported_warned.set()
        event(log, "drift.guard_unavailable", level=logging.ERROR, error=str(exc))


# -- the hooks in the SDK ----------------------------------------------------------------
#
# Methods of the SDK's execution classes, wrapped once per process: ``report_step``
# (every step kind asks it for its memo) and ``Step.run`` (learns declared return types).
# The tracker is attached to the request's memos by the executor, which builds the
# execution (``RequestDrift.attach``).
# Outside a guarded request (no tracker in the context) each wrapper only calls the SDK.
# Class-level rather than an SDK middleware: a middleware that does nothing at all costs
# the SDK about 50 us per request (a sixth of a whole request), more than the guard.

_installed = False
_install_lock = threading.Lock()


def install_hooks() -> None:
    """Wrap the SDK methods the guard watches (idempotent)."""
    global _installed  # set once per process
    with _install_lock:
        if _installed:
            return
        _installed = True
        _hook_async(execution_lib.ExecutionV0)
        _hook_sync(execution_lib.ExecutionV0Sync)
        for cls in (step_lib.Step, step_lib.StepSync):
            _hook_step_run(cls)


def _hook_async(cls: Any) -> None:
    report_step = cls.report_step

    @functools.wraps(report_step)
    async def hooked_report_step(self: Any, info: step_lib.StepInfo) -> Any:
        tracker = _tracker.get()
        if tracker is not None and tracker.memos is self._memos:
            tracker.before_step(info)
        return await report_step(self, info)

    cls.report_step = hooked_report_step


def _hook_sync(cls: Any) -> None:
    report_step = cls.report_step

    @functools.wraps(report_step)
    def hooked_report_step(self: Any, info: step_lib.StepInfo) -> Any:
        tracker = _tracker.get()
        if tracker is not None and tracker.memos is self._memos:
            tracker.before_step(info)
        return report_step(self, info)

    cls.report_step = hooked_report_step


def _hook_step_run(cls: Any) -> None:
    run = cls.run

    @functools.wraps(run)
    def hooked(self: Any, step_id: str, handler: Any, *args: Any,
               output_type: object = types.empty_sentinel) -> Any:
        # Returns the SDK's coroutine unawaited for Step (async), its result for StepSync.
        tracker = _tracker.get()
        # Only a memo's shape is checked: with none left, no step's type is needed.
        if tracker is not None and tracker.memos is not None and tracker.memos._memos:
            declared = declared_type(handler, output_type)
            if declared is not None:
                tracker.declared[step_id] = declared
        return run(self, step_id, handler, *args, output_type=output_type)

    cls.run = hooked
