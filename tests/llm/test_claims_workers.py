"""No answer paid twice, with real worker processes, the real openai client and the stub:

- one request dispatched to two workers at the same moment (``Faults.dual_dispatch``)
  makes one model request, on the SQLite and on the PostgreSQL cache;
- the claim's owner SIGKILLed mid-call: the other copy takes the claim over once it
  lapses; 2 requests, not 3;
- SIGKILL 40 words into an 80-word stream: the retry asks only for the remainder;
- a validator that rejects twice: 3 requests for the draft, 3 distinct answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from connect_worker.devserver import DevServer
from connect_worker.devserver.state import RunStatus
from connect_worker.llm import CONTINUE

from .stubs import Kind, Reply, StubProvider
from .util import SECRET, assert_no_secret_in_logs, log_file

ROOT = Path(__file__).resolve().parents[2]
Process = asyncio.subprocess.Process
# The numbers the report quotes: pytest tests/llm/test_claims_workers.py -o log_cli=true
log = logging.getLogger(__name__)
WORDS = " ".join(f"w{i}" for i in range(80))
MODELS = {"openai": "gpt-4.1", "anthropic": "claude-sonnet-4-6"}
MAX_TOKENS = {"openai": "max_completion_tokens", "anthropic": "max_tokens"}


@contextlib.asynccontextmanager
async def workers(dev: DevServer, stub: StubProvider, tmp_path: Path, cache: str,
                  *names: str, **extra: str) -> AsyncIterator[dict[str, Process]]:
    procs: dict[str, Process] = {}
    sdk = stub.kind.upper()  # OPENAI_API_KEY / ANTHROPIC_API_KEY, ..._BASE_URL
    env = {**os.environ, "INNGEST_DEV": "1", "INNGEST_API_BASE_URL": dev.api_url,
           "CONNECT_WORKER_HTTP_PORT": "off", "CONNECT_WORKER_LOG_FORMAT": "json",
           "CONNECT_WORKER_LLM_PROVIDER": stub.kind, "CONNECT_WORKER_LLM_MODEL": MODELS[stub.kind],
           "CONNECT_WORKER_LLM_CACHE": cache, f"{sdk}_API_KEY": SECRET,
           f"{sdk}_BASE_URL": stub.base_url, **extra}
    try:
        for name in names:
            with log_file(tmp_path / f"{name}.log") as log:
                procs[name] = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "connect_worker", "run", "tests.llm.claim_app",
                    cwd=ROOT, env={**env, "CONNECT_WORKER_INSTANCE_ID": name},
                    stdout=log, stderr=log)
        for name in names:
            await dev.wait_for_connection(lambda c, n=name: c.instance_id == n, 30)
        yield procs
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


def events(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    """The toolkit's log events in worker ``name``'s log."""
    lines = (tmp_path / f"{name}.log").read_text().splitlines()
    found = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in found if str(e.get("event", "")).startswith("llm.")]


def claims(cache: str) -> list[tuple[str | None, str | None]]:
    """(owner, partial) of every claim row."""
    if cache.startswith("postgresql://"):
        with psycopg.connect(cache, autocommit=True) as conn:
            return list(conn.execute("SELECT owner, partial FROM connect_worker_llm_claims"))
    with contextlib.closing(sqlite3.connect(cache)) as conn:
        return list(conn.execute("SELECT owner, partial FROM llm_claims"))


def kill_claim_owner(procs: dict[str, asyncio.subprocess.Process], cache: str) -> str:
    """SIGKILL the worker whose process holds the (one) live claim; return its name."""
    (owner,) = [owner for owner, _ in claims(cache) if owner]
    pid = int(owner.split("/")[1])
    (victim,) = [name for name, proc in procs.items() if proc.pid == pid]
    procs[victim].send_signal(signal.SIGKILL)
    return victim


async def until(predicate: Any, timeout: float = 30) -> None:  # noqa: ASYNC109
    """Poll state another process writes (a database row) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)


def cache_spec(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> str:
    if backend == "sqlite":
        return str(tmp_path / "llm-cache.sqlite3")
    dsn: str = request.getfixturevalue("pg_dsn")
    with psycopg.connect(dsn, autocommit=True) as conn:  # claim rows of this test only
        conn.execute("CREATE TABLE IF NOT EXISTS connect_worker_llm_claims (key text)")
        conn.execute("TRUNCATE connect_worker_llm_claims")
    return dsn


# Each cache backend once, each SDK once.
@pytest.mark.parametrize(("backend", "kind"), [("sqlite", "openai"), ("postgres", "anthropic")])
async def test_one_request_sent_to_two_workers_at_once_pays_once(
        devserver: DevServer, tmp_path: Path, request: pytest.FixtureRequest, backend: str,
        kind: Kind) -> None:
    cache = cache_spec(request, tmp_path, backend)
    async with StubProvider(kind) as stub, \
            workers(devserver, stub, tmp_path, cache, "w1", "w2"):
        # Longer than a lease extension interval: the copy that lost the lease is
        # cancelled mid-call (or mid-wait).
        stub.script.append(Reply(text="the one answer", delay=2.5))
        devserver.faults.dual_dispatch = 1
        (run_id,) = await devserver.send_event("llm/ask", {"prompt": "Summarise the memo."})
        run = await devserver.wait_for_run(run_id, timeout=60)

    assert run.status is RunStatus.COMPLETED, run.error
    assert len(stub.requests) == 1
    assert run.output["text"] == "the one answer" and run.output["cost"]["calls"] == 1
    first = devserver.dispatches[0]
    copies = [d for d in devserver.dispatches if d.request_id == first.request_id]
    assert len({d.conn_id for d in copies}) == 2  # really sent to both at once
    outcomes = sorted(e["outcome"] for name in ("w1", "w2") for e in events(tmp_path, name)
                      if e["event"] == "llm.call" and e.get("outcome") != "cached")
    detached = [e for name in ("w1", "w2") for e in events(tmp_path, name)
                if e["event"] == "llm.call.detached"]
    # Either the lease owner called the model (the other copy was cancelled while
    # waiting), or it waited while the lease loser's call, cancelled, finished anyway.
    assert outcomes in (["ok"], ["ok", "waited"])
    assert (outcomes == ["ok", "waited"]) == bool(detached)
    log.info("dual dispatch [%s, %s]: requests=%d outcomes=%s finished_in_background=%d",
             backend, kind, len(stub.requests), outcomes, len(detached))
    assert_no_secret_in_logs(tmp_path)


async def test_a_claim_owner_killed_mid_call_is_taken_over_once_its_claim_lapses(
        devserver: DevServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "llm-cache.sqlite3")
    requested = asyncio.Event()
    async with StubProvider("openai") as stub, workers(
            devserver, stub, tmp_path, cache, "w1", "w2",
            CONNECT_WORKER_LLM_CLAIM_TTL="1.5") as procs:
        stub.on_request = lambda _seen: requested.set()
        stub.script.append(Reply(hold=asyncio.Event()))  # never answers
        devserver.faults.dual_dispatch = 1
        (run_id,) = await devserver.send_event("llm/ask", {"prompt": "Summarise the memo."})
        await asyncio.wait_for(requested.wait(), 30)
        await until(lambda: any(owner for owner, _ in claims(cache)))
        victim = kill_claim_owner(procs, cache)
        run = await devserver.wait_for_run(run_id, timeout=60)

    assert run.status is RunStatus.COMPLETED, run.error
    assert len(stub.requests) == 2  # the killed owner's, then the takeover's
    survivor = "w2" if victim == "w1" else "w1"
    assert any(e["event"] == "llm.claim.takeover" for e in events(tmp_path, survivor))
    log.info("claim owner killed: requests=%d", len(stub.requests))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_stream_killed_halfway_is_continued_not_asked_again(
        devserver: DevServer, tmp_path: Path, kind: Kind) -> None:
    cache = str(tmp_path / "llm-cache.sqlite3")
    async with StubProvider(kind) as stub, workers(
            devserver, stub, tmp_path, cache, "w1", "w2",
            CONNECT_WORKER_LLM_CLAIM_TTL="1.5") as procs:
        stub.script.extend([Reply(text=WORDS, stall_after=40), Reply(text=WORDS)])
        (run_id,) = await devserver.send_event(
            "llm/ask", {"prompt": "Write the section.", "stream": True, "max_tokens": 200})
        await asyncio.wait_for(stub.stalled.wait(), 30)

        def saved_words() -> int:
            rows = [p for owner, p in claims(cache) if owner and p]
            return len(json.loads(rows[0])["text"].split()) if rows else 0

        await until(lambda: saved_words() == 40)  # saved every claim_ttl / 3
        kill_claim_owner(procs, cache)
        run = await devserver.wait_for_run(run_id, timeout=60)

    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output["text"] == WORDS
    first, retry = stub.requests
    assert retry.body["messages"][-1] == {"role": "user", "content": CONTINUE}
    assert retry.body["messages"][-2]["content"] == " ".join(WORDS.split()[:40]) + " "
    assert retry.body[MAX_TOKENS[kind]] < first.body[MAX_TOKENS[kind]]
    assert stub.generated == [40, 40]  # 80 tokens generated in all, not 40 + 80
    assert run.output["usage"]["output_tokens"] == 80
    log.info("crash-resume [%s]: requests=%d generated=%s saved_output_tokens=%d",
             kind, len(stub.requests), stub.generated, 80 + 40 - sum(stub.generated))


async def test_a_validator_rejecting_twice_gets_three_distinct_answers(
        devserver: DevServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "llm-cache.sqlite3")
    async with StubProvider("openai") as stub, \
            workers(devserver, stub, tmp_path, cache, "w1"):
        stub.script.extend([Reply(text="facts: fast, local"), Reply(text="a vague pitch"),
                            Reply(text="a long pitch"), Reply(text="good pitch")])
        (run_id,) = await devserver.send_event("llm/validated", {})
        run = await devserver.wait_for_run(run_id, timeout=60)

    assert run.status is RunStatus.COMPLETED, run.error
    assert run.output == "good pitch"
    facts, *pitches = stub.requests
    assert "List the facts" in facts.prompt  # asked once, reused by every retry
    assert len(pitches) == 3 and len({p.prompt for p in pitches}) == 3
    assert len({json.dumps(p.body) for p in pitches}) == 3
    log.info("reject twice: draft requests=%d facts requests=1", len(pitches))
