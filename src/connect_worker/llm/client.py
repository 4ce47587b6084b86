"""``LLM.complete``: one call to a model that retries sensibly, accounts for tokens and
dollars, and never pays twice for an answer it already got.

The order of one call::

    identity = explicit key | Connect job_id        (no identity: no caching)
    occurrence = how many identical calls this attempt already made
    cache hit?  -> return it (counted as cached and saved USD)
    draining and refuse_when_draining?  -> LLMDrainingError
    tenacity loop: send -> Transient? backoff (retry-after honoured) within the budget
    answer -> cache.put immediately -> metrics, log -> Result

A cache failure never fails a call: the answer is already paid for, so it is returned
and the failure logged.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import inngest
from prometheus_client import CollectorRegistry
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_random_exponential

from ..context import DrainSignal, current_request, draining
from ..errors import ConfigError
from ..ops.logs import event
from .cache import ResultCache, RunCost, cache_key, open_cache
from .config import DEFAULT_MODELS, LLMConfig
from .errors import LLMDrainingError, LLMFatalError, LLMUnavailableError, Transient
from .metrics import LLMMetrics, metrics_for
from .pricing import PriceTable
from .providers import AnthropicProvider, OnText, OpenAIProvider, Provider
from .types import Answer, Call, Message, Result, Tool, Usage, parse_json_text

log = logging.getLogger("connect_worker.llm")

# Identical calls made outside an executor request are numbered per asyncio task.
_task_scope: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "connect_worker_llm_scope", default=None)
# Identical calls are numbered per (attempt, identity, request), process-wide, so two LLM
# objects used by one step agree. Old attempts fall off the end.
_occurrences: OrderedDict[tuple[str, str, str], int] = OrderedDict()
_occurrences_lock = threading.Lock()
_MAX_SCOPES = 10_000


@dataclass(frozen=True, slots=True)
class _Identity:
    key: str | None  # None: nothing to key a cache entry on
    scope: str  # one attempt of one step
    run_id: str | None


class LLM:
    """Calls models through the official SDKs. Safe to share across event loops and threads."""

    def __init__(
        self,
        config: LLMConfig | None = None,
        *,
        cache: ResultCache | str | None = "config",
        registry: CollectorRegistry | None = None,
        prices: PriceTable | None = None,
        providers: Mapping[str, Provider] | None = None,
        drain: DrainSignal | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self.config = config or LLMConfig()
        self.cache: ResultCache | None = (
            open_cache(self.config.cache, ttl=self.config.cache_ttl) if cache == "config"
            else None if isinstance(cache, str) else cache)
        self.metrics: LLMMetrics = metrics_for(registry)
        self.prices = prices or PriceTable.from_env(environ)
        self._providers: dict[str, Provider] = dict(providers or {})
        self._drain = drain or draining()
        self._environ = environ
        self._run_totals: dict[str, RunCost] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ,
                 registry: CollectorRegistry | None = None) -> LLM:
        return cls(LLMConfig.from_env(environ), registry=registry, environ=environ)

    def default_provider(self) -> str:
        """The configured provider, or the one whose API key is set (LLMFatalError if none)."""
        try:
            return self.config.default_provider(self._environ)
        except ConfigError as exc:
            raise LLMFatalError(str(exc), provider="none") from None

    def provider(self, name: str) -> Provider:
        found = self._providers.get(name)
        if found is None:
            if name == "openai":
                found = OpenAIProvider()
            elif name == "anthropic":
                found = AnthropicProvider()
            elif name == "simulated":
                from .simulated import SimulatedProvider

                found = SimulatedProvider(speedup=self.config.sim_speedup)
            else:
                raise ConfigError(f"unknown LLM provider {name!r}: expected openai, anthropic "
                                  "or simulated")
            self._providers[name] = found
        return found

    async def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[Message] = (),
        system: str | None = None,
        provider: str | None = None,
        model: str | None = None,
        max_tokens: int = 1024,
        temperature: float | None = None,
        tools: Sequence[Tool] = (),
        json: bool = False,
        stream: bool = False,
        on_text: OnText | None = None,
        stop_on_drain: bool = False,
        key: str | None = None,
        run_id: str | None = None,
    ) -> Result:
        """Ask ``model`` and return its answer, from the result cache when already paid for.

        ``prompt`` is a single user message (or pass ``messages``). ``json=True`` asks for
        one JSON object and retries answers that do not parse (see ``Result.json()``).
        ``stream=True`` streams (``on_text`` gets each piece); with ``stop_on_drain`` the
        stream stops once the worker drains and the partial answer comes back with
        ``stopped_early=True``. ``key`` identifies the step when not running inside the
        connect_worker executor (e.g. ``f"{ctx.run_id}:{step_id}"``); inside it the
        request's job id is used.
        """
        chat = tuple(messages) + ((Message("user", prompt),) if prompt is not None else ())
        if not chat:
            raise ValueError("complete() needs a prompt or messages")
        name = provider or self.default_provider()
        model = model or self.config.model or DEFAULT_MODELS.get(name)
        try:
            self.provider(name)
            if not model:
                raise ConfigError(f"no model for provider {name!r}: pass model= or set "
                                  "CONNECT_WORKER_LLM_MODEL")
        except ConfigError as exc:
            # Retrying the step cannot fix the configuration.
            raise LLMFatalError(str(exc), provider=name) from None
        call = Call(name, model, chat, system, max_tokens, temperature, tuple(tools), json)
        labels = (name, call.model)
        identity = self._identity(key, run_id)
        digest = call.digest()
        occurrence = self._next_occurrence(identity.scope, identity.key or "", digest)
        entry = None if identity.key is None else cache_key(identity.key, digest, occurrence)
        fields: dict[str, Any] = {"provider": name, "model": call.model,
                                  "run_id": identity.run_id, "occurrence": occurrence}
        if entry is not None and self.cache is not None:
            hit = await self._cache_get(entry)
            if hit is not None:
                cost = self.prices.cost(call.model, hit.usage)
                self.metrics.requests.labels(*labels, "cached").inc()
                self.metrics.cache_hits.labels(*labels).inc()
                self.metrics.saved.labels(*labels).inc(cost)
                event(log, "llm.call", outcome="cached", cost_usd=round(cost, 6),
                      request_id=hit.request_id, **fields)
                return _result(name, call, hit, cost, cached=True, attempts=0)
        if self.config.refuse_when_draining and self._drain.is_set():
            self.metrics.requests.labels(*labels, "refused").inc()
            event(log, "llm.call", outcome="refused", **fields)
            raise LLMDrainingError("the worker is draining: the model call was not started "
                                   "(Inngest retries the step on another worker)")
        started = time.monotonic()
        should_stop = self._drain.is_set if stop_on_drain else None
        try:
            answer, attempts = await self._send(call, stream, on_text, should_stop, labels)
        except LLMFatalError as exc:
            self.metrics.requests.labels(*labels, "fatal").inc()
            event(log, "llm.call", level=logging.WARNING, outcome="fatal", error=str(exc),
                  **fields)
            raise
        except (LLMUnavailableError, inngest.RetryAfterError) as exc:
            self.metrics.requests.labels(*labels, "gave_up").inc()
            event(log, "llm.call", level=logging.WARNING, outcome="gave_up", error=str(exc),
                  **fields)
            raise
        cost = self.prices.cost(call.model, answer.usage)
        if self.cache is not None and (entry is not None or answer.partial):
            # Stored before anything else: from here on a retry of this step reuses it.
            # A partial answer is stored under a key nobody looks up, for run_cost only.
            await self._cache_put(f"partial:{uuid.uuid4()}" if answer.partial else entry or "",
                                  answer, identity.run_id, cost)
        elif identity.run_id is not None:
            self._add_run_total(identity.run_id, answer, cost)
        outcome = "stopped" if answer.partial else "ok"
        duration = time.monotonic() - started
        self.metrics.requests.labels(*labels, outcome).inc()
        self._count_spend(labels, answer.usage, cost)
        self.metrics.duration.labels(*labels).observe(duration)
        event(log, "llm.call", outcome=outcome, request_id=answer.request_id,
              input_tokens=answer.usage.input_tokens, output_tokens=answer.usage.output_tokens,
              cached_tokens=answer.usage.cached_tokens, cost_usd=round(cost, 6),
              duration=round(duration, 3), attempts=attempts, **fields)
        return _result(name, call, answer, cost, cached=False, attempts=attempts)

    async def run_cost(self, run_id: str | None = None) -> RunCost:
        """What the run (default: the one being executed) has paid for its answers so far,
        across retries and workers when the cache is shared."""
        if run_id is None:
            request = current_request()
            if request is None:
                raise ValueError("run_cost() outside an executor request needs run_id")
            run_id = request.run_id
        if self.cache is not None:
            try:
                return await self.cache.run_cost(run_id)
            except Exception:
                log.exception("llm.cache.error: run_cost failed; using this process's total")
        return self._run_totals.get(run_id, RunCost())

    async def aclose(self) -> None:
        if self.cache is not None:
            await self.cache.close()

    # -- internals -------------------------------------------------------------------

    def _identity(self, key: str | None, run_id: str | None) -> _Identity:
        request = current_request()
        if request is not None:
            return _Identity(key or f"job:{request.job_id}", request.request_id,
                             run_id or request.run_id)
        scope = _task_scope.get()
        if scope is None:
            scope = str(uuid.uuid4())
            _task_scope.set(scope)
        return _Identity(key, scope, run_id)

    @staticmethod
    def _next_occurrence(scope: str, identity: str, digest: str) -> int:
        slot = (scope, identity, digest)
        with _occurrences_lock:
            count = _occurrences.pop(slot, 0)
            _occurrences[slot] = count + 1
            while len(_occurrences) > _MAX_SCOPES:
                _occurrences.popitem(last=False)
        return count

    def _count_spend(self, labels: tuple[str, str], usage: Usage, cost: float) -> None:
        self.metrics.input_tokens.labels(*labels).inc(usage.input_tokens)
        self.metrics.cached_tokens.labels(*labels).inc(usage.cached_tokens)
        self.metrics.output_tokens.labels(*labels).inc(usage.output_tokens)
        self.metrics.cost.labels(*labels).inc(cost)

    def _add_run_total(self, run_id: str, answer: Answer, cost: float) -> None:
        old = self._run_totals.get(run_id, RunCost())
        self._run_totals[run_id] = RunCost(old.cost_usd + cost,
                                           old.input_tokens + answer.usage.input_tokens,
                                           old.output_tokens + answer.usage.output_tokens,
                                           old.calls + 1)

    async def _cache_get(self, entry: str) -> Answer | None:
        assert self.cache is not None
        try:
            return await self.cache.get(entry)
        except Exception as exc:
            event(log, "llm.cache.error", level=logging.ERROR, op="get", error=repr(exc))
            return None

    async def _cache_put(self, entry: str, answer: Answer, run_id: str | None,
                         cost: float) -> None:
        assert self.cache is not None
        try:
            await self.cache.put(entry, answer, run_id=run_id, cost_usd=cost)
        except Exception as exc:
            event(log, "llm.cache.error", level=logging.ERROR, op="put", error=repr(exc))
            if run_id is not None:
                self._add_run_total(run_id, answer, cost)

    async def _send(self, call: Call, stream: bool, on_text: OnText | None,
                    should_stop: Callable[[], bool] | None, labels: tuple[str, str],
                    ) -> tuple[Answer, int]:
        cfg = self.config
        provider = self.provider(call.provider)
        started = time.monotonic()
        backoff = wait_random_exponential(multiplier=cfg.backoff_initial, max=cfg.backoff_max)

        def wait(state: RetryCallState) -> float:
            assert state.outcome is not None
            exc = state.outcome.exception()
            hinted = exc.retry_after if isinstance(exc, Transient) else None
            return max(backoff(state), hinted or 0.0)

        def stop(state: RetryCallState) -> bool:
            upcoming: float = state.upcoming_sleep or 0.0
            return (state.attempt_number >= cfg.max_attempts
                    or (state.seconds_since_start or 0.0) + upcoming >= cfg.retry_budget)

        def before_sleep(state: RetryCallState) -> None:
            assert state.outcome is not None
            self.metrics.retries.labels(*labels).inc()
            event(log, "llm.retry", level=logging.WARNING, provider=labels[0], model=labels[1],
                  attempt=state.attempt_number, wait=round(state.upcoming_sleep, 3),
                  error=str(state.outcome.exception()))

        retrying = AsyncRetrying(retry=retry_if_exception_type(Transient), wait=wait, stop=stop,
                                 before_sleep=before_sleep, reraise=True)
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    remaining = cfg.retry_budget - (time.monotonic() - started)
                    timeout = max(min(cfg.request_timeout, remaining), 1.0)
                    answer = await provider.send(call, attempt_timeout=timeout, stream=stream,
                                                 on_text=on_text, should_stop=should_stop)
                    if call.json_output and not answer.partial and not answer.tool_calls:
                        try:
                            parse_json_text(answer.text)
                        except ValueError:
                            # Paid for but unusable: counted as spend, then asked again.
                            self._count_spend(labels, answer.usage,
                                              self.prices.cost(call.model, answer.usage))
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


def _result(provider: str, call: Call, answer: Answer, cost: float, *, cached: bool,
            attempts: int) -> Result:
    return Result(answer.text, answer.usage, answer.request_id, provider, answer.model, cost,
                  answer.stop_reason, answer.tool_calls, cached, answer.partial, attempts)
