"""deploy/kubernetes: validated offline against the Kubernetes OpenAPI schemas, and
checked to agree with each other, with the worker's configuration and with the Dockerfile.

* Deployment and PodDisruptionBudget: ``kubernetes-validate`` (pinned in the dev
  group; it ships Kubernetes' JSON schemas) in strict mode, which also rejects unknown
  or misspelled fields, for the oldest and the newest Kubernetes minor we claim.
* PodMonitor is a Prometheus Operator custom resource, not in those schemas. It is
  validated against the CRD's own schema, vendored in ``data/`` (22 KB once the
  descriptions are dropped), with unknown fields rejected and ``metadata`` checked as
  Kubernetes' ObjectMeta; plus what matters semantically: it selects the Deployment's
  pods and names a port the container exposes.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml

from connect_worker.config import RAILWAY_DRAIN_SAFETY_MARGIN, Config

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
# Oldest Kubernetes minor the docs claim (policy/v1 PDBs, seccompProfile fields) and the
# newest the pinned validator knows.
VERSIONS = ("1.29.0", "1.37.0")
# The worker's margin between its drain deadline and the platform's SIGKILL: the same 5 s
# on Railway (RAILWAY_DEPLOYMENT_DRAINING_SECONDS) and Kubernetes
# (terminationGracePeriodSeconds).
DRAIN_MARGIN = RAILWAY_DRAIN_SAFETY_MARGIN
# The PodMonitor CRD's schema (prometheus-operator v0.93.0, descriptions removed; the
# source is named in its "$comment").
PODMONITOR_SCHEMA = Path(__file__).parent / "data" / "podmonitor-v1.schema.json"


def _documents() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs[doc["kind"]] = doc
    return docs


DOCS = _documents()


def _container() -> dict[str, Any]:
    (container,) = DOCS["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _literal_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container()["env"] if "value" in e}


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_the_kit_holds_what_the_docs_promise() -> None:
    assert set(DOCS) == {"Deployment", "PodDisruptionBudget", "PodMonitor", "Kustomization"}
    listed = set(DOCS["Kustomization"]["resources"])
    assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", ["Deployment", "PodDisruptionBudget"])
def test_manifest_is_valid_for_kubernetes(kind: str, version: str) -> None:
    # Raises ValidationError with the path of the offending field.
    validated = kubernetes_validate.validate(DOCS[kind], version, strict=True)
    assert validated == version.rsplit(".", 1)[0]


def test_strict_validation_rejects_a_misspelled_field() -> None:
    """The validator is really strict: a typo would not slip through as 'unknown'."""
    broken = json.loads(json.dumps(DOCS["Deployment"]))
    spec = broken["spec"]["template"]["spec"]
    spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def _kubernetes_definitions() -> Any:
    """Kubernetes' own definitions (ObjectMeta, LabelSelector) as kubernetes-validate ships
    them, registered under their $id so a schema can $ref them."""
    from importlib.resources import files

    version = VERSIONS[-1]
    path = files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json")
    contents = json.loads(path.read_text(encoding="utf-8"))
    return contents["$id"], referencing.Resource.from_contents(contents) @ referencing.Registry()


def _closed(node: Any) -> Any:
    """The CRD schema with unknown fields rejected: Kubernetes silently prunes them from a
    structural schema, which would hide a misspelled field until nothing gets scraped."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    closed = {key: _closed(value) for key, value in node.items()}
    if ("properties" in closed and "additionalProperties" not in closed
            and not closed.get("x-kubernetes-preserve-unknown-fields")):
        closed["additionalProperties"] = False
    return closed


def _podmonitor_validator() -> Any:
    definitions_id, registry = _kubernetes_definitions()
    schema = _closed(json.loads(PODMONITOR_SCHEMA.read_text(encoding="utf-8")))
    # The CRD leaves metadata to the API server: check it as Kubernetes' ObjectMeta.
    schema["properties"]["metadata"] = {
        "$ref": f"{definitions_id}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    schema["properties"]["apiVersion"] = {"const": "monitoring.coreos.com/v1"}
    schema["properties"]["kind"] = {"const": "PodMonitor"}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind",
                                 "metadata"})
    return jsonschema.Draft7Validator(schema, registry=registry)


def test_podmonitor_is_valid_for_the_prometheus_operator_crd() -> None:
    validator = _podmonitor_validator()
    monitor = DOCS["PodMonitor"]
    errors = sorted(validator.iter_errors(monitor), key=str)
    assert errors == [], [f"{list(e.path)}: {e.message}" for e in errors]
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    bad["spec"]["podMetricsEndpoints"][0]["scrapeTimeout"] = "15 seconds"
    bad["metadata"]["labelz"] = {}
    assert len(list(validator.iter_errors(bad))) == 3  # the schema bites


def test_podmonitor_scrapes_the_worker_pods() -> None:
    monitor = DOCS["PodMonitor"]
    pod_labels = DOCS["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert _matches(monitor["spec"]["selector"], pod_labels)
    ports = {p["name"]: p["containerPort"] for p in _container()["ports"]}
    for scrape in monitor["spec"]["podMetricsEndpoints"]:
        assert scrape["port"] in ports
        assert scrape.get("path", "/metrics") == "/metrics"


def test_selectors_agree() -> None:
    deployment = DOCS["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"], pod_labels)
    assert _matches(DOCS["PodDisruptionBudget"]["spec"]["selector"], pod_labels)
    assert deployment["spec"]["replicas"] >= 2  # the PDB lets one go at a time


def test_grace_period_is_the_drain_budget_plus_the_margin() -> None:
    """The drain budget is what the worker itself derives from the pod's environment."""
    env = {**_literal_env(), "INNGEST_DEV": "1"}  # dev: no signing key needed to parse
    config = Config.from_env(env)
    grace = DOCS["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == config.drain_timeout + DRAIN_MARGIN
    assert config.drain_timeout > 25  # sized for LLM steps, not the 25 s default


def test_probes_point_at_the_worker_listener() -> None:
    container = _container()
    config = Config.from_env({**_literal_env(), "INNGEST_DEV": "1"})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert ports.get(port, port) == config.http_port
    # Liveness must not kill a pod that is merely slow to connect or busy draining:
    # it only watches the event loop, and gives it a minute.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_rollout_keeps_capacity_and_pods_are_sized_and_unprivileged() -> None:
    deployment = DOCS["Deployment"]
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    pod = deployment["spec"]["template"]["spec"]
    container = _container()
    assert container["resources"]["requests"].keys() >= {"cpu", "memory"}
    assert "cpu" not in container["resources"].get("limits", {})  # no heartbeat throttling
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # Exec form: the image's ENTRYPOINT (connect-worker) gets these as its argv.
    assert "command" not in container
    assert container["args"][0] == "run" and len(container["args"]) == 2
    assert not {"sh", "-c", "bash"} & set(shlex.split(" ".join(container["args"])))
    assert not container["image"].endswith(":latest")


def test_every_variable_set_is_one_the_worker_reads() -> None:
    from connect_worker.config import SETTINGS
    from connect_worker.ops.check import CHECK_VARIABLES
    from connect_worker.ops.tracing import PLATFORM_RESOURCE

    known = {s.env for s in SETTINGS} | {name for name, _ in CHECK_VARIABLES} | {"PORT"}
    known |= {name for name, _ in PLATFORM_RESOURCE}  # traces' resource attributes
    names = {e["name"] for e in _container()["env"]}
    assert names <= known, names - known
    secret = {e["name"]: e["valueFrom"] for e in _container()["env"] if "valueFrom" in e}
    assert "secretKeyRef" in secret["INNGEST_SIGNING_KEY"]  # never a literal in a file
