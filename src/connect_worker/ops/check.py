"""``connect-worker check``: a preflight run before the first deploy and in CI.

It builds the configuration exactly as ``run`` would, loads the TARGET's
functions, prints the effective settings (secrets masked) and lists findings:

* **errors** stop a deploy from working at all (invalid setting, signing key
  missing outside dev mode, TARGET that does not load or has no functions);
* **warnings** are settings that work but cost money or runs: Railway killing
  steps before the drain finishes, overlapping deployments of a pull worker,
  more connections during a rollout than the Inngest plan allows, a volume that
  forces stop-then-start deploys, plaintext transports in production.

Exit code: 0 nothing to report, 1 warnings only, 2 at least one error. Every
finding has a stable code (``draining-unset``, ``overlap-nonzero``, ...) that
docs/deploy-railway.md explains.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from ..config import RAILWAY_DRAIN_SAFETY_MARGIN, SETTINGS, Config
from ..errors import ConfigError, ConnectWorkerError
from .logs import redact, register_secret

OK, WARNINGS, ERRORS = 0, 1, 2

# Inngest's documented concurrent worker connections (new plans): Free 3, paid 20.
PLAN_CONNECTION_LIMITS = {"free": 3, "paid": 20}
# Apps one Connect connection may carry.
MAX_APPS_PER_CONNECTION = 10

# Variables check reads besides the worker's own settings (SETTINGS).
RAILWAY_VARIABLES: tuple[tuple[str, str], ...] = (
    ("RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "seconds between SIGTERM and SIGKILL"),
    ("RAILWAY_DEPLOYMENT_OVERLAP_SECONDS", "seconds old and new deployments run together"),
    ("RAILWAY_ENVIRONMENT_NAME", "Railway environment"),
    ("RAILWAY_SERVICE_NAME", "Railway service"),
    ("RAILWAY_DEPLOYMENT_ID", "deployment id"),
    ("RAILWAY_REPLICA_ID", "replica id"),
    ("RAILWAY_VOLUME_NAME", "volume attached to the service"),
    ("RAILWAY_VOLUME_MOUNT_PATH", "mount path of that volume"),
)
CHECK_VARIABLES: tuple[tuple[str, str], ...] = (
    ("CONNECT_WORKER_EXPECTED_STEP_SECONDS", "longest step you expect, in seconds"),
    ("CONNECT_WORKER_REPLICAS", "replicas of this service (Railway does not expose it)"),
    ("CONNECT_WORKER_CONNECTION_LIMIT", "Inngest plan's concurrent connections (Free 3, paid 20)"),
)


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    code: str
    message: str


class _Findings:
    def __init__(self) -> None:
        self.items: list[Finding] = []

    def error(self, code: str, message: str) -> None:
        self.items.append(Finding("error", code, message))

    def warn(self, code: str, message: str) -> None:
        self.items.append(Finding("warning", code, message))


def _number(
    environ: Mapping[str, str], name: str, findings: _Findings, *, integer: bool = False
) -> float | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(int(text)) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        findings.error("invalid-variable", f"{name}={text!r} is not {kind}")
        return None
    if value < 0 or value != value or value == float("inf"):
        findings.error("invalid-variable", f"{name}={text!r} must be a finite number >= 0")
        return None
    return value


#: Loads a TARGET into (client, functions) pairs, raising ConnectWorkerError when it
#: cannot: the engine's ``load_target``, handed in by the CLI. Taking it as a parameter
#: keeps ops below the engine (ops never imports the engine).
TargetLoader = Callable[[str], Iterable[tuple[Any, Iterable[Any]]]]


def _function_name(function: Any) -> str:
    for attr in ("id", "local_id", "name"):
        value = getattr(function, attr, None)
        if isinstance(value, str) and value:
            return value
    return repr(function)


def _check_target(target: str | None, load_target: TargetLoader | None, findings: _Findings,
                  out: TextIO) -> None:
    if target is None:
        out.write("Target: not given (pass TARGET to check its functions)\n")
        return
    if load_target is None:
        raise ValueError("run_check: a TARGET needs load_target to load it")
    out.write(f"Target: {target}\n")
    try:
        apps = list(load_target(target))
    except ConnectWorkerError as exc:
        findings.error("target-error", f"TARGET {target!r} cannot be loaded: {exc}")
        return
    if not apps:
        findings.error("target-empty", f"TARGET {target!r} has no Inngest client")
        return
    if len(apps) > MAX_APPS_PER_CONNECTION:
        findings.error("too-many-apps", f"{len(apps)} apps; one Connect connection carries at "
                       f"most {MAX_APPS_PER_CONNECTION}")
    total = 0
    for client, functions in apps:
        app_id = getattr(client, "app_id", None) or "?"
        names = sorted(_function_name(f) for f in functions)
        total += len(names)
        out.write(f"  app {app_id}: {len(names)} function(s)\n")
        for name in names:
            out.write(f"    - {name}\n")
        if not names:
            findings.error("app-without-functions", f"app {app_id!r} has no functions")
    if total == 0:
        findings.error("target-empty", f"TARGET {target!r} defines no functions")


def _check_railway(environ: Mapping[str, str], config: Config | None, findings: _Findings) -> None:
    on_railway = any(k.startswith("RAILWAY_") for k in environ)
    draining = _number(environ, "RAILWAY_DEPLOYMENT_DRAINING_SECONDS", findings)
    overlap = _number(environ, "RAILWAY_DEPLOYMENT_OVERLAP_SECONDS", findings)
    expected = _number(environ, "CONNECT_WORKER_EXPECTED_STEP_SECONDS", findings)
    replicas = _number(environ, "CONNECT_WORKER_REPLICAS", findings, integer=True)
    limit = _number(environ, "CONNECT_WORKER_CONNECTION_LIMIT", findings, integer=True)
    drain_budget = config.drain_timeout if config is not None else None

    draining_set = bool(environ.get("RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "").strip())
    if draining is None and not draining_set:
        if on_railway or expected is not None:
            findings.warn(
                "draining-unset",
                "RAILWAY_DEPLOYMENT_DRAINING_SECONDS is unset: Railway kills the old replica "
                "right after SIGTERM and every running step is lost. Set it to the longest "
                f"step plus {RAILWAY_DRAIN_SAFETY_MARGIN:g} s.",
            )
    elif draining is not None:
        if expected is not None and draining < expected + RAILWAY_DRAIN_SAFETY_MARGIN:
            findings.warn(
                "draining-too-short",
                f"RAILWAY_DEPLOYMENT_DRAINING_SECONDS={draining:g} is below the expected step "
                f"length ({expected:g} s) plus the {RAILWAY_DRAIN_SAFETY_MARGIN:g} s margin: "
                "longer steps are killed and retried, paying for them twice.",
            )
        if drain_budget is not None and drain_budget + RAILWAY_DRAIN_SAFETY_MARGIN > draining:
            findings.warn(
                "drain-exceeds-draining",
                f"the drain budget ({drain_budget:g} s, CONNECT_WORKER_DRAIN_TIMEOUT) plus the "
                f"{RAILWAY_DRAIN_SAFETY_MARGIN:g} s margin exceeds "
                f"RAILWAY_DEPLOYMENT_DRAINING_SECONDS={draining:g}: Railway sends SIGKILL before "
                "the worker can report abandoned steps and close cleanly.",
            )
    if draining is None and expected is not None and drain_budget is not None:
        if drain_budget < expected:
            findings.warn(
                "drain-budget-too-short",
                f"the drain budget ({drain_budget:g} s) is below the expected step length "
                f"({expected:g} s)",
            )
    if overlap is not None and overlap > 0:
        findings.warn(
            "overlap-nonzero",
            f"RAILWAY_DEPLOYMENT_OVERLAP_SECONDS={overlap:g}: a pull worker gains nothing from "
            "overlap (the /readyz gate already waits for the new replica to take work); the old "
            "replica keeps taking new runs and you pay for both. Set it to 0.",
        )
    if replicas is not None:
        peak = int(2 * replicas)
        if limit is not None and peak > limit:
            findings.warn(
                "connection-limit",
                f"a rollout runs old and new replicas together: 2 x {int(replicas)} = {peak} "
                f"connections exceed the plan's limit of {int(limit)}; new replicas get 429 and "
                "retry until old ones leave, slowing the deploy.",
            )
        elif limit is None and peak > PLAN_CONNECTION_LIMITS["free"]:
            findings.warn(
                "connection-limit-unknown",
                f"a rollout needs up to {peak} connections; the Free plan allows "
                f"{PLAN_CONNECTION_LIMITS['free']}, paid plans {PLAN_CONNECTION_LIMITS['paid']}. "
                "Set CONNECT_WORKER_CONNECTION_LIMIT to check against your plan.",
            )
    volume = environ.get("RAILWAY_VOLUME_NAME") or environ.get("RAILWAY_VOLUME_MOUNT_PATH")
    if volume:
        findings.warn(
            "volume-attached",
            f"the service has a volume ({volume}): Railway cannot run two deployments of it at "
            "once, so every deploy stops the old replica before the new one is ready (no "
            "rolling deploy) and replicas are limited to 1. Keep state outside the worker.",
        )


def _check_config(environ: Mapping[str, str], config: Config, findings: _Findings) -> None:
    production = not config.dev
    if production:
        if config.gateway_url and config.gateway_url.startswith("ws://"):
            findings.warn("plaintext-gateway", "INNGEST_CONNECT_GATEWAY_URL uses ws:// outside "
                          "dev mode: the signing-key-derived session travels unencrypted.")
        if config.api_base_url.startswith("http://"):
            findings.warn("plaintext-api", "the Inngest API URL uses http:// outside dev mode: "
                          "the hashed signing key travels unencrypted.")
    elif environ.get("RAILWAY_ENVIRONMENT_NAME", "").lower() in ("production", "prod"):
        findings.warn("dev-in-production", "INNGEST_DEV is on in the Railway production "
                      "environment: the worker will not authenticate to Inngest Cloud.")
    if config.http_port is None:
        if any(k.startswith("RAILWAY_") for k in environ):
            findings.warn("http-off", "the /readyz listener is off: Railway's healthcheck cannot "
                          "gate the deploy and the old replica is stopped before the new one "
                          "takes work.")
    elif environ.get("PORT") and environ.get("CONNECT_WORKER_HTTP_PORT") and \
            environ["PORT"] != environ["CONNECT_WORKER_HTTP_PORT"]:
        findings.warn("port-mismatch", f"CONNECT_WORKER_HTTP_PORT={config.http_port} differs "
                      f"from PORT={environ['PORT']}: Railway's healthcheck probes PORT.")
    if config.http_port is not None and not config.dev and config.http_host.startswith(
            ("127.", "::1", "localhost")):
        findings.warn("http-host-loopback", f"CONNECT_WORKER_HTTP_HOST={config.http_host} "
                      "listens on this machine only: the platform's healthcheck and "
                      "Prometheus reach the replica by its own address (use ::).")


def run_check(config_env: Mapping[str, str], target: str | None, *, out: TextIO,
              load_target: TargetLoader | None = None) -> int:
    """Validate ``config_env`` and ``target``; print a report to ``out``; return 0/1/2.

    ``load_target`` (the engine's ``engine.target.load_target``) is required with a target.
    """
    for setting in SETTINGS:
        if setting.secret:
            register_secret(config_env.get(setting.env))
    # Everything goes through one buffer so the whole report is redacted once.
    writer = io.StringIO()
    findings = _Findings()
    writer.write("connect-worker check\n\nSettings (effective):\n")
    config: Config | None = None
    try:
        config = Config.from_env(config_env)
    except ConfigError as exc:
        code = "signing-key-missing" if "INNGEST_SIGNING_KEY is required" in str(exc) else "config"
        findings.error(code, str(exc))
    if config is not None:
        for name, value in config.describe().items():
            writer.write(f"  {name} = {value!r}\n")
        _check_config(config_env, config, findings)
    else:
        writer.write("  (invalid; see errors)\n")
    writer.write("\nDeployment variables:\n")
    for name, meaning in (*RAILWAY_VARIABLES, *CHECK_VARIABLES):
        value = config_env.get(name)
        shown = value if value not in (None, "") else "unset"
        writer.write(f"  {name} = {shown}  ({meaning})\n")
    writer.write("\n")
    _check_railway(config_env, config, findings)
    _check_target(target, load_target, findings, writer)

    errors = [f for f in findings.items if f.severity == "error"]
    warnings = [f for f in findings.items if f.severity == "warning"]
    writer.write("\nFindings:\n")
    if not findings.items:
        writer.write("  none\n")
    for finding in (*errors, *warnings):
        writer.write(f"  {finding.severity.upper()} [{finding.code}] {finding.message}\n")
    writer.write(f"\nResult: {len(errors)} error(s), {len(warnings)} warning(s)\n")
    out.write(redact(writer.getvalue()))
    if errors:
        return ERRORS
    return WARNINGS if warnings else OK
