"""Secrets never reach logs, metrics, check output or error messages."""

from __future__ import annotations

import hashlib
import io
import logging

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from connect_worker.config import Config
from connect_worker.errors import ConfigError
from connect_worker.ops.check import run_check
from connect_worker.ops.logs import REDACTED, configure_logging, event, redact
from connect_worker.ops.metrics import WorkerMetrics

KEY_BODY = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0"
SIGNING_KEY = f"signkey-prod-{KEY_BODY}"
FALLBACK_KEY = "signkey-prod-00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
HASHED = hashlib.sha256(bytes.fromhex(KEY_BODY)).hexdigest()
OPENAI_KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx0123456789"
ANTHROPIC_KEY = "sk-ant-api03-ZyXwVuTsRqPoNmLkJiHgFeDcBa9876543210"
CUSTOM_SECRET = "hunter2-but-longer"  # no recognisable shape: masked because it is configured
ALL = (SIGNING_KEY, KEY_BODY, HASHED, FALLBACK_KEY, OPENAI_KEY, ANTHROPIC_KEY, CUSTOM_SECRET)


def _assert_clean(text: str) -> None:
    for secret in ALL:
        assert secret not in text, f"{secret[:12]}... leaked"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_logs_mask_keys_in_messages_fields_and_tracebacks(
    fmt: str, log_stream: io.StringIO
) -> None:
    configure_logging(fmt, "debug", {"deployment_id": "d"}, secrets=[SIGNING_KEY, CUSTOM_SECRET],
                      stream=log_stream)
    log = logging.getLogger("connect_worker.test")
    log.info("starting with key %s and %s", SIGNING_KEY, FALLBACK_KEY)
    log.info("Authorization: Bearer %s", HASHED)
    log.info("bare hash %s body %s", HASHED, KEY_BODY)
    event(log, "llm.call", api_key=OPENAI_KEY, nested={"k": [ANTHROPIC_KEY]}, note=CUSTOM_SECRET)
    # A third-party logger (e.g. an HTTP client) gets the same treatment.
    logging.getLogger("somelib").warning("headers=%r", {"x-api-key": ANTHROPIC_KEY})
    try:
        raise RuntimeError(f"auth failed for {SIGNING_KEY} / {OPENAI_KEY}")
    except RuntimeError:
        log.exception("connect failed")
    output = log_stream.getvalue()
    _assert_clean(output)
    assert REDACTED in output
    assert "signkey-prod-" + REDACTED in output  # the env stays visible for humans


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "task-runner sk-short signkey rollout 2 replicas skip-this"
    assert redact(text) == text


def test_check_output_masks_secrets() -> None:
    out = io.StringIO()
    env = {
        "INNGEST_SIGNING_KEY": SIGNING_KEY,
        "INNGEST_SIGNING_KEY_FALLBACK": FALLBACK_KEY,
        "OPENAI_API_KEY": OPENAI_KEY,
    }
    run_check(env, None, out=out)
    _assert_clean(out.getvalue())
    assert "signkey-prod-" in out.getvalue()  # masked, with its prefix
    # Error paths too: an invalid variable, and a key passed where a URL belongs.
    out = io.StringIO()
    run_check({**env, "RAILWAY_DEPLOYMENT_DRAINING_SECONDS": "bogus",
               "INNGEST_CONNECT_GATEWAY_URL": OPENAI_KEY}, None, out=out)
    assert "ERROR" in out.getvalue()
    _assert_clean(out.getvalue())


def test_config_errors_and_repr_never_show_secrets() -> None:
    config = Config.from_env({"INNGEST_SIGNING_KEY": SIGNING_KEY,
                              "INNGEST_SIGNING_KEY_FALLBACK": FALLBACK_KEY})
    _assert_clean(repr(config))
    _assert_clean(str(config.describe()))
    with pytest.raises(ConfigError) as info:
        Config.from_env({"INNGEST_SIGNING_KEY": SIGNING_KEY, "CONNECT_WORKER_HTTP_PORT": "x"})
    _assert_clean(str(info.value))


def test_metrics_never_carry_secrets() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    config = Config.from_env({"INNGEST_SIGNING_KEY": SIGNING_KEY,
                              "RAILWAY_DEPLOYMENT_ID": "dep-1"})
    metrics.set_build_info("0.1.0", config.app_version or "", config.deployment_id or "")
    text = generate_latest(registry).decode()
    _assert_clean(text)
    # No metric takes free-form text that could hold one: every label is a bounded name.
    for family in registry.collect():
        for sample in family.samples:
            assert not {"key", "token", "secret", "authorization"} & set(sample.labels)
