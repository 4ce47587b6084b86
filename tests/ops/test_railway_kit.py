"""The Railway kit: .railway/railway.py evaluated with the real railway-sdk, and railway.toml."""

from __future__ import annotations

import importlib.util
import io
import shlex
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from connect_worker.config import RAILWAY_DRAIN_SAFETY_MARGIN
from connect_worker.ops.check import OK, run_check

from ..missing import in_ci

REPO = Path(__file__).resolve().parents[2]
SHELL_SYNTAX = set("$&|;<>`()*?~\\'\"")

if in_ci():
    import railway_sdk  # CI installs the dev group: a missing SDK is a failure there
else:
    railway_sdk = pytest.importorskip("railway_sdk")


def _load_kit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("railway_kit", REPO / ".railway" / "railway.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit() -> ModuleType:
    return _load_kit()


@pytest.fixture(scope="module", params=["production", "staging"])
def worker(kit: ModuleType, request: pytest.FixtureRequest) -> dict[str, Any]:
    ctx = railway_sdk.create_railway_context(environment=request.param)
    graph = kit.main(ctx).to_graph()
    assert graph["name"] == kit.PROJECT
    (node,) = [r for r in graph["resources"] if r.get("name") == kit.SERVICE]
    assert node["type"] == "service"
    return dict(node)


def _literals(node: dict[str, Any]) -> dict[str, str]:
    return {k: v["value"] for k, v in node["variables"].items() if v["type"] == "literal"}


def test_start_command_is_exec_form(worker: dict[str, Any]) -> None:
    command = worker["deploy"]["startCommand"]
    argv = shlex.split(command)
    assert argv[:2] == ["connect-worker", "run"] and len(argv) == 3
    assert not SHELL_SYNTAX & set(command), command
    assert argv[0] not in ("sh", "bash", "/bin/sh")


def test_healthcheck_gates_on_readiness(worker: dict[str, Any]) -> None:
    deploy = worker["deploy"]
    assert deploy["healthcheckPath"] == "/readyz"
    assert isinstance(deploy["healthcheckTimeout"], int) and 30 <= deploy["healthcheckTimeout"]
    assert deploy["restartPolicyType"] == "ON_FAILURE"


def test_replicas_and_connection_limit(kit: ModuleType, worker: dict[str, Any]) -> None:
    assert worker["deploy"]["numReplicas"] == kit.REPLICAS >= 1
    assert 2 * kit.REPLICAS <= kit.PLAN_CONNECTION_LIMIT


def test_teardown_variables_fit_the_drain_budget(kit: ModuleType, worker: dict[str, Any]) -> None:
    variables = _literals(worker)
    draining = int(variables["RAILWAY_DEPLOYMENT_DRAINING_SECONDS"])
    assert kit.DRAIN_SAFETY_MARGIN_SECONDS == RAILWAY_DRAIN_SAFETY_MARGIN
    assert draining == kit.DRAIN_BUDGET_SECONDS + RAILWAY_DRAIN_SAFETY_MARGIN
    assert draining >= int(variables["CONNECT_WORKER_EXPECTED_STEP_SECONDS"]) + 5
    assert variables["RAILWAY_DEPLOYMENT_OVERLAP_SECONDS"] == "0"
    assert variables["PORT"].isdigit()


def test_no_secret_inlined_and_no_volume(worker: dict[str, Any]) -> None:
    assert worker["variables"]["INNGEST_SIGNING_KEY"] == {"type": "preserve"}
    for name, value in _literals(worker).items():
        assert "KEY" not in name and "TOKEN" not in name, name
        assert not value.startswith(("signkey-", "sk-")), name
    assert "volumeAttachments" not in worker and "volumeMounts" not in worker


def test_check_accepts_the_service_the_kit_describes(worker: dict[str, Any]) -> None:
    env = {**_literals(worker), "INNGEST_SIGNING_KEY": "signkey-prod-" + "cd" * 32,
           "RAILWAY_ENVIRONMENT_NAME": "production", "RAILWAY_SERVICE_NAME": "worker"}
    out = io.StringIO()
    assert run_check(env, None, out=out) == OK, out.getvalue()


def test_railway_toml_matches_the_kit(kit: ModuleType, worker: dict[str, Any]) -> None:
    text = (REPO / "railway.toml").read_text()
    assert "2026-12-01" in text and ".railway/railway.py" in text
    deploy = tomllib.loads(text)["deploy"]
    for key in ("drainingSeconds", "overlapSeconds", "healthcheckTimeout", "numReplicas"):
        assert isinstance(deploy[key], int) and not isinstance(deploy[key], bool), key
    variables = _literals(worker)
    assert deploy["drainingSeconds"] == int(variables["RAILWAY_DEPLOYMENT_DRAINING_SECONDS"])
    assert deploy["overlapSeconds"] == 0
    assert deploy["restartPolicyType"] == "ON_FAILURE"
    assert deploy["startCommand"] == worker["deploy"]["startCommand"]
    assert deploy["healthcheckPath"] == worker["deploy"]["healthcheckPath"]
    assert deploy["healthcheckTimeout"] == worker["deploy"]["healthcheckTimeout"]
    assert deploy["numReplicas"] == worker["deploy"]["numReplicas"]
