"""Railway Infrastructure as Code for the connect_worker service (``railway config plan`` /
``railway config apply``).

This file is the primary definition of the worker service; ``railway.toml`` at the
repository root only serves services still on config-as-code until Railway stops
reading it (2026-12-01). Keep the two in step (tests/ops/test_railway_kit.py checks).

What matters for deploys that never interrupt a step (docs/deploy-railway.md):

* The start command is a plain argv with no shell syntax, so Railway execs it and
  SIGTERM reaches Python directly (no ``sh -c`` in between that would swallow it).
  The worker reads PORT and every other setting from the environment itself.
* The healthcheck is ``/readyz``: 200 only once the replica's Connect connection is
  READY. Railway therefore stops the old replica only after the new one takes work.
* The teardown settings are service variables, because the IaC DSL has no
  draining/overlap fields: ``RAILWAY_DEPLOYMENT_DRAINING_SECONDS`` is the drain
  budget plus the worker's 5 s safety margin (the worker derives its own deadline
  from it), ``RAILWAY_DEPLOYMENT_OVERLAP_SECONDS`` is 0 (a pull worker gains nothing
  from overlap and the old replica would keep taking new runs).
* No volume: Railway cannot run two deployments of a service with a volume at once.

Edit the constants below, then ``railway config plan`` and ``railway config apply``.
This file runs inside the Railway CLI with only ``railway-sdk`` available, so it
must not import connect_worker.
"""

from __future__ import annotations

from typing import Any

from railway_sdk import define_railway, github, preserve, project, service

PROJECT = "connect-worker"
SERVICE = "worker"
# GitHub "owner/repo" to build from; None deploys whatever `railway up` uploads.
REPO: str | None = None
BRANCH = "main"
# The module (or module:attr) holding your Inngest client and functions.
TARGET = "examples.pipeline"

# The longest step you run (an LLM generation, say). Everything else follows from it.
EXPECTED_STEP_SECONDS = 600
# Time after the last step finishes for its reply to be acknowledged (or flushed).
REPLY_SLACK_SECONDS = 30
# Kept back by the worker from Railway's window to close the socket and exit;
# equals connect_worker.config.RAILWAY_DRAIN_SAFETY_MARGIN.
DRAIN_SAFETY_MARGIN_SECONDS = 5
DRAIN_BUDGET_SECONDS = EXPECTED_STEP_SECONDS + REPLY_SLACK_SECONDS
DRAINING_SECONDS = DRAIN_BUDGET_SECONDS + DRAIN_SAFETY_MARGIN_SECONDS
OVERLAP_SECONDS = 0

REPLICAS = 2
# Concurrent Connect connections your Inngest plan allows (Free 3, paid 20). A rollout
# briefly holds 2 x REPLICAS connections (old replicas drain while new ones connect).
PLAN_CONNECTION_LIMIT = 20

# The listener serving /readyz, /healthz and /metrics (Railway probes PORT; Prometheus
# scrapes it over the private network at <service>.railway.internal).
PORT = 8080
HEALTHCHECK_PATH = "/readyz"
# How long a new deployment may take to become READY (connect, sync) before Railway
# gives up on it and keeps the old one.
HEALTHCHECK_TIMEOUT_SECONDS = 300

START_COMMAND = ("connect-worker", "run", TARGET)
# Built from the Dockerfile, which installs requirements.lock (hash-checked): the versions
# the test command ran with, not whatever pyproject.toml's ranges resolve to that day.
BUILD = {"builder": "DOCKERFILE", "dockerfilePath": "Dockerfile"}


def worker_variables() -> dict[str, Any]:
    """The service variables; secrets are preserved (set them in the dashboard), never inlined."""
    return {
        "PORT": str(PORT),
        "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": str(DRAINING_SECONDS),
        "RAILWAY_DEPLOYMENT_OVERLAP_SECONDS": str(OVERLAP_SECONDS),
        "CONNECT_WORKER_EXPECTED_STEP_SECONDS": str(EXPECTED_STEP_SECONDS),
        "CONNECT_WORKER_REPLICAS": str(REPLICAS),
        "CONNECT_WORKER_CONNECTION_LIMIT": str(PLAN_CONNECTION_LIMIT),
        "CONNECT_WORKER_LOG_FORMAT": "json",
        "INNGEST_SIGNING_KEY": preserve(),
    }


@define_railway
def main(ctx: Any = None) -> Any:
    # The same service in every environment; branch on ctx.is_environment(...) if not.
    worker = service(
        SERVICE,
        source=github(REPO, branch=BRANCH) if REPO else None,
        build=BUILD,
        start=" ".join(START_COMMAND),
        healthcheck=HEALTHCHECK_PATH,
        healthcheckTimeout=HEALTHCHECK_TIMEOUT_SECONDS,
        replicas=REPLICAS,
        deploy={"restartPolicyType": "ON_FAILURE", "restartPolicyMaxRetries": 10},
        env=worker_variables(),
    )
    return project(PROJECT, resources=[worker])
