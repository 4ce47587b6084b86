"""deploy/: scrape config and alert rules (promtool), Grafana dashboard, docs coverage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry

from connect_worker.ops.metrics import WorkerMetrics

from ..missing import missing

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "connect-worker-dashboard.json"
OBSERVABILITY = REPO / "docs" / "observability.md"
METRIC = re.compile(r"\bconnect_worker_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "info": ("_info",)}


def exported_families() -> dict[str, str]:
    """Family name -> type for the worker's metrics and the LLM toolkit's (same registry)."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    try:
        from connect_worker.llm.metrics import LLMMetrics
    except ImportError:  # the toolkit is optional for this check
        pass
    else:
        LLMMetrics(registry)
    return {family.name: family.type for family in registry.collect()}


def exported_series_names() -> set[str]:
    return {name + suffix for name, kind in exported_families().items()
            for suffix in SUFFIXES[kind]}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing("promtool missing: scripts/setup.d/promtool.sh installs Debian's prometheus")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], cwd=PROMETHEUS, capture_output=True,
                          text=True, timeout=60, check=False)


def test_promtool_accepts_the_scrape_config() -> None:
    result = _run("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules() -> None:
    result = _run("check", "rules", "rules.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_documented() -> None:
    # rules.test.yml feeds series shaped like a real drain / outage through each alert.
    result = _run("test", "rules", "rules.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_discovers_replicas_over_railway_private_ipv6() -> None:
    text = (PROMETHEUS / "prometheus.yml").read_text()
    assert "dns_sd_configs:" in text and "type: AAAA" in text
    assert re.search(r"- [a-z0-9-]+\.railway\.internal", text)
    kit_port = re.search(r"^PORT = (\d+)$", (REPO / ".railway" / "railway.py").read_text(), re.M)
    assert kit_port is not None and f"port: {kit_port.group(1)}" in text


def test_rules_reference_only_exported_metrics() -> None:
    text = (PROMETHEUS / "rules.yml").read_text() + (PROMETHEUS / "rules.test.yml").read_text()
    unknown = set(METRIC.findall(text)) - exported_series_names()
    assert not unknown


def test_dashboard_parses_and_references_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    exprs: list[str] = [a["expr"] for a in dashboard["annotations"]["list"]]
    ids: list[int] = []
    for panel in dashboard["panels"]:
        ids.append(panel["id"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel.get("targets", []):
            assert target["refId"] and target["expr"]
            exprs.append(target["expr"])
    assert len(ids) == len(set(ids))
    referenced = {name for expr in exprs for name in METRIC.findall(expr)}
    assert referenced, "the dashboard shows no metric"
    assert not referenced - exported_series_names()
    # The deploy story is on the first screen.
    for needed in ("connect_worker_draining", "connect_worker_steps_abandoned_total",
                   "connect_worker_replies_awaiting_ack", "connect_worker_connection_state"):
        assert needed in referenced


def test_observability_doc_describes_every_metric_and_log_event() -> None:
    doc = OBSERVABILITY.read_text()
    missing = [name for name in exported_families() if name not in doc]
    assert not missing, f"undocumented metrics: {missing}"
    events: set[str] = set()
    package = REPO / "src" / "connect_worker"
    for path in package.rglob("*.py"):
        if path.is_relative_to(package / "devserver"):
            continue  # the local test gateway's logs are not the worker's
        source = path.read_text()
        events.update(re.findall(r'\bevent\(\s*\w+,\s*"([a-z_.]+)"', source))
        events.update(re.findall(r'extra=\{\s*"event":\s*"([a-z_.]+)"', source))
    assert events
    undocumented = sorted(e for e in events if f"`{e}`" not in doc)
    assert not undocumented, f"undocumented log events: {undocumented}"
