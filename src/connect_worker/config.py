"""Configuration: one frozen dataclass built once from the environment (and CLI flags).

Every setting is declared once in ``SETTINGS``: its environment variable, its
flag, how it is parsed and its help text. The CLI builds ``--help`` and its flags
from that table, so a setting cannot be documented in one place and missing in
another. An invalid value raises :class:`ConfigError` naming the variable and
what is accepted, before anything connects.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

from .errors import ConfigError

DEV_API_URL = "http://127.0.0.1:8288"
CLOUD_API_URL = "https://api.inngest.com"
# Seconds kept back from Railway's draining window for closing the socket and exiting.
RAILWAY_DRAIN_SAFETY_MARGIN = 5.0
# Used when neither CONNECT_WORKER_DRAIN_TIMEOUT nor RAILWAY_DEPLOYMENT_DRAINING_SECONDS is
# set: fits Kubernetes' default 30 s grace period and docker's 10 s is a lost cause anyway.
DEFAULT_DRAIN_TIMEOUT = 25.0

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of 1/true/yes/on or 0/false/no/off")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds, e.g. 30 or 2.5") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a finite number of seconds >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError("expected a number of seconds > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number > 0") from None
    if value <= 0:
        raise ValueError("expected a whole number > 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a port number 0-65535, or 'off'") from None
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number 0-65535, or 'off'")
    return value


def _host(text: str) -> str:
    value = text.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", value):
        raise ValueError("expected an IP address (:: or 0.0.0.0 for every interface, "
                         "127.0.0.1 for this machine only) or a host name")
    return value


def http_host_default(dev: bool, environ: Mapping[str, str]) -> str:
    """Where /metrics, /healthz and /readyz listen when CONNECT_WORKER_HTTP_HOST is unset.

    Every interface (``::``, dual-stack) in production: Railway's private network,
    Kubernetes' kubelet probes and Prometheus all reach the replica by its own address.
    Loopback only in dev mode on a developer's machine, where nothing outside it needs
    /metrics; but dev mode on a platform that probes the port from outside (it sets PORT,
    or Kubernetes is there) keeps every interface.
    """
    if dev and not environ.get("PORT") and not environ.get("KUBERNETES_SERVICE_HOST"):
        return "127.0.0.1"
    return "::"


def _url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError("expected an http:// or https:// URL")
    return text.rstrip("/")


def _ws_url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("ws", "wss") or not parsed.netloc:
        raise ValueError("expected a ws:// or wss:// URL")
    return text


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value

    return parse


def _text(text: str) -> str:
    return text


@dataclass(frozen=True)
class Setting:
    """One configurable value: where it comes from and how it is checked."""

    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("dev", "INNGEST_DEV", _bool, "Dev mode: no signing key; API defaults to "
            f"{DEV_API_URL}. A URL also sets the API origin."),
    Setting("api_base_url", "INNGEST_API_BASE_URL", _url, "Inngest API origin for "
            "/v0/connect/start and /flush (falls back to INNGEST_BASE_URL, then INNGEST_DEV "
            "if it is a URL)."),
    Setting("signing_key", "INNGEST_SIGNING_KEY", _text, "Signing key (cloud mode).",
            secret=True),
    Setting("signing_key_fallback", "INNGEST_SIGNING_KEY_FALLBACK", _text,
            "Fallback signing key, tried on 401/403 (key rotation).", secret=True),
    Setting("env", "INNGEST_ENV", _text, "Inngest environment (branch) name; sent as "
            "X-Inngest-Env."),
    Setting("max_worker_concurrency", "INNGEST_CONNECT_MAX_WORKER_CONCURRENCY", _positive_int,
            "Most steps this process runs at once (unset: unlimited)."),
    Setting("gateway_url", "INNGEST_CONNECT_GATEWAY_URL", _ws_url,
            "Override the gateway WebSocket URL the API hands out."),
    Setting("instance_id", "CONNECT_WORKER_INSTANCE_ID", _text, "Worker identity for "
            "capacity and lease ownership; must be unique per process (default: "
            "service-replica-or-hostname-pid)."),
    Setting("app_version", "CONNECT_WORKER_APP_VERSION", _text, "App version reported to "
            "Inngest (default: RAILWAY_GIT_COMMIT_SHA, else RAILWAY_DEPLOYMENT_ID)."),
    Setting("drain_timeout", "CONNECT_WORKER_DRAIN_TIMEOUT", _seconds, "Seconds a drain "
            "may take after SIGTERM before in-flight steps are abandoned (default: "
            f"RAILWAY_DEPLOYMENT_DRAINING_SECONDS - {RAILWAY_DRAIN_SAFETY_MARGIN:g}, else "
            f"{DEFAULT_DRAIN_TIMEOUT:g})."),
    Setting("reply_ack_timeout", "CONNECT_WORKER_REPLY_ACK_TIMEOUT", _positive_seconds,
            "Seconds to wait for WORKER_REPLY_ACK before also sending the reply through "
            "/v0/connect/flush (default 5)."),
    Setting("reconnect_max_backoff", "CONNECT_WORKER_RECONNECT_MAX_BACKOFF", _positive_seconds,
            "Cap of the jittered reconnect backoff in seconds (default 30)."),
    Setting("http_port", "CONNECT_WORKER_HTTP_PORT", _port, "Port of the /metrics, /healthz, "
            "/readyz listener (default: PORT, else 9090; 'off' disables it)."),
    Setting("http_host", "CONNECT_WORKER_HTTP_HOST", _host, "Address of that listener "
            "(default :: = every interface; 127.0.0.1 in dev mode unless PORT or Kubernetes "
            "is there)."),
    Setting("event_loop", "CONNECT_WORKER_EVENT_LOOP", _choice("uvloop", "asyncio"),
            "uvloop (default; asyncio's own loop where uvloop is not installed) or asyncio: "
            "the event loop of the engine and of user code."),
    Setting("on_drift", "CONNECT_WORKER_ON_DRIFT", _choice("warn", "fail"),
            "warn (default: log run.version_drift and go on, as the SDK does) or fail (the "
            "drifted step's body does not run; the run fails, not retried). See docs/drift.md."),
    Setting("confirm_before_run", "CONNECT_WORKER_CONFIRM_BEFORE_RUN", _bool,
            "Start each step body only after the gateway confirmed its lease once (one "
            "extension round trip per step; stops a re-routed short step running twice). "
            "Per function: connect_worker.confirm_before_run(fn). See docs/reliability.md."),
    Setting("record_history", "CONNECT_WORKER_RECORD_HISTORY", _text, "Directory where each "
            "run's memos, their order and step names are written, for `connect-worker compat`."),
    Setting("record_history_shape_only", "CONNECT_WORKER_RECORD_HISTORY_SHAPE_ONLY", _bool,
            "Record outputs and events reduced to their shape (no customer data)."),
    Setting("log_format", "CONNECT_WORKER_LOG_FORMAT", _choice("auto", "json", "text"),
            "auto (JSON unless stderr is a terminal), json or text."),
    Setting("log_level", "CONNECT_WORKER_LOG_LEVEL",
            _choice("debug", "info", "warning", "error"), "Log level (default info)."),
)


@dataclass(frozen=True, kw_only=True)
class Config:
    """Effective settings of one worker process."""

    dev: bool = False
    api_base_url: str = DEV_API_URL
    signing_key: str | None = field(default=None, repr=False)
    signing_key_fallback: str | None = field(default=None, repr=False)
    env: str | None = None
    max_worker_concurrency: int | None = None
    gateway_url: str | None = None
    instance_id: str = ""
    app_version: str | None = None
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    reply_ack_timeout: float = 5.0
    reconnect_max_backoff: float = 30.0
    reconnect_min_backoff: float = 0.25
    http_port: int | None = 9090
    http_host: str = "::"
    event_loop: str = "uvloop"
    on_drift: str = "warn"
    confirm_before_run: bool = False
    record_history: str | None = None
    record_history_shape_only: bool = False
    log_format: str = "auto"
    log_level: str = "info"
    deployment_id: str | None = None
    replica_id: str | None = None

    def __post_init__(self) -> None:
        if not self.instance_id:
            object.__setattr__(self, "instance_id", default_instance_id(os.environ))
        if not self.dev and not self.signing_key:
            raise ConfigError(
                "INNGEST_SIGNING_KEY is required outside dev mode "
                "(set it, or set INNGEST_DEV=1 for a local gateway)"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
    ) -> Config:
        """Build the config from ``environ`` (default ``os.environ``) plus flag values.

        ``overrides`` maps field names to raw strings from CLI flags; they win over the
        environment and are validated the same way.
        """
        environ = dict(os.environ if environ is None else environ)
        overrides = dict(overrides or {})
        raw: dict[str, tuple[str, str]] = {}  # field -> (source name, text)
        for setting in SETTINGS:
            if setting.field in overrides:
                raw[setting.field] = (setting.flag, overrides[setting.field])
            elif environ.get(setting.env, "") != "":
                raw[setting.field] = (setting.env, environ[setting.env])
        values: dict[str, Any] = {}
        by_field = {s.field: s for s in SETTINGS}
        dev_url: str | None = None
        for name, (source, text) in raw.items():
            setting = by_field[name]
            if name == "dev" and "://" in text:
                dev_url = text
                values["dev"] = True
                continue
            if name == "http_port" and text.strip().lower() == "off":
                values["http_port"] = None
                continue
            try:
                values[name] = setting.parse(text)
            except ValueError as exc:
                shown = "<redacted>" if setting.secret else repr(text)
                raise ConfigError(f"{source}={shown} is invalid: {exc}") from None
        if "api_base_url" not in values:
            for source, text in (
                ("INNGEST_BASE_URL", environ.get("INNGEST_BASE_URL", "")),
                ("INNGEST_DEV", dev_url or ""),
            ):
                if text:
                    try:
                        values["api_base_url"] = _url(text)
                    except ValueError as exc:
                        raise ConfigError(f"{source}={text!r} is invalid: {exc}") from None
                    break
            else:
                values["api_base_url"] = DEV_API_URL if values.get("dev") else CLOUD_API_URL
        if "http_port" not in values and environ.get("PORT"):
            try:
                values["http_port"] = _port(environ["PORT"])
            except ValueError as exc:
                raise ConfigError(f"PORT={environ['PORT']!r} is invalid: {exc}") from None
        if "http_host" not in values:
            values["http_host"] = http_host_default(bool(values.get("dev")), environ)
        if "drain_timeout" not in values:
            values["drain_timeout"] = drain_timeout_from_railway(environ)
        if "app_version" not in values:
            values["app_version"] = (
                environ.get("RAILWAY_GIT_COMMIT_SHA") or environ.get("RAILWAY_DEPLOYMENT_ID")
            ) or None
        values["deployment_id"] = environ.get("RAILWAY_DEPLOYMENT_ID") or None
        values["replica_id"] = environ.get("RAILWAY_REPLICA_ID") or None
        if "instance_id" not in values:
            values["instance_id"] = default_instance_id(environ)
        return cls(**values)

    def describe(self) -> dict[str, object]:
        """The effective settings with secrets masked, for logs and ``check``."""
        secret_fields = {s.field for s in SETTINGS if s.secret}
        shown: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in secret_fields and value:
                value = mask_secret(str(value))
            shown[f.name] = value
        return shown


def drain_timeout_from_railway(environ: Mapping[str, str]) -> float:
    """Derive the drain budget from Railway's draining window, minus a safety margin."""
    text = environ.get("RAILWAY_DEPLOYMENT_DRAINING_SECONDS", "")
    if not text:
        return DEFAULT_DRAIN_TIMEOUT
    try:
        seconds = _seconds(text)
    except ValueError as exc:
        raise ConfigError(
            f"RAILWAY_DEPLOYMENT_DRAINING_SECONDS={text!r} is invalid: {exc}"
        ) from None
    return max(0.0, seconds - RAILWAY_DRAIN_SAFETY_MARGIN)


def default_instance_id(environ: Mapping[str, str]) -> str:
    """service + replica (or hostname) + pid: stable for the process, unique across processes."""
    service = environ.get("RAILWAY_SERVICE_NAME", "")
    where = environ.get("RAILWAY_REPLICA_ID") or socket.gethostname()
    parts = [p for p in (service, where, str(os.getpid())) if p]
    return "-".join(parts)


def mask_secret(value: str) -> str:
    """Show only the prefix a human needs to tell keys apart (``signkey-prod-…``)."""
    if value.startswith("signkey-"):
        prefix = "-".join(value.split("-")[:2])
        return f"{prefix}-…({len(value)} chars)"
    return f"…({len(value)} chars)"
