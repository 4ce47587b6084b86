"""The durable result cache: every answer is stored the moment it arrives, and looked up
before every call, so a retried step never pays twice for an answer it already got.

Key: ``sha256(identity, call digest, occurrence)`` where *identity* is the Connect
request's ``job_id`` (stable across retries of one step), else an explicit key given by
the caller (e.g. ``f"{ctx.run_id}:{step_id}"``); *occurrence* numbers identical calls
within one attempt (a step that asks the same question three times gets three answers,
and its retry gets the same three back).

Two backends behind one interface: :class:`SqliteCache` (default; one file, enough for
one host) and :class:`PostgresCache` (several replicas). Both are synchronous drivers
run in a worker thread, so they work from whichever event loop user code runs on.
Entries expire after ``ttl`` seconds; expired rows are ignored and swept on write.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .types import Answer


def cache_key(identity: str, digest: str, occurrence: int) -> str:
    return hashlib.sha256(f"{identity}\0{digest}\0{occurrence}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RunCost:
    """What one run has paid so far (answers stored under its run id)."""

    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0


class ResultCache(Protocol):
    async def get(self, key: str) -> Answer | None: ...

    async def put(self, key: str, answer: Answer, *, run_id: str | None, cost_usd: float) -> None:
        ...

    async def run_cost(self, run_id: str) -> RunCost: ...

    async def close(self) -> None: ...


_SWEEP_INTERVAL = 60.0


class SqliteCache:
    """A SQLite file shared by every process on the host (WAL mode, one connection per call)."""

    def __init__(self, path: str | Path, *, ttl: float = 7 * 24 * 3600) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self._ready = False
        self._lock = threading.Lock()
        self._last_sweep = 0.0

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        if not self._ready:
            with self._lock:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS llm_results (key TEXT PRIMARY KEY,"
                    " run_id TEXT, answer TEXT NOT NULL, cost_usd REAL NOT NULL,"
                    " input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,"
                    " created_at REAL NOT NULL, expires_at REAL NOT NULL)"
                )
                conn.execute("CREATE INDEX IF NOT EXISTS llm_results_run ON llm_results(run_id)")
                conn.execute(
                    "CREATE INDEX IF NOT EXISTS llm_results_exp ON llm_results(expires_at)"
                )
                self._ready = True
        return conn

    def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    async def get(self, key: str) -> Answer | None:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT answer FROM llm_results WHERE key = ? AND expires_at > ?",
            (key, time.time()),
        )
        return Answer.from_json(rows[0][0]) if rows else None

    async def put(self, key: str, answer: Answer, *, run_id: str | None, cost_usd: float) -> None:
        await asyncio.to_thread(self._put, key, answer, run_id, cost_usd)

    def _put(self, key: str, answer: Answer, run_id: str | None, cost_usd: float) -> None:
        now = time.time()
        conn = self._connect()
        try:
            # First answer wins: a concurrent duplicate of the step must not overwrite it.
            conn.execute(
                "INSERT OR IGNORE INTO llm_results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, run_id, answer.to_json(), cost_usd, answer.usage.input_tokens,
                 answer.usage.output_tokens, now, now + self.ttl),
            )
            if now - self._last_sweep > _SWEEP_INTERVAL:
                self._last_sweep = now
                conn.execute("DELETE FROM llm_results WHERE expires_at <= ?", (now,))
        finally:
            conn.close()

    async def run_cost(self, run_id: str) -> RunCost:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT coalesce(sum(cost_usd), 0), coalesce(sum(input_tokens), 0),"
            " coalesce(sum(output_tokens), 0), count(*) FROM llm_results"
            " WHERE run_id = ? AND expires_at > ?",
            (run_id, time.time()),
        )
        cost, inp, out, calls = rows[0]
        return RunCost(float(cost), int(inp), int(out), int(calls))

    async def close(self) -> None:
        return None


class PostgresCache:
    """The same table in PostgreSQL, for several replicas (``psycopg`` 3, autocommit).

    One connection, used by one thread at a time and reopened after a failure.
    """

    def __init__(self, dsn: str, *, ttl: float = 7 * 24 * 3600) -> None:
        self.dsn = dsn
        self.ttl = ttl
        self._lock = threading.Lock()
        self._conn: Any = None
        self._last_sweep = 0.0

    def _connection(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
            # The advisory lock stops two replicas racing on CREATE TABLE IF NOT EXISTS.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('connect_worker_llm'))")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS connect_worker_llm_results (key text PRIMARY KEY,"
                    " run_id text, answer text NOT NULL, cost_usd double precision NOT NULL,"
                    " input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,"
                    " created_at double precision NOT NULL,"
                    " expires_at double precision NOT NULL)"
                )
                conn.execute(
                    "CREATE INDEX IF NOT EXISTS connect_worker_llm_results_run"
                    " ON connect_worker_llm_results(run_id)"
                )
            self._conn = conn
        return self._conn

    def _run(self, sql: str, params: tuple[Any, ...], fetch: bool = True) -> list[Any]:
        import psycopg

        with self._lock:
            for attempt in (1, 2):
                try:
                    cur = self._connection().execute(sql, params)
                    return list(cur.fetchall()) if fetch else []
                except psycopg.OperationalError:
                    # A dropped connection is reopened once; anything else propagates.
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    async def get(self, key: str) -> Answer | None:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT answer FROM connect_worker_llm_results WHERE key = %s AND expires_at > %s",
            (key, time.time()),
        )
        return Answer.from_json(rows[0][0]) if rows else None

    async def put(self, key: str, answer: Answer, *, run_id: str | None, cost_usd: float) -> None:
        now = time.time()
        await asyncio.to_thread(
            self._run,
            "INSERT INTO connect_worker_llm_results VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (key) DO NOTHING",
            (key, run_id, answer.to_json(), cost_usd, answer.usage.input_tokens,
             answer.usage.output_tokens, now, now + self.ttl),
            False,
        )
        if now - self._last_sweep > _SWEEP_INTERVAL:
            self._last_sweep = now
            await asyncio.to_thread(
                self._run,
                "DELETE FROM connect_worker_llm_results WHERE expires_at <= %s",
                (now,),
                False,
            )

    async def run_cost(self, run_id: str) -> RunCost:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT coalesce(sum(cost_usd), 0), coalesce(sum(input_tokens), 0),"
            " coalesce(sum(output_tokens), 0), count(*) FROM connect_worker_llm_results"
            " WHERE run_id = %s AND expires_at > %s",
            (run_id, time.time()),
        )
        cost, inp, out, calls = rows[0]
        return RunCost(float(cost), int(inp), int(out), int(calls))

    async def close(self) -> None:
        def _close() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                self._conn = None

        await asyncio.to_thread(_close)


def open_cache(spec: str, *, ttl: float) -> ResultCache | None:
    """``off`` -> None; ``postgres://`` / ``postgresql://`` DSN -> Postgres; else a SQLite path."""
    if spec.strip().lower() in {"off", "none", ""}:
        return None
    if spec.startswith(("postgres://", "postgresql://")):
        return PostgresCache(spec, ttl=ttl)
    return SqliteCache(spec.removeprefix("sqlite:///").removeprefix("sqlite://"), ttl=ttl)
