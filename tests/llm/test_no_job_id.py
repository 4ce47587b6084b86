"""An executor request with an empty job_id (Inngest servers before v1.19.3 send none)
has no identity: nothing is cached or claimed for it, so one run's answer is never
served to another run's step with the same prompt.

A real worker process, the real openai client and the stub provider; the dev gateway
sends empty job ids (``DevServerConfig.send_job_id=False``).
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from connect_worker.devserver import DevServer
from connect_worker.devserver.state import RunStatus
from connect_worker.devserver.testing import fast_config

from .conftest import MakeLLM
from .stubs import Reply, StubProvider
from .test_claims_workers import events, workers
from .util import sample, serving


async def test_two_runs_with_an_empty_job_id_share_no_answer(tmp_path: Path) -> None:
    async with DevServer(fast_config(send_job_id=False)) as dev, \
            StubProvider("openai") as stub, \
            workers(dev, stub, tmp_path, str(tmp_path / "cache.sqlite3"), "w1"):
        stub.script.extend([Reply(text="the first run's answer"),
                            Reply(text="the second run's answer")])
        outputs = []
        for _ in range(2):
            (run_id,) = await dev.send_event("llm/ask", {"prompt": "Summarise the memo."})
            run = await dev.wait_for_run(run_id, timeout=60)
            assert run.status is RunStatus.COMPLETED, run.error
            outputs.append(run.output["text"])

    assert len(stub.requests) == 2
    assert outputs == ["the first run's answer", "the second run's answer"]
    found = events(tmp_path, "w1")
    assert [e["outcome"] for e in found if e["event"] == "llm.call"] == ["ok", "ok"]
    assert len([e for e in found if e["event"] == "llm.no_identity"]) == 1  # once a process


async def test_no_identity_is_counted_and_an_explicit_key_still_caches(
        make_llm: MakeLLM, openai_stub: StubProvider, registry: CollectorRegistry) -> None:
    llm = make_llm()
    for request_id in ("r1", "r2"):  # two runs' requests, both with an empty job_id
        with serving("", request_id, run_id=f"run-{request_id}"):
            await llm.complete("same prompt")
            await llm.complete("same prompt", key="explicit")
    await llm.aclose()
    # No identity: asked twice. An explicit key: asked once, then cached.
    assert len(openai_stub.requests) == 3
    assert sample(registry, "no_identity_total", provider="openai", model="gpt-4.1") == 2
