"""WorkerMetrics exposes the names, labels and units the engine, alerts and dashboard rely on."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from connect_worker.ops.metrics import (
    CONNECTION_STATES,
    HotCounter,
    HotHistogram,
    WorkerMetrics,
)

# name -> (type, labels) — the contract with the engine, alerts and the dashboard.
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "connect_worker_build_info": ("gauge", ("version", "app_version", "deployment_id")),
    "connect_worker_connection_state": ("gauge", ("state",)),
    "connect_worker_reconnects": ("counter", ("reason",)),
    "connect_worker_heartbeat_rtt_seconds": ("histogram", ()),
    "connect_worker_steps_in_flight": ("gauge", ()),
    "connect_worker_steps": ("counter", ("function", "outcome")),
    "connect_worker_step_duration_seconds": ("histogram", ("function",)),
    "connect_worker_requests_acked": ("counter", ()),
    "connect_worker_requests_rejected": ("counter", ("reason",)),
    "connect_worker_replies_sent": ("counter", ()),
    "connect_worker_reply_acks": ("counter", ()),
    "connect_worker_flushes": ("counter", ("outcome",)),
    "connect_worker_replies_awaiting_ack": ("gauge", ()),
    "connect_worker_lease_extensions": ("counter", ("outcome",)),
    "connect_worker_draining": ("gauge", ()),
    "connect_worker_drain_duration_seconds": ("gauge", ()),
    "connect_worker_drain_budget_seconds": ("gauge", ()),
    "connect_worker_drain_started_timestamp_seconds": ("gauge", ()),
    "connect_worker_steps_abandoned": ("counter", ()),
    "connect_worker_event_loop_lag_seconds": ("gauge", ()),
    "connect_worker_version_drift": ("counter", ("function", "kind")),
}
FORBIDDEN_LABELS = {"run_id", "request_id", "job_id", "step_id", "lease_id", "connection_id"}


@pytest.fixture
def metrics() -> WorkerMetrics:
    return WorkerMetrics(CollectorRegistry())


def _exercise(m: WorkerMetrics) -> None:
    m.set_build_info("0.1.0", "abc123", "dep-1")
    m.set_connection_state("ready")
    m.reconnects_total.labels(reason="gateway_closing").inc()
    m.heartbeat_rtt_seconds.observe(0.02)
    m.steps_in_flight.inc()
    m.steps_total.labels(function="app-report", outcome="ok").inc()
    m.step_duration_seconds.labels(function="app-report").observe(42)
    m.requests_acked_total.inc()
    m.requests_rejected_total.labels(reason="draining").inc()
    m.replies_sent_total.inc()
    m.reply_acks_total.inc()
    m.flushes_total.labels(outcome="ok").inc()
    m.replies_awaiting_ack.set(1)
    m.lease_extensions_total.labels(outcome="extended").inc()
    m.draining.set(1)
    m.drain_duration_seconds.set(3.5)
    m.steps_abandoned_total.inc()
    m.event_loop_lag_seconds.set(0.001)
    m.version_drift_total.labels(function="app-report", kind="added").inc()


def test_every_metric_has_its_name_type_and_labels(metrics: WorkerMetrics) -> None:
    _exercise(metrics)
    families = {f.name: f for f in metrics.registry.collect()}
    assert set(families) == set(EXPECTED)
    for name, (kind, labels) in EXPECTED.items():
        family = families[name]
        assert family.type == kind, name
        sample_labels = {
            key for s in family.samples for key in s.labels if key != "le"
        }
        assert sample_labels == set(labels), name


def test_naming_follows_prometheus_conventions(metrics: WorkerMetrics) -> None:
    _exercise(metrics)
    text = generate_latest(metrics.registry).decode()
    for family in metrics.registry.collect():
        assert family.name.startswith("connect_worker_")
        if family.type == "counter":
            assert f"{family.name}_total" in text
        assert "_ms" not in family.name and "milliseconds" not in family.name
        for sample in family.samples:
            assert not FORBIDDEN_LABELS & set(sample.labels), sample


def test_connection_state_is_one_hot(metrics: WorkerMetrics) -> None:
    for state in CONNECTION_STATES:
        metrics.set_connection_state(state)
        values = {
            s.labels["state"]: s.value
            for f in metrics.registry.collect() if f.name == "connect_worker_connection_state"
            for s in f.samples
        }
        assert values == {s: (1.0 if s == state else 0.0) for s in CONNECTION_STATES}
    with pytest.raises(ValueError):
        metrics.set_connection_state("bogus")


def test_starts_disconnected_and_build_info_is_replaced(metrics: WorkerMetrics) -> None:
    assert metrics.registry.get_sample_value(
        "connect_worker_connection_state", {"state": "disconnected"}) == 1.0
    metrics.set_build_info("0.1.0", "a", "d1")
    metrics.set_build_info("0.1.0", "b", "d2")
    samples = [s for f in metrics.registry.collect() if f.name == "connect_worker_build_info"
               for s in f.samples]
    assert [s.labels["deployment_id"] for s in samples] == ["d2"]


def test_start_drain_sets_flag_timestamp_and_budget(metrics: WorkerMetrics) -> None:
    metrics.start_drain(55.0)
    get = metrics.registry.get_sample_value
    assert get("connect_worker_draining") == 1.0
    assert get("connect_worker_drain_budget_seconds") == 55.0
    started = get("connect_worker_drain_started_timestamp_seconds")
    assert started is not None and started > 1_700_000_000


def test_step_duration_buckets_reach_thirty_minutes(metrics: WorkerMetrics) -> None:
    metrics.step_duration_seconds.labels(function="f").observe(1700)
    bucket = metrics.registry.get_sample_value(
        "connect_worker_step_duration_seconds_bucket", {"function": "f", "le": "1800.0"})
    below = metrics.registry.get_sample_value(
        "connect_worker_step_duration_seconds_bucket", {"function": "f", "le": "1200.0"})
    assert (bucket, below) == (1.0, 0.0)


def test_two_registries_do_not_collide() -> None:
    WorkerMetrics(CollectorRegistry())
    WorkerMetrics(CollectorRegistry())


# --- The hot-path metrics export exactly what prometheus_client's own objects would. ---


def _twin_registry(m: WorkerMetrics) -> tuple[CollectorRegistry, dict[str, Any]]:
    """A registry exporting, in the same order, prometheus_client twins of ``m``'s hot
    metrics (same name, help, labels, buckets) and ``m``'s other metrics themselves."""
    registry = CollectorRegistry()
    twins: dict[str, Any] = {}
    for attr, value in vars(m).items():
        if isinstance(value, HotCounter):
            twins[attr] = Counter(value._name, value._documentation, value._labelnames,
                                  registry=registry)
        elif isinstance(value, HotHistogram):
            twins[attr] = Histogram(value._name, value._documentation, value._labelnames,
                                    buckets=value._bounds, registry=registry)
        elif isinstance(value, MetricWrapperBase):
            registry.register(value)
    assert set(twins) == {"steps_total", "step_duration_seconds", "requests_acked_total",
                          "replies_sent_total", "reply_acks_total", "lease_extensions_total"}
    return registry, twins


def test_hot_metrics_expose_what_prometheus_client_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)  # the _created samples
    m = WorkerMetrics(CollectorRegistry())
    twin_registry, twin = _twin_registry(m)
    for outcome in ("extended", "nack"):  # as WorkerMetrics pre-creates them
        twin["lease_extensions_total"].labels(outcome=outcome)
    durations = [0.0, 0.05, 0.051, 3.0, 1800.0, 1800.1, 1e9, -1.0]
    for i, duration in enumerate(durations * 3):
        function, outcome = f"fn-{i % 3}", ("ok", "step", "error", "done")[i % 4]
        m.step_finished(function, outcome, duration)
        twin["steps_total"].labels(function=function, outcome=outcome).inc()
        twin["step_duration_seconds"].labels(function=function).observe(duration)
        for attr in ("requests_acked_total", "replies_sent_total", "reply_acks_total"):
            getattr(m, attr).inc()
            twin[attr].inc()
        for metric in (m.lease_extensions_total, twin["lease_extensions_total"]):
            metric.labels(outcome="extended").inc()
    for metric in (m.lease_extensions_total, twin["lease_extensions_total"]):
        metric.labels("nack").inc()
    for metric in (m.steps_total, twin["steps_total"]):
        metric.labels(function="fn-1", outcome="lease_lost").inc(2)
    for metric in (m.step_duration_seconds, twin["step_duration_seconds"]):
        metric.labels(function="unused")  # a series with no observation yet
    assert generate_latest(m.registry) == generate_latest(twin_registry)
    assert openmetrics_latest(m.registry) == openmetrics_latest(twin_registry)


def test_hot_labels_are_checked_like_prometheus_client(metrics: WorkerMetrics) -> None:
    for bad in ({"function": "f"}, {"function": "f", "outcome": "ok", "x": "y"}):
        with pytest.raises(ValueError):
            metrics.steps_total.labels(**bad)
    with pytest.raises(ValueError):
        metrics.steps_total.labels("f")
    with pytest.raises(ValueError):
        metrics.lease_extensions_total.inc()  # labelled: a series must be chosen
    assert metrics.steps_total.labels("f", "ok") is metrics.steps_total.labels(
        outcome="ok", function="f")
    with pytest.raises(ValueError):  # registered: a second copy on the registry collides
        WorkerMetrics(metrics.registry)


def test_histogram_scraped_from_another_thread_is_self_consistent(
        metrics: WorkerMetrics) -> None:
    observations = 50_000
    stop = threading.Event()
    scrapes: list[dict[str, float]] = []

    def scrape() -> None:
        while not stop.is_set():
            scrapes.append({
                f"{s.name}{s.labels.get('le', '')}": s.value
                for f in metrics.registry.collect()
                if f.name == "connect_worker_step_duration_seconds" for s in f.samples
            })

    scraper = threading.Thread(target=scrape)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: mid-observe, mid-collect
    scraper.start()
    try:
        for i in range(observations):
            metrics.step_finished("f", "ok", (i % 40) * 50.0)
    finally:
        stop.set()
        scraper.join(timeout=30)
        sys.setswitchinterval(interval)
    assert not scraper.is_alive()
    scrapes = [samples for samples in scrapes if samples]
    assert scrapes  # at least one scrape saw observations
    for samples in scrapes:
        buckets = [v for k, v in samples.items() if "_bucket" in k]
        assert buckets == sorted(buckets)
        assert samples["connect_worker_step_duration_seconds_count"] == buckets[-1]
    get = metrics.registry.get_sample_value
    assert get("connect_worker_step_duration_seconds_count", {"function": "f"}) == observations
    assert get("connect_worker_steps_total", {"function": "f", "outcome": "ok"}) == observations
