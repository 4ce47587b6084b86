"""Each kind of drift, against the dev gateway with real workers: v1 runs the first steps
and parks at ``gate``; its worker stops; v2's worker continues the run. Counted: the step
bodies each version ran, the run's end, the drift log lines and the drift counter."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from connect_worker.devserver import DevServer, DevServerConfig, RunStatus
from connect_worker.devserver.state import Run
from connect_worker.engine import drift

from ..engine.harness import running_worker
from . import apps


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with DevServer(DevServerConfig.fast()) as server:
        yield server


@pytest.fixture(autouse=True)
def _clean() -> None:
    apps.counts.clear()
    drift.clear_policies()


def _parked(dev: DevServer, run_id: str) -> bool:
    run = dev.runs.get(run_id)
    return run is not None and any(h["type"] == "wait_for_event" for h in run.history)


class Deploy:
    run: Run
    v1: Counter[str]
    v2: Counter[str]
    drift_total: dict[str, float]
    drift_logs: list[dict[str, Any]]


async def deploy(dev: DevServer, caplog: pytest.LogCaptureFixture, v1: str, v2: str, *,
                 on_drift: str = "warn", data: dict[str, Any] | None = None,
                 policy: dict[str, Any] | None = None) -> Deploy:
    out = Deploy()
    async with running_worker(dev, serve=[apps.make(v1)], instance_id="v1", app_version="v1"):
        [run_id] = await dev.send_event(apps.TRIGGER, data or {})
        await dev.wait_for(lambda: _parked(dev, run_id), 15)
    out.v1 = Counter(apps.counts)
    apps.counts.clear()
    client, fns = apps.make(v2)
    if policy is not None:
        drift.drift_policy(fns[0], **policy)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="connect_worker.engine.drift"):
        async with running_worker(dev, serve=[(client, fns)], instance_id="v2",
                                  app_version="v2", on_drift=on_drift) as worker:
            await dev.send_event(apps.GO, {})
            out.run = await dev.wait_for_run(run_id, 15)
            counter = worker.metrics.version_drift_total
            out.drift_total = {
                s.labels["kind"]: s.value for m in counter.collect() for s in m.samples
                if s.name.endswith("_total")
            }
    out.v2 = Counter(apps.counts)
    out.drift_logs = [r.fields for r in caplog.records  # type: ignore[attr-defined]
                      if getattr(r, "event", None) == "run.version_drift"]
    return out


DRIFTS = {
    # v2, the step v2 reaches with no memo, the memos it leaves unreached
    "rename": ("b2", ["b", "gate"]),
    "remove": ("c", ["b"]),
    "add_middle": ("x", ["b", "gate"]),
    "reorder": ("c", ["b", "gate"]),
}


@pytest.mark.parametrize("v2", sorted(DRIFTS))
async def test_drift_warn_runs_the_new_step_and_says_so(
        dev: DevServer, caplog: pytest.LogCaptureFixture, v2: str) -> None:
    new_step, left = DRIFTS[v2]
    d = await deploy(dev, caplog, "v1", v2)
    assert d.v1 == {"a": 1, "b": 1}
    assert d.run.status is RunStatus.COMPLETED
    assert d.v2[new_step] == 1  # warn: what the SDK does, paid again
    assert d.drift_total == {"added": 1.0}
    [line] = d.drift_logs
    assert line["new_step"] == new_step and line["kind"] == "added"
    assert sorted(line["unconsumed"]) == sorted(left)
    assert line["app_version"] == "v2" and line["run_id"] == d.run.run_id


@pytest.mark.parametrize("v2", sorted(DRIFTS))
async def test_drift_fail_runs_no_new_step_and_fails_the_run(
        dev: DevServer, caplog: pytest.LogCaptureFixture, v2: str) -> None:
    new_step, _ = DRIFTS[v2]
    d = await deploy(dev, caplog, "v1", v2, on_drift="fail")
    assert d.v2 == {}  # not the new step, nor anything after it
    assert d.run.status is RunStatus.FAILED
    assert "version drift" in str(d.run.error) and new_step in str(d.run.error)
    assert d.drift_total == {"added": 1.0}


async def test_rename_with_grace_map_reuses_the_old_memo(
        dev: DevServer, caplog: pytest.LogCaptureFixture) -> None:
    d = await deploy(dev, caplog, "v1", "rename", on_drift="fail",
                     policy={"renamed": {"b": "b2"}})
    assert d.run.status is RunStatus.COMPLETED
    assert d.run.output == ["A", "B", "C"]  # b2 returned b's memo
    assert d.v2 == {"c": 1}
    assert d.drift_logs == []


@pytest.mark.parametrize("v2", ["add_end", "changed_body"])
async def test_compatible_changes_are_not_drift(
        dev: DevServer, caplog: pytest.LogCaptureFixture, v2: str) -> None:
    d = await deploy(dev, caplog, "v1", v2, on_drift="fail")
    assert d.run.status is RunStatus.COMPLETED
    assert d.v2 == ({"c": 1, "d": 1} if v2 == "add_end" else {"c": 1})
    assert d.drift_logs == [] and d.drift_total == {}


async def test_parallel_group_is_not_drift(
        dev: DevServer, caplog: pytest.LogCaptureFixture) -> None:
    d = await deploy(dev, caplog, "par_v1", "par_same", on_drift="fail")
    assert d.v1 == {"a": 1, "p1": 1, "p2": 1}
    assert d.run.status is RunStatus.COMPLETED
    assert d.v2 == {"c": 1, "d": 1}
    assert d.drift_logs == []


async def test_parallel_group_rename_is_drift(
        dev: DevServer, caplog: pytest.LogCaptureFixture) -> None:
    d = await deploy(dev, caplog, "par_v1", "par_rename", on_drift="fail")
    assert d.run.status is RunStatus.FAILED
    assert d.v2 == {}  # p2b was only planned, never run
    assert "p2b" in str(d.run.error)


@pytest.mark.parametrize("n", [1, -1])
async def test_conditional_branch_is_not_drift(
        dev: DevServer, caplog: pytest.LogCaptureFixture, n: int) -> None:
    d = await deploy(dev, caplog, "branch", "branch", on_drift="fail", data={"n": n})
    assert d.v1 == {"a": 1, ("pos" if n > 0 else "neg"): 1}
    assert d.run.status is RunStatus.COMPLETED
    assert d.v2 == {"c": 1}
    assert d.drift_logs == []


@pytest.mark.parametrize("on_drift", ["warn", "fail"])
async def test_output_shape_change(
        dev: DevServer, caplog: pytest.LogCaptureFixture, on_drift: str) -> None:
    d = await deploy(dev, caplog, "shape_v1", "shape_v2", on_drift=on_drift)
    assert d.v1 == {"summarize": 1}
    assert d.drift_total == {"output_shape": 1.0}
    [line] = d.drift_logs
    assert line["new_step"] == "summarize" and "score" in line["detail"]
    if on_drift == "fail":
        assert d.run.status is RunStatus.FAILED and d.v2 == {}
    else:
        assert d.run.status is RunStatus.COMPLETED and d.v2 == {"c": 1}
