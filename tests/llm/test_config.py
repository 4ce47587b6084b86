"""Settings and the price table come from the environment; errors name the variable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connect_worker.errors import ConfigError
from connect_worker.llm import LLM, LLMConfig, PostgresCache, PriceTable, SqliteCache, Usage


def test_settings_from_the_environment() -> None:
    config = LLMConfig.from_env({
        "CONNECT_WORKER_LLM_PROVIDER": "Anthropic", "CONNECT_WORKER_LLM_MODEL": "claude-x",
        "CONNECT_WORKER_LLM_RETRY_BUDGET": "90", "CONNECT_WORKER_LLM_MAX_ATTEMPTS": "3",
        "CONNECT_WORKER_LLM_REFUSE_WHEN_DRAINING": "yes", "CONNECT_WORKER_LLM_CACHE": "off",
        "CONNECT_WORKER_LLM_CLAIM_TTL": "4.5"})
    assert (config.provider, config.model, config.retry_budget, config.max_attempts,
            config.claim_ttl) == ("anthropic", "claude-x", 90.0, 3, 4.5)
    assert config.refuse_when_draining and LLM(config).cache is None
    assert LLMConfig.from_env({}) == LLMConfig()


@pytest.mark.parametrize(("var", "value"), [
    ("CONNECT_WORKER_LLM_PROVIDER", "gemini"), ("CONNECT_WORKER_LLM_RETRY_BUDGET", "-1"),
    ("CONNECT_WORKER_LLM_MAX_ATTEMPTS", "many"), ("CONNECT_WORKER_LLM_PRICES", "{oops"),
    ("CONNECT_WORKER_LLM_REFUSE_WHEN_DRAINING", "maybe"), ("CONNECT_WORKER_LLM_CLAIM_TTL", "0")])
def test_invalid_settings_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        LLM.from_env({var: value})


def test_the_provider_follows_the_api_key() -> None:
    assert LLMConfig().default_provider({"ANTHROPIC_API_KEY": "x"}) == "anthropic"
    assert LLMConfig().default_provider({"OPENAI_API_KEY": "x", "ANTHROPIC_API_KEY": "x"}) \
        == "openai"
    with pytest.raises(ConfigError, match="CONNECT_WORKER_LLM_PROVIDER"):
        LLMConfig().default_provider({})


def test_cache_backend_from_the_setting(tmp_path: Path) -> None:
    assert isinstance(LLM(LLMConfig(cache=str(tmp_path / "c.db"))).cache, SqliteCache)
    pg = LLM(LLMConfig(cache="postgresql://u:p@127.0.0.1/db")).cache
    assert isinstance(pg, PostgresCache)


def test_prices_are_overridable(tmp_path: Path) -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cached_tokens=500_000)
    table = PriceTable.from_env({})
    # Dated snapshots find their family by prefix; unknown models cost 0.
    assert table.cost("gpt-4.1-mini-2025-04-14", usage) == pytest.approx(0.2 + 0.05 + 1.6)
    assert table.cost("my-finetune", usage) == 0.0
    custom = {"my-finetune": {"input": 1, "output": 2}}
    assert PriceTable.from_env({"CONNECT_WORKER_LLM_PRICES": json.dumps(custom)}).cost(
        "my-finetune", usage) == pytest.approx(0.5 + 0.5 + 2)
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"gpt-4.1": {"input": 0, "output": 0}}))
    assert PriceTable.from_env({"CONNECT_WORKER_LLM_PRICES": str(path)}).cost(
        "gpt-4.1", usage) == 0.0
