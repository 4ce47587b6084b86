"""Claim latency and wake-up delay of the LLM result cache's claims, per backend.

    scripts/llm-claims-bench [--dsn postgresql://...] [--n 200]

claim: one uncontended ``claim()`` (a new key), and one that finds a live claim (busy).
refresh: a ``refresh()`` saving a 20 kB partial answer.
wake-up: from the owner starting ``put()`` + ``release()`` to a waiter (own connection)
returning the answer; SQLite waiters poll every 50 ms, PostgreSQL ones are notified.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from connect_worker.llm import Partial, PostgresCache, SqliteCache, Usage
from connect_worker.llm.cache import Claims
from connect_worker.llm.types import Answer


def ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:6.2f} ms  p99 {p99 * 1000:6.2f} ms"


async def bench(name: str, owner: Claims, waiter: Claims, n: int) -> None:
    answer = Answer("x" * 2000, Usage(100, 500), "req", "gpt-4.1")
    fresh, busy, refresh, wake = [], [], [], []
    rng = random.Random(7)
    partial = Partial("y" * 20_000, Usage(100, 5000))
    for _ in range(n):
        key = f"bench-{uuid.uuid4()}"
        t0 = time.perf_counter()
        assert (await owner.claim(key, "owner", 30)).won
        fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert not (await waiter.claim(key, "waiter", 30)).won
        busy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert await owner.refresh(key, "owner", 30, partial)
        refresh.append(time.perf_counter() - t0)
    for _ in range(max(n // 4, 10)):
        key = f"bench-{uuid.uuid4()}"
        await owner.claim(key, "owner", 30)
        waiting = asyncio.ensure_future(waiter.wait(key, 10))
        # The waiter is parked (polling or listening); a random phase against its polls.
        await asyncio.sleep(0.1 + rng.random() * 0.05)
        t0 = time.perf_counter()
        await owner.put(key, answer, run_id=None, cost_usd=0.0)
        await owner.release(key, "owner", keep_partial=False)
        assert await waiting is not None
        wake.append(time.perf_counter() - t0)
    print(f"{name:10s} claim (won)   {ms(fresh)}")
    print(f"{name:10s} claim (busy)  {ms(busy)}")
    print(f"{name:10s} refresh 20kB  {ms(refresh)}")
    print(f"{name:10s} wake-up       {ms(wake)}")


def test_server_dsn() -> str | None:
    """The DSN scripts/setup.d/postgres.sh wrote, if it ran."""
    path = Path(os.environ.get("CONNECT_WORKER_TEST_POSTGRES_DSN_FILE",
                               Path(tempfile.gettempdir()) / "connect-worker-test-postgres.dsn"))
    return path.read_text().strip() if path.is_file() else None


async def main(n: int, dsn: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite3"
        await bench("sqlite", SqliteCache(path), SqliteCache(path), n)
    if dsn:
        owner, waiter = PostgresCache(dsn), PostgresCache(dsn)
        await bench("postgres", owner, waiter, n)
        await owner.close()
        await waiter.close()
    else:
        print("postgres: skipped (pass --dsn)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--dsn", help="a PostgreSQL DSN (default: the test server's, if any)")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.dsn or test_server_dsn()))
