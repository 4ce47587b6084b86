"""The key test: a report step whose worker is killed (-9) right after the model answered
is retried by the devserver on another worker and makes zero new model requests.

Real processes throughout: two ``python -m connect_worker run`` workers serving
``examples.reports`` (through ``kill_app``) against the devserver, the real openai
client talking to the stub provider, one SQLite result cache file shared by both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from connect_worker.devserver import DevServer
from connect_worker.devserver.state import RunStatus

from .kill_app import MARKER
from .stubs import StubProvider
from .util import SECRET, assert_no_secret_in_logs, log_file

ROOT = Path(__file__).resolve().parents[2]
# analyze-brief, outline, section 1, section 2: the 4th answer is section 2's.
HOLD_AFTER = 4


@contextlib.asynccontextmanager
async def worker(dev: DevServer, stub: StubProvider, tmp_path: Path, name: str,
                 **extra: str) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {
        **os.environ,
        "INNGEST_DEV": "1",
        "INNGEST_API_BASE_URL": dev.api_url,
        "CONNECT_WORKER_INSTANCE_ID": name,
        "CONNECT_WORKER_HTTP_PORT": "off",
        "CONNECT_WORKER_LOG_FORMAT": "json",
        "CONNECT_WORKER_LLM_PROVIDER": "openai",
        "CONNECT_WORKER_LLM_CACHE": str(tmp_path / "llm-cache.sqlite3"),
        "OPENAI_API_KEY": SECRET,
        "OPENAI_BASE_URL": stub.base_url,
        **extra,
    }
    with log_file(tmp_path / f"{name}.log") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connect_worker", "run", "tests.llm.kill_app", cwd=ROOT,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=log)
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.kill()
            await asyncio.wait_for(proc.wait(), 10)


async def read_until(proc: asyncio.subprocess.Process, marker: str) -> None:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited before printing {marker!r}")
        if marker in line.decode():
            return


async def test_a_step_killed_after_the_answer_is_retried_without_new_requests(
        devserver: DevServer, tmp_path: Path) -> None:
    async with StubProvider("openai") as stub, \
            worker(devserver, stub, tmp_path, "w1",
                   KILL_APP_HOLD_AFTER_ANSWERS=str(HOLD_AFTER)) as w1:
        first = await devserver.wait_for_connection(lambda c: c.instance_id == "w1", 30)
        (run_id,) = await devserver.send_event("reports/report.requested", {
            "topic": "Usage-based pricing for developer tools",
            "audience": "the pricing committee"})

        await asyncio.wait_for(read_until(w1, MARKER), 60)
        # Section 2 was answered and stored; its step has not replied yet.
        assert len(stub.requests) == len(stub.answered) == HOLD_AFTER
        assert "Write section 2" in stub.answered[-1].prompt
        held = [d for d in devserver.dispatches if d.conn_id == first.conn_id][-1]
        assert held.replied_at is None

        async with worker(devserver, stub, tmp_path, "w2") as w2:
            second = await devserver.wait_for_connection(lambda c: c.instance_id == "w2", 30)
            w1.kill()  # SIGKILL: no drain, no reply, like a deploy past its grace period
            await asyncio.wait_for(w1.wait(), 10)
            run = await devserver.wait_for_run(run_id, timeout=90)
            assert w2.returncode is None

    assert run.status is RunStatus.COMPLETED, run.error
    retried = [d for d in devserver.dispatches if d.job_id == held.job_id]
    assert {d.conn_id for d in retried} >= {first.conn_id, second.conn_id}
    assert len({d.request_id for d in retried}) >= 2  # a real retry: new request, same job

    section_2 = [seen for seen in stub.requests if "Write section 2" in seen.prompt]
    assert len(section_2) == 1, "the retried step asked the model again"
    # All ten LLM calls of the report were made exactly once: 4 by the killed worker,
    # 0 by the retried step, 6 by the steps after it.
    assert len(stub.requests) == len(stub.answered) == 10
    assert "Write section 3" in stub.requests[HOLD_AFTER].prompt
    assert run.output["cost"]["calls"] == 10
    assert_no_secret_in_logs(tmp_path)
