"""deploy/kubernetes: validated offline against the Kubernetes OpenAPI schemas, and
checked to agree with each other, with the worker's configuration and with the Dockerfile.

* Deployment and PodDisruptionBudget: ``kubernetes-validate`` (pinned in the dev
  group; it ships Kubernetes' JSON schemas) in strict mode, which also rejects unknown
  or misspelled fields, for the oldest and the newest Kubernetes minor we claim.
* PodMonitor is a Prometheus Operator CRD, not in those schemas, and the CRD's own
  schema is ~80 KB: too big to vendor. It is validated against a short hand-written
  subset of the CRD's v1 schema (the fields we use; anything else is rejected, so a new
  field forces a look at the CRD), whose ``metadata`` and ``selector`` refer to the
  real Kubernetes ObjectMeta and LabelSelector schemas; plus what matters semantically:
  it selects the Deployment's pods and names a port the container exposes.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest

from connect_worker.config import RAILWAY_DRAIN_SAFETY_MARGIN, Config

kubernetes_validate = pytest.importorskip("kubernetes_validate")  # dev group: always in CI
yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
# Oldest Kubernetes minor the docs claim (policy/v1 PDBs, seccompProfile fields) and the
# newest the pinned validator knows.
VERSIONS = ("1.29.0", "1.37.0")
# The worker's margin between its drain deadline and the platform's SIGKILL: the same 5 s
# on Railway (RAILWAY_DEPLOYMENT_DRAINING_SECONDS) and Kubernetes
# (terminationGracePeriodSeconds).
DRAIN_MARGIN = RAILWAY_DRAIN_SAFETY_MARGIN
# Interval/duration pattern of the Prometheus Operator's CRDs (monitoring.coreos.com/v1).
PROMETHEUS_DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                       r"(([0-9]+)s)?(([0-9]+)ms)?)$")


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


def test_podmonitor_matches_the_crd_subset_and_kubernetes_types() -> None:
    definitions_id, registry = _kubernetes_definitions()

    def k8s(name: str) -> dict[str, str]:
        return {"$ref": f"{definitions_id}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.{name}"}

    endpoint = {
        "type": "object",
        "additionalProperties": False,
        "required": ["port"],
        "properties": {
            "port": {"type": "string", "minLength": 1},
            "path": {"type": "string", "pattern": "^/"},
            "interval": {"type": "string", "pattern": PROMETHEUS_DURATION},
            "scrapeTimeout": {"type": "string", "pattern": PROMETHEUS_DURATION},
            "scheme": {"enum": ["http", "https"]},
        },
    }
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": k8s("ObjectMeta"),
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "selector": k8s("LabelSelector"),
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": {"type": "string"},
                    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": endpoint},
                },
            },
        },
    }
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    monitor = DOCS["PodMonitor"]
    errors = sorted(validator.iter_errors(monitor), key=str)
    assert errors == [], [f"{list(e.path)}: {e.message}" for e in errors]
    bad = json.loads(json.dumps(monitor))
    bad["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    bad["metadata"]["labelz"] = {}
    assert len(list(validator.iter_errors(bad))) == 2  # the subset schema bites

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

    known = {s.env for s in SETTINGS} | {name for name, _ in CHECK_VARIABLES} | {"PORT"}
    names = {e["name"] for e in _container()["env"]}
    assert names <= known, names - known
    secret = {e["name"]: e["valueFrom"] for e in _container()["env"] if "valueFrom" in e}
    assert "secretKeyRef" in secret["INNGEST_SIGNING_KEY"]  # never a literal in a file
