"""Errors of the LLM toolkit.

::

    inngest.NonRetriableError
    └── LLMFatalError        retrying cannot help (auth, invalid request, context too long,
                             content refused); Inngest fails the step without retrying
    ConnectWorkerError
    ├── LLMUnavailableError  transient failures outlasted the retry budget; Inngest retries
    │                        the step later (answers already paid for stay in the cache)
    ├── LLMDrainingError     refused: the worker is draining and the call would outlive it
    │                        (or would wait for another copy's call it cannot see through)
    └── LLMRejectedError     the step rejected the answer (``Result.reject``); its retry
                             asks again

A 429 whose retry-after does not fit the remaining budget is raised as
``inngest.RetryAfterError`` so Inngest itself waits that long. Messages name what to
fix and never contain an API key.
"""

from __future__ import annotations

import inngest

from ..errors import ConnectWorkerError


class LLMFatalError(inngest.NonRetriableError):
    """The provider refused the call in a way that retrying cannot fix."""

    def __init__(self, message: str, *, provider: str, status: int | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status


def missing_extra(package: str, extra: str) -> LLMFatalError:
    """The one-line error for an optional dependency that is not installed."""
    return LLMFatalError(f"the {package!r} package is not installed: "
                         f"pip install 'connect-worker[{extra}]'", provider=extra)


class LLMUnavailableError(ConnectWorkerError):
    """Rate limits, 5xx, timeouts or connection errors lasted longer than the retry budget."""


class LLMDrainingError(ConnectWorkerError):
    """The worker is draining, so a new (uncached) model call was refused."""


class LLMRejectedError(ConnectWorkerError):
    """The step rejected the model's answer; the retry of the step asks the model again."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(f"the step rejected the model's answer: {reason}" if reason
                         else "the step rejected the model's answer")
        self.reason = reason


class Transient(Exception):
    """Internal: one attempt failed in a way worth retrying (mapped from the SDKs)."""

    def __init__(self, message: str, *, retry_after: float | None = None,
                 maybe_billed: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # The request reached the provider and we stopped waiting (a timeout): it may
        # well have run to the end and been billed, so a retry can pay twice.
        self.maybe_billed = maybe_billed
