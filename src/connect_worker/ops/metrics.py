"""Prometheus metrics for the worker, on an injected registry.

Naming follows Prometheus conventions: every name starts with ``connect_worker_``,
values are in base units (seconds), counters end in ``_total``. Labels are
bounded: function slugs, outcomes and reasons only, never run, request or job
ids. docs/observability.md describes each metric; the LLM toolkit registers its
own metrics on the same registry.

The metrics bumped once or more per executor request (``HotCounter``,
``HotHistogram``) are plain attributes read by a collector at scrape time, with
the exposition prometheus_client's own objects would give; the rest are
prometheus_client objects.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

PREFIX = "connect_worker_"

CONNECTION_STATES: tuple[str, ...] = ("connecting", "connected", "ready", "paused", "disconnected")

# Round trips to the gateway: milliseconds on a healthy network, seconds when not.
HEARTBEAT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Steps range from sub-second tool calls to half-hour LLM generations.
STEP_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0,
    1200.0, 1800.0,
)


def _use_created() -> bool:
    # prometheus_client's own switch (PROMETHEUS_DISABLE_CREATED_SERIES, or
    # disable_created_metrics()), read at each scrape as its metrics do.
    return bool(getattr(_prometheus_metrics, "_use_created", True))


def _label_values(labelnames: tuple[str, ...], values: Sequence[object],
                  kwargs: dict[str, object]) -> tuple[str, ...]:
    """Label values in ``labelnames`` order, checked as prometheus_client checks them."""
    if values and kwargs:
        raise ValueError("can't pass both *args and **kwargs")
    if kwargs:
        if sorted(kwargs) != sorted(labelnames):
            raise ValueError("Incorrect label names")
        return tuple(str(kwargs[name]) for name in labelnames)
    if len(values) != len(labelnames):
        raise ValueError("Incorrect label count")
    return tuple(str(value) for value in values)


# The hot-path metrics: counted in plain attributes, read by a collector at scrape time.
# prometheus_client takes a lock and checks several things on every inc() (about 1 us);
# an executor request made about six of them. Every mutation happens on the engine's
# event-loop thread, so there is one writer; a scrape from another thread reads values
# that are each whole, and a histogram's count is derived from its buckets (count ==
# +Inf bucket always).


class CounterChild:
    """One series of a hot counter: ``value`` may also be incremented directly."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    """One series of a hot histogram: per-bucket (not cumulative) counts and the sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds  # ends with +Inf
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount, as prometheus_client picks it.
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


C = TypeVar("C", bound=CounterChild | HistogramChild)


class _HotFamily(Collector, Generic[C]):
    """The series of one hot metric, by label values (``labels()`` as prometheus_client
    checks them); an unlabelled metric is its own single series, exported from the start.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 new_child: Callable[[], C], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._new_child: Callable[[], C] = new_child
        self._children: dict[tuple[str, ...], C] = {}
        self._single: C | None = new_child() if not self._labelnames else None
        if self._single is not None:
            self._children[()] = self._single
        registry.register(self)

    def labels(self, *values: object, **kwargs: object) -> C:
        key = _label_values(self._labelnames, values, kwargs)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def _only(self) -> C:
        if self._single is None:
            raise ValueError(f"{self._name} has labels: call labels() first")
        return self._single


class HotCounter(_HotFamily[CounterChild]):
    """A counter with prometheus_client's exposition (``_total``, ``_created``), for
    the engine's event-loop thread only."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, labelnames, CounterChild, registry)

    def inc(self, amount: float = 1.0) -> None:
        self._only().value += amount

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        created = _use_created()
        for key, child in self._children.copy().items():
            family.add_metric(key, float(child.value),
                              created=child.created if created else None)
        yield family


class HotHistogram(_HotFamily[HistogramChild]):
    """A histogram with prometheus_client's exposition (buckets, ``_count``, ``_sum``,
    ``_created``), for the engine's event-loop thread only."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._bounds = tuple(bounds)
        # The "le" label exactly as prometheus_client writes it ("1800.0", "+Inf").
        self._les = [floatToGoString(b) for b in bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames,
                         lambda: HistogramChild(self._bounds), registry)

    def observe(self, amount: float) -> None:
        self._only().observe(amount)

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        created = _use_created()
        for key, child in self._children.copy().items():
            counts = child.counts.copy()  # one consistent snapshot of the buckets
            total = 0.0
            buckets = []
            for le, count in zip(self._les, counts, strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(key, buckets, child.sum)
            if created:
                family.add_sample(self._name + "_created",
                                  dict(zip(self._labelnames, key, strict=True)), child.created)
        yield family


class WorkerMetrics:
    """Every metric the worker exports; one instance per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.build_info = Gauge(
            "connect_worker_build_info",
            "Always 1; labels carry the worker version, the app version and Railway's "
            "deployment id.",
            ["version", "app_version", "deployment_id"],
            registry=r,
        )
        self.connection_state = Gauge(
            "connect_worker_connection_state",
            "1 for the current state of the gateway connection, 0 for the others.",
            ["state"],
            registry=r,
        )
        self.reconnects_total = Counter(
            "connect_worker_reconnects_total",
            "Gateway reconnects, by reason.",
            ["reason"],
            registry=r,
        )
        self.heartbeat_rtt_seconds = Histogram(
            "connect_worker_heartbeat_rtt_seconds",
            "Round trip of worker heartbeats to the gateway.",
            buckets=HEARTBEAT_BUCKETS,
            registry=r,
        )
        self.steps_in_flight = Gauge(
            "connect_worker_steps_in_flight",
            "Executor requests currently running.",
            registry=r,
        )
        self.steps_total = HotCounter(
            "connect_worker_steps_total",
            "Executor requests finished, by function and outcome.",
            ["function", "outcome"],
            registry=r,
        )
        self.step_duration_seconds = HotHistogram(
            "connect_worker_step_duration_seconds",
            "Wall time of executor requests, by function.",
            ["function"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.requests_acked_total = HotCounter(
            "connect_worker_requests_acked_total",
            "Executor requests accepted and acknowledged to the gateway.",
            registry=r,
        )
        self.requests_rejected_total = Counter(
            "connect_worker_requests_rejected_total",
            "Executor requests not taken (e.g. draining, at capacity, unknown app), by reason.",
            ["reason"],
            registry=r,
        )
        self.replies_sent_total = HotCounter(
            "connect_worker_replies_sent_total",
            "Step results sent to the gateway as WORKER_REPLY.",
            registry=r,
        )
        self.reply_acks_total = HotCounter(
            "connect_worker_reply_acks_total",
            "WORKER_REPLY_ACK messages received from the gateway.",
            registry=r,
        )
        self.flushes_total = Counter(
            "connect_worker_flushes_total",
            "Replies sent through the HTTP /v0/connect/flush fallback, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.replies_awaiting_ack = Gauge(
            "connect_worker_replies_awaiting_ack",
            "Replies sent but not yet acknowledged by the gateway or flushed.",
            registry=r,
        )
        self.lease_extensions_total = HotCounter(
            "connect_worker_lease_extensions_total",
            "Request lease extensions, by outcome (extended or nack).",
            ["outcome"],
            registry=r,
        )
        self.draining = Gauge(
            "connect_worker_draining",
            "1 from SIGTERM until the process exits, else 0.",
            registry=r,
        )
        self.drain_duration_seconds = Gauge(
            "connect_worker_drain_duration_seconds",
            "Duration of the last drain (SIGTERM to drained or deadline).",
            registry=r,
        )
        self.drain_budget_seconds = Gauge(
            "connect_worker_drain_budget_seconds",
            "Seconds a drain may take before in-flight steps are abandoned "
            "(CONNECT_WORKER_DRAIN_TIMEOUT or Railway's draining window minus the margin).",
            registry=r,
        )
        self.drain_started_timestamp_seconds = Gauge(
            "connect_worker_drain_started_timestamp_seconds",
            "Unix time the last drain started (SIGTERM); 0 before any drain.",
            registry=r,
        )
        self.steps_abandoned_total = Counter(
            "connect_worker_steps_abandoned_total",
            "Steps still running when the drain deadline passed.",
            registry=r,
        )
        self.event_loop_lag_seconds = Gauge(
            "connect_worker_event_loop_lag_seconds",
            "How late the event loop ran its last scheduled probe.",
            registry=r,
        )
        self.version_drift_total = Counter(
            "connect_worker_version_drift_total",
            "Runs that met code not matching their memoized steps, by function and kind "
            "(added: a step with no memo reached while memos remain; unconsumed: the request "
            "ended with memos never reached; output_shape: a memo not fitting its step's "
            "declared type).",
            ["function", "kind"],
            registry=r,
        )
        # Label children of the per-step metrics, looked up once per (function, outcome).
        self._step_children: dict[tuple[str, str], tuple[CounterChild, HistogramChild]] = {}
        self.set_connection_state("disconnected")
        # Pre-create common label values so dashboards and alert rules see 0, not gaps.
        for outcome in ("extended", "nack"):
            self.lease_extensions_total.labels(outcome=outcome)

    def step_finished(self, function: str, outcome: str, duration: float) -> None:
        """Count one finished step and observe its duration."""
        children = self._step_children.get((function, outcome))
        if children is None:
            children = self._step_children[(function, outcome)] = (
                self.steps_total.labels(function=function, outcome=outcome),
                self.step_duration_seconds.labels(function=function),
            )
        counter, histogram = children
        counter.value += 1
        # HistogramChild.observe(), inlined: this runs once per executor request.
        histogram.counts[bisect_left(histogram.bounds, duration)] += 1
        histogram.sum += duration

    def set_build_info(self, version: str, app_version: str, deployment_id: str) -> None:
        """Publish the one build-info series (replacing any earlier one)."""
        self.build_info.clear()
        self.build_info.labels(
            version=version, app_version=app_version, deployment_id=deployment_id
        ).set(1)

    def start_drain(self, budget_seconds: float | None = None) -> None:
        """Mark the drain as started now (draining=1, start timestamp, optional budget)."""
        if budget_seconds is not None:
            self.drain_budget_seconds.set(budget_seconds)
        self.drain_started_timestamp_seconds.set_to_current_time()
        self.draining.set(1)

    def set_connection_state(self, state: str) -> None:
        """Set ``state`` to 1 and every other known state to 0."""
        if state not in CONNECTION_STATES:
            raise ValueError(f"unknown connection state {state!r}")
        for name in CONNECTION_STATES:
            self.connection_state.labels(state=name).set(1 if name == state else 0)
