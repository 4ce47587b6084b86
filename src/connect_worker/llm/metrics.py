"""Prometheus metrics of the LLM toolkit, defined once per registry.

Labels are provider, model and (for requests) outcome only: never run or step ids.
Outcomes: ``ok`` (answered by the model), ``cached`` (answered by the result cache),
``waited`` (answered by another copy of the step that held the claim), ``resumed``
(continued the partial answer of a crashed owner's or a broken attempt's stream),
``stopped`` (a stream stopped early on drain), ``fatal``, ``gave_up``, ``refused``.
"""

from __future__ import annotations

import threading
import weakref

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from .types import Usage

_LABELS = ("provider", "model")


class LLMMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, *extra: str) -> Counter:
            return Counter(f"connect_worker_llm_{name}", doc, (*_LABELS, *extra),
                           registry=registry)

        self.requests = counter("requests_total", "LLM calls by outcome.", "outcome")
        self.input_tokens = counter("input_tokens_total",
                                    "Input tokens billed (including cached ones).")
        self.cached_tokens = counter("cached_input_tokens_total",
                                     "Input tokens served from the provider's prompt cache.")
        self.output_tokens = counter("output_tokens_total", "Output tokens billed.")
        self.cost = counter("cost_usd_total", "Estimated spend, in US dollars.")
        self.retries = counter("retries_total", "HTTP attempts retried after a transient error.")
        self.timed_out = counter(
            "timed_out_attempts_total",
            "Attempts we stopped waiting for after sending them: the provider may have "
            "finished and billed them (tokens unknown: not in cost_usd_total).")
        self.cache_hits = counter("cache_hits_total",
                                  "Calls answered by the result cache instead of the model.")
        self.saved = counter("saved_usd_total",
                             "Estimated spend avoided by result-cache hits, in US dollars.")
        self.saved_tokens = counter(
            "saved_tokens_total",
            "Tokens not paid again: reused answers (via=cached|waited) and the partial "
            "output a resumed stream did not regenerate (via=resumed).", "via")
        self.rejected = counter("rejected_total",
                                "Answers a step rejected (evicted, asked again on retry).")
        self.takeovers = counter("claim_takeovers_total",
                                 "Claims taken over from a copy that stopped refreshing them.")
        self.background = counter(
            "finished_in_background_total",
            "Model calls whose step was cancelled mid-call and that finished anyway, "
            "storing the answer for the copy waiting on it.")
        self.no_identity = counter(
            "no_identity_total",
            "Calls in an executor request with no job_id (servers before Inngest v1.19.3): "
            "not cached and not claimed, since no identity is stable across retries.")
        self.duration = Histogram(
            "connect_worker_llm_request_duration_seconds",
            "Time from first attempt to answer for calls that reached the model.",
            _LABELS, registry=registry,
            buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600))

    def count_spend(self, labels: tuple[str, str], usage: Usage, cost: float) -> None:
        """Tokens and dollars paid for one answer (used or not)."""
        self.input_tokens.labels(*labels).inc(usage.input_tokens)
        self.cached_tokens.labels(*labels).inc(usage.cached_tokens)
        self.output_tokens.labels(*labels).inc(usage.output_tokens)
        self.cost.labels(*labels).inc(cost)


_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, LLMMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(registry: CollectorRegistry | None = None) -> LLMMetrics:
    """The metrics on ``registry`` (default: the process registry the worker serves)."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        found = _by_registry.get(registry)
        if found is None:
            found = _by_registry[registry] = LLMMetrics(registry)
        return found
