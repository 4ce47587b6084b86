"""`connect-worker check`: exit code 0/1/2 and the finding each misconfiguration produces."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from connect_worker.engine.target import load_target
from connect_worker.ops.check import ERRORS, OK, WARNINGS, run_check

KEY = "signkey-prod-" + "ab" * 32
# A production-shaped Railway service set up the way docs/deploy-railway.md says.
GOOD = {
    "INNGEST_SIGNING_KEY": KEY,
    "RAILWAY_ENVIRONMENT_NAME": "production",
    "RAILWAY_SERVICE_NAME": "worker",
    "RAILWAY_DEPLOYMENT_ID": "dep-1",
    "RAILWAY_REPLICA_ID": "rep-1",
    "PORT": "8080",
    "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": "900",
    "RAILWAY_DEPLOYMENT_OVERLAP_SECONDS": "0",
    "CONNECT_WORKER_EXPECTED_STEP_SECONDS": "600",
    "CONNECT_WORKER_REPLICAS": "2",
    "CONNECT_WORKER_CONNECTION_LIMIT": "20",
}
TARGET = "examples.pipeline"
REPO = Path(__file__).resolve().parents[2]


def check(env: dict[str, str], target: str | None = TARGET) -> tuple[int, str, set[str]]:
    out = io.StringIO()
    code = run_check(env, target, out=out, load_target=load_target)
    text = out.getvalue()
    return code, text, set(re.findall(r"(?:ERROR|WARNING) \[([a-z-]+)\]", text))


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))


def test_good_configuration_passes_and_prints_effective_settings() -> None:
    code, text, found = check(GOOD)
    assert (code, found) == (OK, set()), text
    assert "drain_timeout = 895.0" in text  # derived from Railway's draining window
    assert "http_port = 8080" in text  # Railway's PORT
    assert re.search(r"app pipeline: \d+ function\(s\)", text) and "- pipeline-report" in text
    assert "signkey-prod-…" in text and KEY not in text
    assert text.rstrip().endswith("Result: 0 error(s), 0 warning(s)")


def test_dev_mode_without_railway_passes() -> None:
    code, text, _ = check({"INNGEST_DEV": "1"})
    assert code == OK, text


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"RAILWAY_DEPLOYMENT_DRAINING_SECONDS": ""}, "draining-unset drain-budget-too-short"),
        ({"RAILWAY_DEPLOYMENT_DRAINING_SECONDS": "120"}, "draining-too-short"),
        ({"RAILWAY_DEPLOYMENT_DRAINING_SECONDS": "900", "CONNECT_WORKER_DRAIN_TIMEOUT": "899"},
         "drain-exceeds-draining"),
        ({"RAILWAY_DEPLOYMENT_OVERLAP_SECONDS": "20"}, "overlap-nonzero"),
        ({"CONNECT_WORKER_REPLICAS": "11"}, "connection-limit"),
        ({"CONNECT_WORKER_CONNECTION_LIMIT": "", "CONNECT_WORKER_REPLICAS": "2"},
         "connection-limit-unknown"),
        ({"RAILWAY_VOLUME_NAME": "data", "RAILWAY_VOLUME_MOUNT_PATH": "/data"}, "volume-attached"),
        ({"INNGEST_CONNECT_GATEWAY_URL": "ws://gateway.example.com/v0/connect"},
         "plaintext-gateway"),
        ({"INNGEST_API_BASE_URL": "http://inngest.internal:8288"}, "plaintext-api"),
        ({"INNGEST_DEV": "1"}, "dev-in-production"),
        ({"CONNECT_WORKER_HTTP_PORT": "off"}, "http-off"),
        ({"CONNECT_WORKER_HTTP_PORT": "9090"}, "port-mismatch"),
    ],
)
def test_costly_settings_are_warnings(change: dict[str, str], expected: str) -> None:
    code, text, found = check({**GOOD, **change})
    assert found == set(expected.split()), text
    assert code == WARNINGS


@pytest.mark.parametrize(
    ("env", "target", "expected"),
    [
        ({k: v for k, v in GOOD.items() if k != "INNGEST_SIGNING_KEY"}, TARGET,
         "signing-key-missing"),
        ({**GOOD, "CONNECT_WORKER_HTTP_PORT": "99999"}, TARGET, "config"),
        ({**GOOD, "CONNECT_WORKER_REPLICAS": "two"}, TARGET, "invalid-variable"),
        (GOOD, "no_such_module_anywhere", "target-error"),
        (GOOD, "examples.pipeline:nothing_here", "target-error"),
    ],
)
def test_errors_exit_2(env: dict[str, str], target: str, expected: str) -> None:
    code, text, found = check(env, target)
    assert expected in found, text
    assert code == ERRORS


def test_errors_win_over_warnings() -> None:
    env = {**GOOD, "RAILWAY_DEPLOYMENT_OVERLAP_SECONDS": "30"}
    del env["INNGEST_SIGNING_KEY"]
    code, _, found = check(env)
    assert code == ERRORS and {"overlap-nonzero", "signing-key-missing"} <= found


def test_without_target_the_functions_are_not_checked() -> None:
    code, text, _ = check(GOOD, None)
    assert code == OK and "Target: not given" in text


def test_the_cli_runs_check_with_the_same_exit_code() -> None:
    env = {**GOOD, "RAILWAY_DEPLOYMENT_OVERLAP_SECONDS": "20", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "connect_worker", "check", TARGET],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == WARNINGS, result.stdout + result.stderr
    assert "WARNING [overlap-nonzero]" in result.stdout
    assert KEY not in result.stdout + result.stderr
