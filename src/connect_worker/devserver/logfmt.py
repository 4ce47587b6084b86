"""Short, readable names for the dev gateway's info log lines (one line per event).

Each helper returns an object that formats itself only when the line is emitted: the
gateway also carries benchmarks, where parsing every reply for a silent logger would
cost time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, ParamSpec

from ..protocol import pb
from .state import ConnectionInfo, Run

P = ParamSpec("P")


class _Lazy:
    __slots__ = ("_render",)

    def __init__(self, render: Callable[[], str]) -> None:
        self._render = render

    def __str__(self) -> str:
        return self._render()


def _lazy(fn: Callable[P, str]) -> Callable[P, object]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> object:
        return _Lazy(lambda: fn(*args, **kwargs))

    return wrapper


@_lazy

def who(info: ConnectionInfo | None) -> str:
    """``worker-a (pipeline@v2, conn 01J…)`` — the worker a person recognises first."""
    if info is None:
        return "no worker"
    apps = ", ".join(f"{a}@{info.app_version[a]}" if info.app_version.get(a) else a
                     for a in info.apps)
    return f"{info.instance_id} ({apps}, conn {info.conn_id})"


@_lazy
def step(run: Run | None, step_id: str) -> str:
    """The step's name when the run has told it, "next step" for a discovery call."""
    if step_id == "step":
        return "next step"
    for h in run.history if run is not None else []:
        if h.get("step") == step_id and h.get("name"):
            return repr(str(h["name"]))
    return step_id[:12]


@_lazy
def error(value: Any, prefix: str = "") -> str:
    """An SDK error as ``Name: message``; ``prefix`` + it, or "" when there is none."""
    if not value:
        return ""
    return prefix + _error(value)


def _error(value: Any) -> str:
    if isinstance(value, dict):
        name, message = value.get("name"), value.get("message")
        if message:
            return f"{name}: {message}" if name else str(message)
    return str(value)[:200]


@_lazy
def reply(response: pb.SDKResponse) -> str:
    """What a worker's reply says: ``run R: step 'draft' done`` or ``function returned``."""
    head = f"run {response.run_id} request {response.request_id}"
    if response.status == pb.SDKResponseStatus.DONE:
        return f"{head}: function returned"
    if response.status == pb.SDKResponseStatus.ERROR:
        return f"{head}: function error"
    try:
        ops = json.loads(response.body or b"[]")
    except ValueError:
        ops = []
    return f"{head}: {_said(ops)}"


@_lazy
def ops(opcodes: Any) -> str:
    """An opcode list as ``step done 'a', step planned 'b'``."""
    return _said(opcodes)


def _said(opcodes: Any) -> str:
    said = [f"{_OPS.get(str(op.get('op')), op.get('op'))} "
            f"{op.get('displayName') or op.get('name') or str(op.get('id'))[:12]!r}"
            for op in (opcodes if isinstance(opcodes, list) else []) if isinstance(op, dict)]
    return ", ".join(said) or "nothing to do"


_OPS = {"StepRun": "step done", "StepError": "step error (will retry)",
        "StepFailed": "step failed", "StepPlanned": "step planned", "Sleep": "sleep",
        "WaitForEvent": "wait for event", "InvokeFunction": "invoke", "Step": "step done",
        "RunComplete": "function returned"}
