from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from connect_worker.context import DrainSignal, draining
from connect_worker.llm import (
    LLM,
    AnthropicProvider,
    LLMConfig,
    OpenAIProvider,
    PostgresCache,
    Provider,
    ResultCache,
    SqliteCache,
)

from ..missing import missing
from .stubs import StubProvider
from .util import SECRET

DSN_FILE = Path(os.environ.get("CONNECT_WORKER_TEST_POSTGRES_DSN_FILE",
                               "/tmp/connect-worker-test-postgres.dsn"))


@pytest.fixture
async def openai_stub() -> AsyncIterator[StubProvider]:
    async with StubProvider("openai") as stub:
        yield stub


@pytest.fixture
async def anthropic_stub() -> AsyncIterator[StubProvider]:
    async with StubProvider("anthropic") as stub:
        yield stub


@pytest.fixture(autouse=True)
def not_draining() -> None:
    """In-process workers of other tests set the process-wide drain signal for good."""
    draining().clear()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def drain() -> DrainSignal:
    return DrainSignal()


def postgres_dsn() -> str | None:
    dsn = os.environ.get("CONNECT_WORKER_TEST_POSTGRES_DSN")
    if not dsn and DSN_FILE.is_file():
        dsn = DSN_FILE.read_text().strip()
    return dsn or None


@pytest.fixture
def pg_dsn() -> str:
    dsn = postgres_dsn()
    if dsn is None:
        missing("no PostgreSQL for the LLM cache tests: run scripts/setup.d/postgres.sh "
                "or set CONNECT_WORKER_TEST_POSTGRES_DSN")
    return dsn


@pytest.fixture(params=["sqlite", "postgres"])
async def cache(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ResultCache]:
    backend: ResultCache
    if request.param == "sqlite":
        backend = SqliteCache(tmp_path / "cache.sqlite3")
    else:
        dsn = request.getfixturevalue("pg_dsn")
        backend = PostgresCache(dsn)
        await backend.get("create-the-table")
        with psycopg.connect(dsn, autocommit=True) as conn:  # each test starts empty
            conn.execute("TRUNCATE connect_worker_llm_results")
    yield backend
    await backend.close()


MakeLLM = Callable[..., LLM]


@pytest.fixture
def make_llm(registry: CollectorRegistry, drain: DrainSignal, tmp_path: Path,
             openai_stub: StubProvider, anthropic_stub: StubProvider) -> MakeLLM:
    """An LLM over the real SDK clients pointed at the stubs, with fast backoff."""

    def make(cache: ResultCache | None = None, **overrides: Any) -> LLM:
        settings: dict[str, Any] = {"provider": "openai", "model": "gpt-4.1",
                                    "backoff_initial": 0.01, "backoff_max": 0.05,
                                    "retry_budget": 10.0, "request_timeout": 5.0,
                                    "max_attempts": 5}
        settings.update(overrides)
        providers: dict[str, Provider] = {
            "openai": OpenAIProvider(api_key=SECRET, base_url=openai_stub.base_url),
            "anthropic": AnthropicProvider(api_key=SECRET, base_url=anthropic_stub.base_url),
        }
        return LLM(LLMConfig(**settings),
                   cache=cache if cache is not None else SqliteCache(tmp_path / "llm.sqlite3"),
                   registry=registry, providers=providers, drain=drain)

    return make
