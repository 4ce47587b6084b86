"""OpenTelemetry traces: the hooks the engine and the LLM toolkit call, and the switch.

Tracing is on when the standard variables ask for it (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or ``OTEL_TRACES_EXPORTER=console``) and
``OTEL_SDK_DISABLED`` is not ``true``; :func:`setup` then loads the implementation
(``ops/_otel.py``, the only module that imports ``opentelemetry``). With tracing off
every hook below is one call that returns at once: nothing of OpenTelemetry is ever
imported, and the engine's hot path pays a few function calls per step.

The hooks take the engine's objects (a step with ``.request``, a session with ``.id``)
so that they stay one line each wherever the engine keeps its state:

    step_started(step)            ACKed: the step's span starts (event ``ack``)
    step_outcome(step, outcome)   the SDK answered: outcome, status and step name
    step_event(step, name)        reply.sent, reply.acked, reply.flushed,
                                  lease.extension_failed, handed_back
    step_finished(step[, outcome]) delivered (or lease_lost): the span ends
    drain_started(steps) / drain_finished(exit_code)
    session_started(session) / session_finished(session)
    enter_step(request) / exit_step(token)   the step's span is current in user code
    llm_span(call) / llm_answered(result, outcome)   a model call (llm/client.py)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError
from .platform_resource import PLATFORM_RESOURCE as PLATFORM_RESOURCE  # (re-exported)

if TYPE_CHECKING:
    from ..config import Config
    from ..protocol import ExecutorRequest
    from ._otel import Tracing

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTALL_HINT = "pip install 'connect-worker[otel]'"


# The implementation while tracing is on; None (the default) turns every hook into a
# no-op. Set by setup(), cleared by shutdown().
_t: Tracing | None = None


class StepLike(Protocol):
    """A step of the engine: hashable by identity (two copies of one request, in tests
    with two workers in one process, are two steps)."""

    @property
    def request(self) -> ExecutorRequest: ...


class SessionLike(Protocol):
    @property
    def id(self) -> str: ...


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces (the OpenTelemetry SDK's own variables)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter == "console":
        return True
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def setup(config: Config, environ: Mapping[str, str] = os.environ, *,
          set_global: bool = True) -> bool:
    """Start tracing if the environment asks for it; True when it is on.

    Raises ConfigError (one line, exit 2 from the CLI) when it is asked for and cannot be
    done: the packages are missing or the protocol is not supported. ``set_global`` makes
    our tracer provider OpenTelemetry's global one, so spans of the user's code and of
    other instrumentations go to the same exporter (tests leave it unset: the global
    provider can be set once per process).
    """
    global _t
    if not wanted(environ):
        return False
    try:
        from . import _otel
    except ImportError as exc:
        variable = next((n for n in ENDPOINT_VARIABLES if environ.get(n)),
                        "OTEL_TRACES_EXPORTER")
        raise ConfigError(f"{variable} is set but OpenTelemetry is not installed "
                          f"({exc.name or exc}): {INSTALL_HINT}") from None
    shutdown()
    _t = _otel.Tracing.from_env(config, environ, set_global=set_global)
    return True


def shutdown() -> None:
    """Export what is left and turn tracing off (end of the process, or of a test)."""
    global _t
    current, _t = _t, None
    if current is not None:
        current.shutdown()


def enabled() -> bool:
    return _t is not None


def force_flush() -> None:
    if _t is not None:
        _t.force_flush()


# ----- engine hooks (each a no-op while tracing is off) ------------------------------


def step_started(step: StepLike) -> None:
    if _t is not None:
        _t.step_started(step)


def step_outcome(step: StepLike, outcome: Any) -> None:
    if _t is not None:
        _t.step_outcome(step, outcome)


def step_event(step: StepLike, name: str) -> None:
    if _t is not None:
        _t.step_event(step, name)


def step_finished(step: StepLike, outcome: str | None = None) -> None:
    if _t is not None:
        _t.step_finished(step, outcome)


def drain_started(steps: Iterable[StepLike]) -> None:
    if _t is not None:
        _t.drain_started(list(steps))


def drain_finished(exit_code: int) -> None:
    if _t is not None:
        _t.drain_finished(exit_code)


def session_started(session: SessionLike) -> None:
    if _t is not None:
        _t.session_started(session)


def session_finished(session: SessionLike) -> None:
    if _t is not None:
        _t.session_finished(session)


def enter_step(request: ExecutorRequest) -> object:
    """Make the step's span current in the user task (its own spans and the LLM
    toolkit's nest under it); returns the token for :func:`exit_step`."""
    return None if _t is None else _t.enter_step(request)


def exit_step(token: object) -> None:
    if token is not None and _t is not None:
        _t.exit_step(token)


# ----- LLM toolkit hooks --------------------------------------------------------------


def llm_span(call: Any) -> Any:
    """A context manager around one ``LLM.complete`` call (a GenAI client span)."""
    if _t is None:
        return nullcontext()
    return _t.llm_span(call)


def llm_answered(result: Any, outcome: str) -> None:
    """How the current model call was answered: ok, resumed, stopped, cached or waited."""
    if _t is not None:
        _t.llm_answered(result, outcome)
