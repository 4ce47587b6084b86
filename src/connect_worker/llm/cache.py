"""The durable result cache: every answer is stored the moment it arrives, and looked up
before every call, so a retried step never pays twice for an answer it already got.

Key: ``sha256(identity, call digest, occurrence)`` where *identity* is the Connect
request's ``job_id`` (stable across retries of one step), else an explicit key given by
the caller (e.g. ``f"{ctx.run_id}:{step_id}"``); *occurrence* numbers identical calls
within one attempt (a step that asks the same question three times gets three answers,
and its retry gets the same three back).

Beside the answers, a *claims* table says who is asking the model right now, per key:
the owner (one call of one copy of the step), until when (the owner refreshes it while
its call runs), the partial text of its streamed answer so far (so a retry after a crash
continues instead of asking again), and the answers a step rejected (so the next
attempt asks again, telling the model why). See :class:`Claims`.

Two backends behind one interface: :class:`SqliteCache` (default; one file, enough for
one host, claims work across its processes) and :class:`PostgresCache` (several
replicas). Both are synchronous drivers run in a worker thread, so they work from
whichever event loop user code runs on. Entries expire after ``ttl`` seconds; expired
rows are ignored and swept on write.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from .errors import missing_extra
from .types import Answer, Usage

_T = TypeVar("_T")


def cache_key(identity: str, digest: str, occurrence: int) -> str:
    return hashlib.sha256(f"{identity}\0{digest}\0{occurrence}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class RunCost:
    """What one run has paid so far (answers stored under its run id)."""

    cost_usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0


@dataclass(frozen=True, slots=True)
class Partial:
    """The text a streamed call had received when it was last saved, and an estimate of
    what that interrupted request cost (it never reported its usage)."""

    text: str
    usage: Usage

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "usage": asdict(self.usage)})

    @classmethod
    def from_json(cls, raw: str | None) -> Partial | None:
        if not raw:
            return None
        data = json.loads(raw)
        return cls(data["text"], Usage(**data["usage"]))


@dataclass(frozen=True, slots=True)
class Rejection:
    """An answer the step rejected, and why (told to the model when asking again)."""

    text: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class ClaimState:
    """What :meth:`Claims.claim` found. ``won``: the caller owns the key now and calls the
    model; otherwise ``owner`` does, and its claim lapses in ``expires_in`` seconds unless
    refreshed."""

    won: bool
    owner: str | None = None
    expires_in: float = 0.0
    took_over: bool = False  # won from an owner that stopped refreshing (it died)
    partial: Partial | None = None  # left by that owner: continue from it
    rejections: tuple[Rejection, ...] = ()


class ResultCache(Protocol):
    async def get(self, key: str) -> Answer | None: ...

    async def put(self, key: str, answer: Answer, *, run_id: str | None, cost_usd: float) -> None:
        ...

    async def run_cost(self, run_id: str) -> RunCost: ...

    async def close(self) -> None: ...


@runtime_checkable
class Claims(ResultCache, Protocol):
    """Who is asking the model for a key right now (both built-in caches implement it;
    a custom :class:`ResultCache` without it simply gets no claims)."""

    async def claim(self, key: str, owner: str, ttl: float) -> ClaimState:
        """Take the key if nobody holds it, its holder's claim lapsed, or ``owner`` holds it."""
        ...

    async def refresh(self, key: str, owner: str, ttl: float, partial: Partial | None) -> bool:
        """Extend ``owner``'s claim (and save ``partial``); False if it was lost."""
        ...

    async def release(self, key: str, owner: str, *, keep_partial: bool) -> None: ...

    async def wait(self, key: str, timeout: float) -> Answer | None:  # noqa: ASYNC109
        """Until the answer is stored (returned), the claim is released or lapses, or
        ``timeout`` passes (None)."""
        ...

    async def reject(self, key: str, rejection: Rejection) -> bool:
        """Evict the answer stored under ``key`` (it still counts in ``run_cost``) and
        remember why; False if there was none."""
        ...


_SWEEP_INTERVAL = 60.0
# How often a SQLite waiter looks for the answer (PostgreSQL waiters are notified).
_POLL = 0.05


def _decide(row: tuple[Any, ...] | None, owner: str, now: float, ttl: float
            ) -> tuple[ClaimState, bool]:
    """The claim rule, shared by both backends: (what the caller gets, whether to write)."""
    if row is None:
        return ClaimState(True), True
    holder, expires_at, partial, rejected = row
    rejections = tuple(Rejection(r["text"], r["reason"]) for r in json.loads(rejected or "[]"))
    if holder is not None and holder != owner and expires_at > now:
        return ClaimState(False, holder, expires_at - now), False
    took_over = holder is not None and holder != owner
    return ClaimState(True, took_over=took_over, partial=Partial.from_json(partial),
                      rejections=rejections), True


def _add_rejection(rejected: str | None, rejection: Rejection) -> str:
    items = json.loads(rejected or "[]")
    items.append({"text": rejection.text, "reason": rejection.reason})
    return json.dumps(items)


class SqliteCache:
    """A SQLite file shared by every process on the host (WAL mode, one connection per call).

    Claims are decided inside ``BEGIN IMMEDIATE`` (SQLite's single writer), so two
    processes never both win a key.
    """

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
                self._create(conn)
        return conn

    def _create(self, conn: sqlite3.Connection) -> None:
        for attempt in range(100):
            try:
                self._create_once(conn)
                return
            except sqlite3.OperationalError as exc:
                # Processes opening a new file at once can deadlock on switching it to WAL;
                # SQLite then fails one of them at once instead of waiting its timeout.
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.01)

    def _create_once(self, conn: sqlite3.Connection) -> None:
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
        conn.execute(
            "CREATE TABLE IF NOT EXISTS llm_claims (key TEXT PRIMARY KEY, owner TEXT,"
            " expires_at REAL NOT NULL, partial TEXT, rejected TEXT,"
            " updated_at REAL NOT NULL)"
        )
        self._ready = True

    def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def _transact(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = body(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out
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
                conn.execute("DELETE FROM llm_claims WHERE updated_at <= ?", (now - self.ttl,))
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

    # -- claims ----------------------------------------------------------------------

    async def claim(self, key: str, owner: str, ttl: float) -> ClaimState:
        def body(conn: sqlite3.Connection) -> ClaimState:
            now = time.time()
            row = conn.execute("SELECT owner, expires_at, partial, rejected FROM llm_claims"
                               " WHERE key = ?", (key,)).fetchone()
            state, write = _decide(row, owner, now, ttl)
            if write:
                conn.execute(
                    "INSERT INTO llm_claims (key, owner, expires_at, updated_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET owner = excluded.owner,"
                    " expires_at = excluded.expires_at, updated_at = excluded.updated_at",
                    (key, owner, now + ttl, now))
            return state

        return await asyncio.to_thread(self._transact, body)

    async def refresh(self, key: str, owner: str, ttl: float, partial: Partial | None) -> bool:
        def body() -> bool:
            now = time.time()
            conn = self._connect()
            try:
                cur = conn.execute(
                    "UPDATE llm_claims SET expires_at = ?, updated_at = ?,"
                    " partial = coalesce(?, partial) WHERE key = ? AND owner = ?",
                    (now + ttl, now, partial.to_json() if partial else None, key, owner))
                return cur.rowcount == 1
            finally:
                conn.close()

        return await asyncio.to_thread(body)

    async def release(self, key: str, owner: str, *, keep_partial: bool) -> None:
        await asyncio.to_thread(
            self._run,
            "UPDATE llm_claims SET owner = NULL, expires_at = 0, updated_at = ?,"
            " partial = CASE WHEN ? THEN partial END WHERE key = ? AND owner = ?",
            (time.time(), keep_partial, key, owner))

    async def wait(self, key: str, timeout: float) -> Answer | None:  # noqa: ASYNC109
        stop = threading.Event()
        try:
            return await asyncio.to_thread(self._wait, key, time.monotonic() + timeout, stop)
        finally:
            stop.set()  # a cancelled waiter's thread ends at its next poll

    def _wait(self, key: str, deadline: float, stop: threading.Event) -> Answer | None:
        conn = self._connect()
        try:
            while not stop.is_set():
                now = time.time()
                row = conn.execute(
                    "SELECT (SELECT answer FROM llm_results WHERE key = ?1 AND expires_at > ?2),"
                    " (SELECT count(*) FROM llm_claims WHERE key = ?1 AND owner IS NOT NULL"
                    " AND expires_at > ?2)", (key, now)).fetchone()
                if row[0] is not None:
                    return Answer.from_json(row[0])
                if not row[1] or time.monotonic() >= deadline:
                    return None
                stop.wait(_POLL)
            return None
        finally:
            conn.close()

    async def reject(self, key: str, rejection: Rejection) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            now = time.time()
            # Kept under another key: the rejected answer was paid for and stays in run_cost.
            moved = conn.execute("UPDATE llm_results SET key = ? WHERE key = ?",
                                 (f"rejected:{uuid.uuid4()}", key)).rowcount
            row = conn.execute("SELECT rejected FROM llm_claims WHERE key = ?", (key,)).fetchone()
            rejected = _add_rejection(row[0] if row else None, rejection)
            conn.execute(
                "INSERT INTO llm_claims (key, owner, expires_at, rejected, updated_at)"
                " VALUES (?, NULL, 0, ?, ?) ON CONFLICT (key) DO UPDATE SET"
                " rejected = excluded.rejected, updated_at = excluded.updated_at",
                (key, rejected, now))
            return moved == 1

        return await asyncio.to_thread(self._transact, body)

    async def close(self) -> None:
        return None


_CLAIMS = "connect_worker_llm_claims"
_CHANNEL = "connect_worker_llm"
# The database's clock, so replicas whose clocks disagree still agree on expiry.
_NOW = "extract(epoch from clock_timestamp())::float8"


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise missing_extra("psycopg", "postgres") from None
    return psycopg


class PostgresCache:
    """The same tables in PostgreSQL, for several replicas (``psycopg`` 3, autocommit).

    One connection, used by one thread at a time and reopened after a failure. Claims
    use a row lock (``SELECT ... FOR UPDATE`` after ``INSERT ... ON CONFLICT DO
    NOTHING``) and the database's clock; a stored answer or a released claim is
    announced with ``NOTIFY``, so a waiter on another replica wakes at once (each waiter
    listens on a connection of its own while it waits).
    """

    def __init__(self, dsn: str, *, ttl: float = 7 * 24 * 3600) -> None:
        self.dsn = dsn
        self.ttl = ttl
        self._lock = threading.Lock()
        self._conn: Any = None
        self._closed = False
        self._last_sweep = 0.0

    def _open(self) -> Any:
        return _import_psycopg().connect(self.dsn, autocommit=True, connect_timeout=10)

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed:
            conn = self._open()
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
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {_CLAIMS} (key text PRIMARY KEY, owner text,"
                    " expires_at double precision NOT NULL, partial text, rejected text,"
                    " updated_at double precision NOT NULL)"
                )
            self._conn = conn
        return self._conn

    def _with(self, body: Callable[[Any], _T]) -> _T:
        psycopg = _import_psycopg()

        with self._lock:
            if self._closed:
                # A call that outlived close() (e.g. one finishing in the background)
                # still stores its answer, on a connection of its own.
                with self._open() as conn:
                    return body(conn)
            for attempt in (1, 2):
                try:
                    return body(self._connection())
                except psycopg.OperationalError:
                    # A dropped connection is reopened once; anything else propagates.
                    if self._conn is not None:
                        self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def _run(self, sql: str, params: tuple[Any, ...] | dict[str, Any], fetch: bool = True
             ) -> list[Any]:
        def body(conn: Any) -> list[Any]:
            cur = conn.execute(sql, params)
            return list(cur.fetchall()) if fetch else []

        return self._with(body)

    def _transact(self, body: Callable[[Any], _T]) -> _T:
        def run(conn: Any) -> _T:
            with conn.transaction():
                return body(conn)

        return self._with(run)

    async def get(self, key: str) -> Answer | None:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT answer FROM connect_worker_llm_results WHERE key = %s AND expires_at > %s",
            (key, time.time()),
        )
        return Answer.from_json(rows[0][0]) if rows else None

    async def put(self, key: str, answer: Answer, *, run_id: str | None, cost_usd: float) -> None:
        now = time.time()

        def body(conn: Any) -> None:
            conn.execute(
                "INSERT INTO connect_worker_llm_results VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (key) DO NOTHING",
                (key, run_id, answer.to_json(), cost_usd, answer.usage.input_tokens,
                 answer.usage.output_tokens, now, now + self.ttl))
            conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, key))

        await asyncio.to_thread(self._transact, body)
        if now - self._last_sweep > _SWEEP_INTERVAL:
            self._last_sweep = now
            await asyncio.to_thread(
                self._run,
                "DELETE FROM connect_worker_llm_results WHERE expires_at <= %s",
                (now,),
                False,
            )
            await asyncio.to_thread(self._run, f"DELETE FROM {_CLAIMS} WHERE updated_at <= %s",
                                    (now - self.ttl,), False)

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

    # -- claims ----------------------------------------------------------------------

    async def claim(self, key: str, owner: str, ttl: float) -> ClaimState:
        def body(conn: Any) -> ClaimState:
            fresh = conn.execute(
                f"INSERT INTO {_CLAIMS} (key, owner, expires_at, updated_at)"
                f" VALUES (%(key)s, %(owner)s, {_NOW} + %(ttl)s, {_NOW})"
                " ON CONFLICT (key) DO NOTHING RETURNING key",
                {"key": key, "owner": owner, "ttl": ttl}).fetchone()
            if fresh is not None:
                return ClaimState(True)
            row = conn.execute(
                f"SELECT owner, expires_at, partial, rejected, {_NOW} FROM {_CLAIMS}"
                " WHERE key = %s FOR UPDATE", (key,)).fetchone()
            state, write = _decide(row[:4], owner, row[4], ttl)
            if write:
                conn.execute(f"UPDATE {_CLAIMS} SET owner = %s, expires_at = {_NOW} + %s,"
                             f" updated_at = {_NOW} WHERE key = %s", (owner, ttl, key))
            return state

        return await asyncio.to_thread(self._transact, body)

    async def refresh(self, key: str, owner: str, ttl: float, partial: Partial | None) -> bool:
        def body(conn: Any) -> bool:
            cur = conn.execute(
                f"UPDATE {_CLAIMS} SET expires_at = {_NOW} + %s, updated_at = {_NOW},"
                " partial = coalesce(%s, partial) WHERE key = %s AND owner = %s",
                (ttl, partial.to_json() if partial else None, key, owner))
            return bool(cur.rowcount == 1)

        return await asyncio.to_thread(self._with, body)

    async def release(self, key: str, owner: str, *, keep_partial: bool) -> None:
        def body(conn: Any) -> None:
            conn.execute(
                f"UPDATE {_CLAIMS} SET owner = NULL, expires_at = 0, updated_at = {_NOW},"
                " partial = CASE WHEN %s THEN partial END WHERE key = %s AND owner = %s",
                (keep_partial, key, owner))
            conn.execute("SELECT pg_notify(%s, %s)", (_CHANNEL, key))

        await asyncio.to_thread(self._transact, body)

    async def wait(self, key: str, timeout: float) -> Answer | None:  # noqa: ASYNC109
        stop = threading.Event()
        try:
            return await asyncio.to_thread(self._wait, key, time.monotonic() + timeout, stop)
        finally:
            stop.set()  # a cancelled waiter's thread ends within a second

    def _wait(self, key: str, deadline: float, stop: threading.Event) -> Answer | None:
        with self._open() as conn:
            conn.execute(f"LISTEN {_CHANNEL}")
            while not stop.is_set():
                # Checked after LISTEN, so a NOTIFY sent meanwhile is not missed.
                answer, held_for = conn.execute(
                    "SELECT (SELECT answer FROM connect_worker_llm_results WHERE key = %(k)s"
                    " AND expires_at > %(now)s),"
                    f" (SELECT expires_at - {_NOW} FROM {_CLAIMS} WHERE key = %(k)s"
                    " AND owner IS NOT NULL)", {"k": key, "now": time.time()}).fetchone()
                if answer is not None:
                    return Answer.from_json(answer)
                left = deadline - time.monotonic()
                if held_for is None or held_for <= 0 or left <= 0:
                    return None
                # Woken by any NOTIFY on the channel (then re-checked), by the claim's
                # expiry, or after a second to notice a cancelled waiter.
                for _ in conn.notifies(timeout=min(left, held_for + 0.01, 1.0), stop_after=1):
                    pass
            return None

    async def reject(self, key: str, rejection: Rejection) -> bool:
        def body(conn: Any) -> bool:
            moved = conn.execute("UPDATE connect_worker_llm_results SET key = %s WHERE key = %s",
                                 (f"rejected:{uuid.uuid4()}", key)).rowcount
            conn.execute(
                f"INSERT INTO {_CLAIMS} (key, owner, expires_at, updated_at)"
                f" VALUES (%s, NULL, 0, {_NOW}) ON CONFLICT (key) DO NOTHING", (key,))
            row = conn.execute(f"SELECT rejected FROM {_CLAIMS} WHERE key = %s FOR UPDATE",
                               (key,)).fetchone()
            conn.execute(f"UPDATE {_CLAIMS} SET rejected = %s, updated_at = {_NOW}"
                         " WHERE key = %s", (_add_rejection(row[0], rejection), key))
            return bool(moved == 1)

        return await asyncio.to_thread(self._transact, body)

    async def close(self) -> None:
        def _close() -> None:
            with self._lock:
                self._closed = True
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
