"""One model call's HTTP attempts: retried with backoff (honouring the provider's
retry-after) within the attempt limit and the time budget, then given up on clearly.

A timed-out attempt may have been billed (the provider may have finished it): it is
counted as such. An answer that should be JSON and is not was paid for: it is counted
as spend, then asked again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import timedelta

import inngest
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_random_exponential

from ..ops.logs import event
from .config import LLMConfig
from .errors import LLMUnavailableError, Transient
from .metrics import LLMMetrics
from .pricing import PriceTable
from .providers import OnText, Provider
from .types import Answer, Call, parse_json_text

log = logging.getLogger("connect_worker.llm")


class Abandon:
    """Set once the caller of a model call was cancelled; the call finishes on its own."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


async def send(provider: Provider, call: Call, config: LLMConfig, metrics: LLMMetrics,
               prices: PriceTable, *, stream: bool, on_text: OnText | None,
               should_stop: Callable[[], bool] | None,
               next_request: Callable[[], Call] | None = None,
               abandon: Abandon | None = None) -> tuple[Answer, int]:
    """The answer and the number of attempts it took. ``next_request`` gives each attempt's
    request (a continuation of what a broken stream already received); LLMUnavailableError
    or inngest.RetryAfterError once the limits are reached."""
    labels = (call.provider, call.model)
    started = time.monotonic()
    backoff = wait_random_exponential(multiplier=config.backoff_initial,
                                      max=config.backoff_max)

    def wait(state: RetryCallState) -> float:
        assert state.outcome is not None
        exc = state.outcome.exception()
        hinted = exc.retry_after if isinstance(exc, Transient) else None
        return max(backoff(state), hinted or 0.0)

    def stop(state: RetryCallState) -> bool:
        upcoming: float = state.upcoming_sleep or 0.0
        return (state.attempt_number >= config.max_attempts
                or (state.seconds_since_start or 0.0) + upcoming >= config.retry_budget)

    def before_sleep(state: RetryCallState) -> None:
        assert state.outcome is not None
        metrics.retries.labels(*labels).inc()
        event(log, "llm.retry", level=logging.WARNING, provider=labels[0], model=labels[1],
              attempt=state.attempt_number, wait=round(state.upcoming_sleep, 3),
              error=str(state.outcome.exception()))

    retrying = AsyncRetrying(retry=retry_if_exception_type(Transient), wait=wait, stop=stop,
                             before_sleep=before_sleep, reraise=True)
    attempts = 0
    try:
        async for attempt in retrying:
            with attempt:
                if attempts and abandon is not None and abandon.is_set():
                    # The step is gone: finish a request in flight, never start another.
                    raise LLMUnavailableError("the step was cancelled; its model call is "
                                              "not retried in the background")
                attempts += 1
                sent = next_request() if next_request is not None else call
                remaining = config.retry_budget - (time.monotonic() - started)
                timeout = max(min(config.request_timeout, remaining), 1.0)
                try:
                    answer = await provider.send(sent, attempt_timeout=timeout,
                                                 stream=stream, on_text=on_text,
                                                 should_stop=should_stop)
                except Transient as exc:
                    if exc.maybe_billed:
                        metrics.timed_out.labels(*labels).inc()
                    raise
                if call.json_output and not answer.partial and not answer.tool_calls:
                    try:
                        parse_json_text(answer.text)
                    except ValueError:
                        # Paid for but unusable: counted as spend, then asked again.
                        metrics.count_spend(labels, answer.usage,
                                            prices.cost(call.model, answer.usage))
                        raise Transient("the model's answer was not valid JSON") from None
                return answer, attempts
    except Transient as exc:
        waited = round(time.monotonic() - started, 1)
        message = (f"{call.provider} model {call.model!r} still failing after {attempts} "
                   f"attempts in {waited} s: {exc}")
        if exc.retry_after is not None:
            # The provider said when to come back and our budget ran out first:
            # let Inngest schedule the step's retry then, instead of holding the worker.
            raise inngest.RetryAfterError(
                message, timedelta(seconds=math.ceil(exc.retry_after))) from None
        raise LLMUnavailableError(message) from None
    raise AssertionError("unreachable: tenacity either returns or raises")
