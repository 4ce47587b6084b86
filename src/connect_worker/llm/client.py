"""``LLM.complete``: one call to a model that retries sensibly, accounts for tokens and
dollars, and never pays twice for an answer it already got.

The order of one call::

    identity = explicit key | Connect job_id        (no identity: no caching)
    occurrence = how many identical calls this attempt already made
    cache hit?  -> return it (counted as cached and saved USD)
    draining and refuse_when_draining?  -> LLMDrainingError
    claim the key: held live by another copy?  -> wait for its answer (outcome waited),
        or take the claim over once it lapses; draining -> LLMDrainingError, no wait
    won it: answers the step rejected?  -> ask again, telling the model why
            a partial stream left by a dead owner?  -> continue from it (outcome resumed)
    tenacity loop: send -> Transient? backoff (retry-after honoured) within the budget,
        refreshing the claim and saving the partial text every claim_ttl / 3
    answer -> cache.put immediately -> release the claim -> metrics, log -> Result

The call runs in a task of its own: if the step is cancelled mid-call (its lease was
lost to another copy, which is now waiting on our claim) the request in flight is
finished and stored instead of being thrown away with the tokens already paid for.

A cache failure never fails a call: the answer is already paid for, so it is returned
and the failure logged (a claim that cannot be taken means calling unclaimed).

This module holds that order; the parts live beside it: identity.py (identity and
occurrence), claiming.py (the claim protocol between copies), sending.py (the attempts
and their retries), cache.py (where answers and claims are stored).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import replace
from typing import Any

import inngest
from prometheus_client import CollectorRegistry

from ..context import DrainSignal, current_request, draining
from ..errors import ConfigError
from ..ops import tracing
from ..ops.logs import event
from .cache import (
    Claims,
    ClaimState,
    Partial,
    Rejection,
    ResultCache,
    RunCost,
    cache_key,
    open_cache,
)
from .claiming import Claimed, Claiming
from .config import DEFAULT_MODELS, LLMConfig
from .errors import LLMDrainingError, LLMFatalError, LLMUnavailableError
from .identity import Identity, identity_for, next_occurrence
from .metrics import LLMMetrics, metrics_for
from .pricing import PriceTable
from .providers import AnthropicProvider, OnText, OpenAIProvider, Provider, _estimate
from .sending import Abandon, send
from .types import Answer, Call, Message, Result, Tool, Usage

log = logging.getLogger("connect_worker.llm")

# Model calls that outlived their cancelled caller: kept referenced until they finish.
_background: set[asyncio.Task[Any]] = set()
_HOST = socket.gethostname()

# What a continuation asks (a crashed stream here, a drained one in examples/reports).
CONTINUE = ("Your answer was cut off. Continue exactly where it stops, without repeating "
            "anything and without commenting on the interruption.")


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
        self._claiming = (Claiming(self.cache, self.config, self._drain, self.metrics,
                                   self._cache_get)
                          if isinstance(self.cache, Claims) else None)

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
        reuse: bool = True,
    ) -> Result:
        """Ask ``model`` and return its answer, from the result cache when already paid for.

        ``prompt`` is a single user message (or pass ``messages``). ``json=True`` asks for
        one JSON object and retries answers that do not parse (see ``Result.json()``).
        ``stream=True`` streams (``on_text`` gets each piece); with ``stop_on_drain`` the
        stream stops once the worker drains and the partial answer comes back with
        ``stopped_early=True``. ``key`` identifies the step when not running inside the
        connect_worker executor (e.g. ``f"{ctx.run_id}:{step_id}"``); inside it the
        request's job id is used. ``reuse=False`` always asks the model (no cached
        answer, no waiting for another copy); the answer still counts in ``run_cost``.
        ``Result.reject()`` throws an answer away so that the step's retry asks again.
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
        with tracing.llm_span(call):  # a GenAI client span while tracing is on
            return await self._complete(call, stream, on_text, stop_on_drain, key, run_id,
                                        reuse)

    async def _complete(self, call: Call, stream: bool, on_text: OnText | None,
                        stop_on_drain: bool, key: str | None, run_id: str | None,
                        reuse: bool) -> Result:
        name = call.provider
        labels = (name, call.model)
        identity = identity_for(key, run_id)
        if identity.no_job_id:
            self.metrics.no_identity.labels(*labels).inc()
        digest = call.digest()
        occurrence = next_occurrence(identity.scope, identity.key or "", digest)
        entry = None if identity.key is None else cache_key(identity.key, digest, occurrence)
        fields: dict[str, Any] = {"provider": name, "model": call.model,
                                  "run_id": identity.run_id, "occurrence": occurrence}
        reusable = entry is not None and self.cache is not None and reuse
        if reusable:
            assert entry is not None
            hit = await self._cache_get(entry)
            if hit is not None:
                return self._reused(call, hit, entry, "cached", fields)
        if self.config.refuse_when_draining and self._drain.is_set():
            self.metrics.requests.labels(*labels, "refused").inc()
            event(log, "llm.call", outcome="refused", **fields)
            raise LLMDrainingError("the worker is draining: the model call was not started "
                                   "(Inngest retries the step on another worker)")
        claim: Claimed | None = None
        if reusable and self._claiming is not None:
            assert entry is not None
            owner = f"{_HOST}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
            got = await self._claiming.acquire(entry, owner, labels, fields)
            if isinstance(got, tuple):
                return self._reused(call, got[0], entry, got[1], fields)
            claim = got
        abandon = Abandon()
        work = self._call(call, stream, on_text, stop_on_drain, labels, fields, identity,
                          entry if reuse else None, claim, abandon)
        if entry is None or self.cache is None:
            return await work  # nowhere to store an answer nobody waits for
        return await _finish_if_cancelled(work, abandon, fields)

    async def _call(self, call: Call, stream: bool, on_text: OnText | None,
                    stop_on_drain: bool, labels: tuple[str, str], fields: dict[str, Any],
                    identity: Identity, entry: str | None, claim: Claimed | None,
                    abandon: Abandon) -> Result:
        """Ask the model (continuing a dead owner's partial answer, or asking again after
        a rejection), store the answer and release the claim."""
        base, prefix = call, None
        if claim is not None:
            base, prefix = self._prepare(call, claim.state, fields)
        progress = _Progress(base, prefix, on_text, abandon,
                             savable=stream and not call.tools and not call.json_output)
        if prefix is not None and on_text is not None:
            on_text(prefix.text)
        keeper = None
        if claim is not None:
            keeper = asyncio.ensure_future(claim.keep(progress))
        started = time.monotonic()
        should_stop = self._drain.is_set if stop_on_drain else None
        try:
            answer, attempts = await send(
                self.provider(call.provider), base, self.config, self.metrics, self.prices,
                stream=stream, on_text=progress.on_text, should_stop=should_stop,
                next_request=progress.next_request, abandon=abandon)
        except BaseException as exc:
            if keeper is not None:
                keeper.cancel()
            if claim is not None:
                # The text received so far stays for the next owner to continue, unless
                # retrying cannot help.
                fatal = isinstance(exc, LLMFatalError)
                if not fatal and (partial := progress.partial()) is not None:
                    await claim.refresh(partial)
                await claim.release(keep_partial=not fatal)
            if isinstance(exc, LLMFatalError):
                self.metrics.requests.labels(*labels, "fatal").inc()
                event(log, "llm.call", level=logging.WARNING, outcome="fatal", error=str(exc),
                      **fields)
            elif isinstance(exc, LLMUnavailableError | inngest.RetryAfterError):
                self.metrics.requests.labels(*labels, "gave_up").inc()
                event(log, "llm.call", level=logging.WARNING, outcome="gave_up",
                      error=str(exc), **fields)
            raise
        if keeper is not None:
            keeper.cancel()
        if abandon.is_set():
            self.metrics.background.labels(*labels).inc()
        prefix = progress.prefix  # what was continued: a dead owner's, or a failed attempt's
        if prefix is not None:
            answer = replace(answer, text=prefix.text + answer.text,
                             usage=_add(prefix.usage, answer.usage))
        cost = self.prices.cost(call.model, answer.usage)
        if self.cache is not None and (identity.key is not None or answer.partial):
            # Stored before anything else: from here on a retry of this step reuses it.
            # A partial or unreusable answer is stored under a key nobody looks up, for
            # run_cost only.
            stored = entry if entry is not None and not answer.partial else (
                f"{'partial' if answer.partial else 'unreused'}:{uuid.uuid4()}")
            await self._cache_put(stored, answer, identity.run_id, cost)
        elif identity.run_id is not None:
            self._add_run_total(identity.run_id, answer, cost)
        if claim is not None:
            await claim.release(keep_partial=False)
        outcome = "stopped" if answer.partial else "resumed" if prefix else "ok"
        duration = time.monotonic() - started
        self.metrics.requests.labels(*labels, outcome).inc()
        self.metrics.count_spend(labels, answer.usage, cost)
        self.metrics.duration.labels(*labels).observe(duration)
        if prefix is not None:
            self.metrics.saved_tokens.labels(*labels, "resumed").inc(prefix.usage.output_tokens)
        event(log, "llm.call", outcome=outcome, request_id=answer.request_id,
              input_tokens=answer.usage.input_tokens, output_tokens=answer.usage.output_tokens,
              cached_tokens=answer.usage.cached_tokens, cost_usd=round(cost, 6),
              duration=round(duration, 3), attempts=attempts,
              resumed_chars=len(prefix.text) if prefix else None,
              finished_in_background=abandon.is_set() or None, **fields)
        evict = None
        if entry is not None and self.cache is not None and not answer.partial:
            evict = functools.partial(self._evict, entry, labels, fields)
        result = _result(call.provider, call, answer, cost, cached=False, attempts=attempts,
                         evict=evict)
        tracing.llm_answered(result, outcome)
        return result

    def _prepare(self, call: Call, state: ClaimState, fields: dict[str, Any]
                 ) -> tuple[Call, Partial | None]:
        """For a won claim: the call (asked again after rejections), and the partial text a
        dead or failed owner left if it can be continued."""
        request = call
        if state.rejections:
            request = _ask_again(call, state.rejections)
        partial = state.partial
        if partial is None or not partial.text:
            return request, None
        if call.tools or call.json_output:
            # A half-made tool call or JSON object cannot be continued reliably: ask again.
            event(log, "llm.resume.skipped", reason="tools" if call.tools else "json",
                  partial_chars=len(partial.text), **fields)
            return request, None
        return request, partial

    async def _evict(self, entry: str, labels: tuple[str, str], fields: dict[str, Any],
                     result: Result, reason: str | None) -> None:
        self.metrics.rejected.labels(*labels).inc()
        evicted = False
        if isinstance(self.cache, Claims):
            try:
                evicted = await self.cache.reject(entry, Rejection(result.text, reason))
            except Exception as exc:
                event(log, "llm.cache.error", level=logging.ERROR, op="reject", error=repr(exc))
        event(log, "llm.rejected", level=logging.WARNING, reason=reason, evicted=evicted,
              request_id=result.request_id, **fields)

    def _reused(self, call: Call, answer: Answer, entry: str, via: str,
                fields: dict[str, Any]) -> Result:
        """An answer paid for before (``cached``) or by another copy just now (``waited``)."""
        labels = (call.provider, call.model)
        cost = self.prices.cost(call.model, answer.usage)
        self.metrics.requests.labels(*labels, via).inc()
        self.metrics.cache_hits.labels(*labels).inc()
        self.metrics.saved.labels(*labels).inc(cost)
        self.metrics.saved_tokens.labels(*labels, via).inc(
            answer.usage.input_tokens + answer.usage.output_tokens)
        event(log, "llm.call", outcome=via, cost_usd=round(cost, 6),
              request_id=answer.request_id, **fields)
        result = _result(call.provider, call, answer, cost, cached=True, attempts=0,
                         evict=functools.partial(self._evict, entry, labels, fields))
        tracing.llm_answered(result, via)
        return result

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

class _Progress:
    """The text streamed so far, after ``prefix`` (text already received: a dead owner's
    partial, or a failed attempt's), for saving it and for continuing from it."""

    def __init__(self, base: Call, prefix: Partial | None, on_text: OnText | None,
                 abandon: Abandon, *, savable: bool) -> None:
        self.base = base
        self.prefix = prefix
        self.pieces: list[str] = []
        self.version = 0
        self.savable = savable
        self._on_text = on_text
        self._abandon = abandon

    def on_text(self, piece: str) -> None:
        self.pieces.append(piece)
        self.version += 1
        if self._on_text is not None and not self._abandon.is_set():
            self._on_text(piece)

    def next_request(self) -> Call:
        """The request for the next HTTP attempt: the text a failed attempt streamed is
        continued rather than paid for again (when it can be; else asked from scratch)."""
        if self.pieces:
            if self.savable:
                self.prefix = self.partial()
            self.pieces.clear()
            self.version += 1
        return self.request()

    def request(self) -> Call:
        if self.prefix is None:
            return self.base
        # max_tokens counts what the continuation may add to what is there already.
        remaining = max(self.base.max_tokens - self.prefix.usage.output_tokens, 64)
        turns = (*self.base.messages, Message("assistant", self.prefix.text),
                 Message("user", CONTINUE))
        return replace(self.base, max_tokens=remaining, messages=turns)

    def partial(self) -> Partial | None:
        """What to save: the text so far and an estimate of what it cost (a stream reports
        its usage only at the end). A streamed piece is about a token (OpenAI) or a few
        (Anthropic): the larger of the piece count and 4 characters a token."""
        if not self.savable or not self.pieces:
            return self.prefix
        text = "".join(self.pieces)
        used = Usage(_estimate(self.request(), "").input_tokens,
                     max(len(self.pieces), len(text) // 4))
        if self.prefix is None:
            return Partial(text, used)
        return Partial(self.prefix.text + text, _add(self.prefix.usage, used))


async def _finish_if_cancelled(work: Coroutine[Any, Any, Result], abandon: Abandon,
                               fields: dict[str, Any]) -> Result:
    """Run ``work`` in a task of its own. If the caller is cancelled (e.g. the step lost its
    lease to another copy, which now waits on our claim), the request in flight finishes
    and its answer is stored rather than thrown away; no new attempt is started."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)
    # Once nobody awaits it, its failure is logged by _call; retrieved here, not re-raised.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            abandon.set()
            event(log, "llm.call.detached", level=logging.WARNING, **fields)
        raise


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.input_tokens + b.input_tokens, a.output_tokens + b.output_tokens,
                 a.cached_tokens + b.cached_tokens, a.cache_write_tokens + b.cache_write_tokens)


def _ask_again(call: Call, rejections: Sequence[Rejection]) -> Call:
    """The call once more, after the step rejected earlier answers: the last rejected
    answer as the assistant's turn, then why each was rejected. The request differs
    from every earlier one, so the model (and any cache in front of it) answers anew."""
    reasons = "\n".join(f"{n}. {r.reason or 'no reason given'}"
                        for n, r in enumerate(rejections, 1))
    feedback = (f"That answer was rejected ({len(rejections)} rejected so far):\n{reasons}\n"
                "Answer the original request again, fixing what was wrong.")
    last = rejections[-1].text
    turns = ((Message("assistant", last),) if last.strip() else ()) + (
        Message("user", feedback),)
    return replace(call, messages=call.messages + turns)


def _result(provider: str, call: Call, answer: Answer, cost: float, *, cached: bool,
            attempts: int, evict: Any = None) -> Result:
    result = Result(answer.text, answer.usage, answer.request_id, provider, answer.model, cost,
                    answer.stop_reason, answer.tool_calls, cached, answer.partial, attempts)
    if evict is not None:
        object.__setattr__(result, "_evict", evict)  # frozen; see Result._evict
    return result
