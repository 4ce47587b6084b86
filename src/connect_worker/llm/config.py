"""Settings of the LLM toolkit, read once from the environment.

=====================================  ==============================================
``CONNECT_WORKER_LLM_PROVIDER``        openai | anthropic | simulated (default: openai if
                                       OPENAI_API_KEY is set, else anthropic if
                                       ANTHROPIC_API_KEY is set)
``CONNECT_WORKER_LLM_MODEL``           default model (default: per provider)
``CONNECT_WORKER_LLM_CACHE``           SQLite path, ``postgresql://`` DSN, or ``off``
                                       (default ``.connect-worker/llm-cache.sqlite3``)
``CONNECT_WORKER_LLM_CACHE_TTL``       seconds an answer is kept (default 7 days)
``CONNECT_WORKER_LLM_CLAIM_TTL``       seconds a call's claim lasts unless its owner
                                       refreshes it (every third of it, saving the
                                       partial text of a stream); default 10
``CONNECT_WORKER_LLM_TIMEOUT``         seconds per HTTP attempt (default 300)
``CONNECT_WORKER_LLM_RETRY_BUDGET``    seconds for all attempts of one call (default 600)
``CONNECT_WORKER_LLM_MAX_ATTEMPTS``    HTTP attempts per call (default 6)
``CONNECT_WORKER_LLM_BACKOFF_INITIAL`` first backoff, seconds (default 1)
``CONNECT_WORKER_LLM_BACKOFF_MAX``     longest backoff, seconds (default 30)
``CONNECT_WORKER_LLM_REFUSE_WHEN_DRAINING``  refuse new uncached calls once the worker
                                       drains (default false)
``CONNECT_WORKER_LLM_SIM_SPEEDUP``     simulated provider: divide its latency by this
                                       (default 1 = realistic)
``CONNECT_WORKER_LLM_PRICES``          price overrides, see :mod:`.pricing`
=====================================  ==============================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ConfigError

PROVIDERS = ("openai", "anthropic", "simulated")
DEFAULT_MODELS = {"openai": "gpt-4.1", "anthropic": "claude-sonnet-4-6",
                  "simulated": "claude-sonnet-4-6"}
_T = TypeVar("_T")


@dataclass(frozen=True, kw_only=True)
class LLMConfig:
    provider: str | None = None
    model: str | None = None
    cache: str = ".connect-worker/llm-cache.sqlite3"
    cache_ttl: float = 7 * 24 * 3600.0
    claim_ttl: float = 10.0
    request_timeout: float = 300.0
    retry_budget: float = 600.0
    max_attempts: int = 6
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    refuse_when_draining: bool = False
    sim_speedup: float = 1.0

    def __post_init__(self) -> None:
        if self.provider is not None and self.provider not in PROVIDERS:
            raise ConfigError(f"CONNECT_WORKER_LLM_PROVIDER: expected one of "
                              f"{', '.join(PROVIDERS)}, got {self.provider!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> LLMConfig:
        def get(name: str, parse: Callable[[str], _T], accepted: str) -> _T | None:
            var = f"CONNECT_WORKER_LLM_{name}"
            raw = environ.get(var, "").strip()
            if not raw:
                return None
            try:
                return parse(raw)
            except ValueError:
                raise ConfigError(f"{var}: expected {accepted}, got {raw!r}") from None

        values: dict[str, Any] = {
            "provider": get("PROVIDER", str.lower, "|".join(PROVIDERS)),
            "model": get("MODEL", str, "a model name"),
            "cache": get("CACHE", str, "a path, a postgresql:// DSN or off"),
            "cache_ttl": get("CACHE_TTL", _positive, "seconds > 0"),
            "claim_ttl": get("CLAIM_TTL", _positive, "seconds > 0"),
            "request_timeout": get("TIMEOUT", _positive, "seconds > 0"),
            "retry_budget": get("RETRY_BUDGET", _positive, "seconds > 0"),
            "max_attempts": get("MAX_ATTEMPTS", _count, "a whole number > 0"),
            "backoff_initial": get("BACKOFF_INITIAL", _positive, "seconds > 0"),
            "backoff_max": get("BACKOFF_MAX", _positive, "seconds > 0"),
            "refuse_when_draining": get("REFUSE_WHEN_DRAINING", _bool, "true or false"),
            "sim_speedup": get("SIM_SPEEDUP", _positive, "a number > 0"),
        }
        return cls(**{k: v for k, v in values.items() if v is not None})

    def default_provider(self, environ: Mapping[str, str] = os.environ) -> str:
        if self.provider:
            return self.provider
        if environ.get("OPENAI_API_KEY"):
            return "openai"
        if environ.get("ANTHROPIC_API_KEY"):
            return "anthropic"
        raise ConfigError("no LLM provider: set CONNECT_WORKER_LLM_PROVIDER "
                          "(openai|anthropic|simulated) or OPENAI_API_KEY / ANTHROPIC_API_KEY")


def _positive(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(text)
