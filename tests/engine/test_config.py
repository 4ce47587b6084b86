"""Config: every variable parsed, validated with one actionable line, secrets masked."""

from __future__ import annotations

import pytest

from connect_worker.config import (
    CLOUD_API_URL,
    DEFAULT_DRAIN_TIMEOUT,
    DEV_API_URL,
    SETTINGS,
    Config,
    default_instance_id,
)
from connect_worker.errors import ConfigError

DEV = {"INNGEST_DEV": "1"}


def test_dev_defaults() -> None:
    config = Config.from_env(DEV)
    assert config.dev is True
    assert config.api_base_url == DEV_API_URL
    assert config.drain_timeout == DEFAULT_DRAIN_TIMEOUT
    assert config.max_worker_concurrency is None


def test_cloud_requires_signing_key() -> None:
    with pytest.raises(ConfigError, match="INNGEST_SIGNING_KEY is required"):
        Config.from_env({})
    config = Config.from_env({"INNGEST_SIGNING_KEY": "signkey-prod-abcd"})
    assert config.api_base_url == CLOUD_API_URL


def test_api_origin_precedence() -> None:
    env = {**DEV, "INNGEST_BASE_URL": "http://base:1", "INNGEST_API_BASE_URL": "http://api:2"}
    assert Config.from_env(env).api_base_url == "http://api:2"
    del env["INNGEST_API_BASE_URL"]
    assert Config.from_env(env).api_base_url == "http://base:1"
    assert Config.from_env({"INNGEST_DEV": "http://dev:3/"}).api_base_url == "http://dev:3"


@pytest.mark.parametrize(
    ("variable", "value", "accepted"),
    [
        ("INNGEST_CONNECT_MAX_WORKER_CONCURRENCY", "zero", "whole number > 0"),
        ("INNGEST_CONNECT_MAX_WORKER_CONCURRENCY", "0", "whole number > 0"),
        ("CONNECT_WORKER_DRAIN_TIMEOUT", "-3", "seconds >= 0"),
        ("CONNECT_WORKER_DRAIN_TIMEOUT", "soon", "number of seconds"),
        ("CONNECT_WORKER_REPLY_ACK_TIMEOUT", "0", "seconds > 0"),
        ("CONNECT_WORKER_HTTP_PORT", "70000", "port number"),
        ("CONNECT_WORKER_LOG_FORMAT", "xml", "auto, json, text"),
        ("CONNECT_WORKER_EVENT_LOOP", "trio", "uvloop, asyncio"),
        ("INNGEST_API_BASE_URL", "ftp://x", "http:// or https://"),
        ("INNGEST_CONNECT_GATEWAY_URL", "http://x", "ws:// or wss://"),
        ("INNGEST_DEV", "maybe", "1/true/yes/on"),
    ],
)
def test_invalid_values_name_the_variable_and_what_is_accepted(
    variable: str, value: str, accepted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({**DEV, variable: value})
    message = str(info.value)
    assert message.startswith(f"{variable}={value!r} is invalid")
    assert accepted in message
    assert "\n" not in message


def test_flags_override_environment_and_are_validated() -> None:
    config = Config.from_env({**DEV, "CONNECT_WORKER_DRAIN_TIMEOUT": "10"},
                             {"drain_timeout": "42"})
    assert config.drain_timeout == 42
    with pytest.raises(ConfigError, match=r"^--drain-timeout='x' is invalid"):
        Config.from_env(DEV, {"drain_timeout": "x"})


def test_drain_budget_from_railway() -> None:
    config = Config.from_env({**DEV, "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": "120"})
    assert config.drain_timeout == 115
    config = Config.from_env({**DEV, "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": "3"})
    assert config.drain_timeout == 0
    explicit = {**DEV, "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": "120",
                "CONNECT_WORKER_DRAIN_TIMEOUT": "60"}
    assert Config.from_env(explicit).drain_timeout == 60


def test_identity_defaults_from_railway() -> None:
    env = {**DEV, "RAILWAY_GIT_COMMIT_SHA": "abc123", "RAILWAY_DEPLOYMENT_ID": "dep-1",
           "RAILWAY_SERVICE_NAME": "worker", "RAILWAY_REPLICA_ID": "r9"}
    config = Config.from_env(env)
    assert config.app_version == "abc123"
    assert config.deployment_id == "dep-1"
    assert config.instance_id.startswith("worker-r9-")
    assert Config.from_env({**DEV, "RAILWAY_DEPLOYMENT_ID": "dep-2"}).app_version == "dep-2"
    assert Config.from_env({**DEV, "CONNECT_WORKER_APP_VERSION": "v7", **env}).app_version == "v7"


def test_instance_id_unique_per_process() -> None:
    import os

    assert default_instance_id({}).endswith(f"-{os.getpid()}")


def test_http_port_off_and_port_fallback() -> None:
    assert Config.from_env({**DEV, "CONNECT_WORKER_HTTP_PORT": "off"}).http_port is None
    assert Config.from_env({**DEV, "PORT": "8080"}).http_port == 8080
    both = {**DEV, "PORT": "8080", "CONNECT_WORKER_HTTP_PORT": "9100"}
    assert Config.from_env(both).http_port == 9100


def test_secrets_are_masked_in_describe_repr_and_errors() -> None:
    key = "signkey-prod-" + "ab" * 32
    config = Config.from_env({"INNGEST_SIGNING_KEY": key, "INNGEST_SIGNING_KEY_FALLBACK": key})
    shown = str(config.describe()) + repr(config)
    assert "ab" * 32 not in shown
    assert "signkey-prod-" in str(config.describe())
    secret_settings = {s.env for s in SETTINGS if s.secret}
    assert secret_settings == {"INNGEST_SIGNING_KEY", "INNGEST_SIGNING_KEY_FALLBACK"}


def test_http_host_defaults_to_every_interface_and_to_loopback_in_dev_on_a_laptop() -> None:
    key = {"INNGEST_SIGNING_KEY": "signkey-prod-" + "ab" * 32}
    assert Config.from_env(key).http_host == "::"
    assert Config.from_env({"INNGEST_DEV": "1"}).http_host == "127.0.0.1"
    # Dev mode where a platform probes the port from outside keeps every interface.
    assert Config.from_env({"INNGEST_DEV": "1", "PORT": "8080"}).http_host == "::"
    assert Config.from_env({"INNGEST_DEV": "1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
                           ).http_host == "::"
    assert Config.from_env({**key, "CONNECT_WORKER_HTTP_HOST": "[::1]"}).http_host == "::1"
    assert Config.from_env({"INNGEST_DEV": "1"}, {"http_host": "0.0.0.0"}).http_host == "0.0.0.0"
    with pytest.raises(ConfigError, match=r"^CONNECT_WORKER_HTTP_HOST='a b' is invalid: "):
        Config.from_env({"INNGEST_DEV": "1", "CONNECT_WORKER_HTTP_HOST": "a b"})
