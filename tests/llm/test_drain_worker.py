"""A rolling deploy in the middle of a streaming report step: the old worker gets SIGTERM,
its stream stops early, the step returns a checkpoint, the worker drains cleanly (exit 0),
and the new worker continues the section from the checkpoint. Nothing is abandoned and
no answer is requested twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from connect_worker.devserver import DevServer
from connect_worker.devserver.state import RunStatus
from examples.reports.pipelines import CONTINUE

from .stubs import Reply, StubProvider
from .util import SECRET, assert_no_secret_in_logs, log_file

ROOT = Path(__file__).resolve().parents[2]


async def start(dev: DevServer, stub: StubProvider, tmp_path: Path, name: str
                ) -> asyncio.subprocess.Process:
    env = {**os.environ, "INNGEST_DEV": "1", "INNGEST_API_BASE_URL": dev.api_url,
           "CONNECT_WORKER_INSTANCE_ID": name, "CONNECT_WORKER_HTTP_PORT": "off",
           "CONNECT_WORKER_DRAIN_TIMEOUT": "30", "CONNECT_WORKER_LOG_FORMAT": "json",
           "CONNECT_WORKER_LLM_PROVIDER": "openai",
           "CONNECT_WORKER_LLM_CACHE": str(tmp_path / "llm-cache.sqlite3"),
           "OPENAI_API_KEY": SECRET, "OPENAI_BASE_URL": stub.base_url}
    with log_file(tmp_path / f"{name}.log") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "connect_worker", "run", "examples.reports", cwd=ROOT,
            env=env, stdout=log, stderr=log)


async def test_a_drain_checkpoints_a_streaming_step_and_another_worker_resumes_it(
        devserver: DevServer, tmp_path: Path) -> None:
    streaming = asyncio.Event()
    words = " ".join(f"w{i}" for i in range(3000))
    procs: list[asyncio.subprocess.Process] = []
    async with StubProvider("openai") as stub:
        # analyze-brief, outline, then section 1 streams for a long time.
        stub.script.extend([Reply(), Reply(), Reply(
            text=words, chunk_delay=0.005,
            on_chunk=lambda index: streaming.set() if index == 50 else None)])
        try:
            procs.append(old := await start(devserver, stub, tmp_path, "old"))
            await devserver.wait_for_connection(lambda c: c.instance_id == "old", 30)
            (run_id,) = await devserver.send_event("reports/report.requested",
                                                   {"topic": "Edge databases"})
            await asyncio.wait_for(streaming.wait(), 60)

            procs.append(await start(devserver, stub, tmp_path, "new"))
            await devserver.wait_for_connection(lambda c: c.instance_id == "new", 30)
            old.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(old.wait(), 30) == 0  # drained, nothing abandoned
            run = await devserver.wait_for_run(run_id, timeout=60)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                await asyncio.wait_for(proc.wait(), 10)

    assert run.status is RunStatus.COMPLETED, run.error
    section_1 = [s for s in stub.requests if "Write section 1" in s.prompt]
    original = [s for s in section_1 if CONTINUE not in s.prompt]
    continued = [s for s in section_1 if CONTINUE in s.prompt]
    assert len(original) == 1 and len(continued) == 1
    # The continuation carries the checkpointed text as the assistant's turn.
    partial = continued[0].body["messages"][-2]
    assert partial["role"] == "assistant" and partial["content"].startswith("w0 w1 w2")
    assert len(partial["content"]) < len(words)
    # 10 LLM calls plus the continuation; none repeated.
    assert len(stub.requests) == 11
    assert run.output["cost"]["calls"] == 11
    assert partial["content"] + "answer to:" in run.output["markdown"]
    assert_no_secret_in_logs(tmp_path)
