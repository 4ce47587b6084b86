"""Confirm-before-run: which functions' step bodies wait for the gateway to confirm the
lease once (an extension granted for the request's lease) before they start.

Why: when the gateway re-routes a forward whose ACK was still on the wire, two workers
hold the same lease id, and only the first to extend it keeps the lease (Inngest's
extend_lease.lua; our dev gateway restates it). The early ownership check
(leases.py) stops the losing copy, but a step shorter than that check has run to its end
by then: its side effect happened twice. With confirm-before-run the losing copy gets its
NACK before its body starts; the cost is one extension round trip before each step
(docs/reliability.md has the figures and says when to turn it on).

Per function with :func:`confirm_before_run`, for every function with
``CONNECT_WORKER_CONFIRM_BEFORE_RUN=1`` (a per-function choice wins).
"""

from __future__ import annotations

import threading
import typing

F = typing.TypeVar("F")

_choices: dict[str, bool] = {}
_lock = threading.Lock()


def confirm_before_run(fn: F, *, enabled: bool = True) -> F:
    """Start ``fn``'s step bodies only after the gateway confirmed the lease once.

    ``fn``: an ``inngest.Function`` or its id (the fully qualified one, ``app-id-fn-id``,
    as requests name it). ``enabled=False`` opts a function out of the worker-wide
    ``CONNECT_WORKER_CONFIRM_BEFORE_RUN``. Returns ``fn``, so it can wrap the decorated
    function.
    """
    key = fn if isinstance(fn, str) else str(getattr(fn, "id"))  # noqa: B009
    with _lock:
        _choices[key] = enabled
    return fn


def wanted(function_slug: str, default: bool) -> bool:
    """Whether the request of ``function_slug`` waits for the confirmation."""
    if not _choices:
        return default
    return _choices.get(function_slug, default)


def clear() -> None:
    """Forget every per-function choice (tests)."""
    with _lock:
        _choices.clear()
