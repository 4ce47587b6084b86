"""Claim races on both backends: however many threads or processes contend for a key at
the same moment, exactly one wins it; a lapsed claim is taken over by exactly one."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from connect_worker.llm import ClaimState, Partial, PostgresCache, SqliteCache, Usage
from connect_worker.llm.cache import Claims

SEED = 20261129
THREADS, ROUNDS = 6, 12
PROCESSES, KEYS = 4, 40

Make = Callable[[], Claims]


@pytest.fixture(params=["sqlite", "postgres"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Make:
    if request.param == "sqlite":
        path = tmp_path / "claims.sqlite3"
        return lambda: SqliteCache(path)
    dsn = request.getfixturevalue("pg_dsn")
    return lambda: PostgresCache(dsn)


def contend(make: Make, key: str, rng: random.Random) -> list[ClaimState]:
    """THREADS threads, each with its own connection, claim ``key`` at the same moment
    (a barrier, then a seeded jitter of up to 2 ms)."""
    barrier = threading.Barrier(THREADS)
    jitters = [rng.random() * 0.002 for _ in range(THREADS)]
    out: list[ClaimState | None] = [None] * THREADS

    def one(i: int) -> None:
        cache = make()

        async def go() -> ClaimState:
            try:
                return await cache.claim(key, f"owner-{i}", 30)
            finally:
                await cache.close()

        barrier.wait(10)
        time.sleep(jitters[i])  # a seeded interleaving, not a synchronisation
        out[i] = asyncio.run(go())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(state is not None for state in out)
    return [state for state in out if state is not None]


def test_exactly_one_thread_wins_each_key(make: Make) -> None:
    rng = random.Random(SEED)
    for _ in range(ROUNDS):
        states = contend(make, f"race-{uuid.uuid4()}", rng)
        winners = [s for s in states if s.won]
        assert len(winners) == 1
        assert not winners[0].took_over
        losers = [s for s in states if not s.won]
        assert len({s.owner for s in losers}) == 1 and all(s.expires_in > 0 for s in losers)


def test_exactly_one_thread_takes_over_a_lapsed_claim(make: Make) -> None:
    rng = random.Random(SEED + 1)
    for _ in range(ROUNDS // 3):
        key = f"stale-{uuid.uuid4()}"
        cache = make()
        partial = Partial("half an answer", Usage(10, 3))
        assert asyncio.run(cache.claim(key, "dead", 0)).won  # lapses at once
        assert asyncio.run(cache.refresh(key, "dead", 0, partial))
        asyncio.run(cache.close())
        states = contend(make, key, rng)
        (winner,) = [s for s in states if s.won]
        assert winner.took_over and winner.partial == partial


def _claim_all(spec: str, keys: list[str], owner: str, seed: int) -> list[str]:
    cache: Claims = PostgresCache(spec) if spec.startswith("postgresql://") else SqliteCache(spec)
    order = list(keys)
    random.Random(seed).shuffle(order)

    async def go() -> list[str]:
        won = [k for k in order if (await cache.claim(k, owner, 30)).won]
        await cache.close()
        return won

    return asyncio.run(go())


def test_exactly_one_process_wins_each_key(request: pytest.FixtureRequest,
                                           tmp_path: Path, make: Make) -> None:
    probe = make()
    spec = (probe.dsn if isinstance(probe, PostgresCache)
            else str(tmp_path / "claims.sqlite3"))
    keys = [f"proc-{uuid.uuid4()}" for _ in range(KEYS)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(PROCESSES) as pool:
        won = pool.starmap(_claim_all, [(spec, keys, f"proc-{i}", SEED + i)
                                        for i in range(PROCESSES)])
    assert sorted(k for per_process in won for k in per_process) == sorted(keys)
