"""`connect-worker compat` on histories recorded by real v1 workers on the dev gateway:
it catches the rename, passes compatible versions, and runs no step body doing so."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connect_worker import compat
from connect_worker.devserver import DevServer, DevServerConfig, RunStatus

from ..engine.harness import running_worker
from . import apps

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def dev() -> AsyncIterator[DevServer]:
    async with DevServer(DevServerConfig.fast()) as server:
        yield server


def _parked(dev: DevServer, run_id: str) -> bool:
    run = dev.runs.get(run_id)
    return run is not None and any(h["type"] == "wait_for_event" for h in run.history)


async def _record(dev: DevServer, directory: Path, version: str, *,
                  shape_only: bool = False) -> list[str]:
    """Three v1 runs: two parked at the gate (in flight), one finished."""
    async with running_worker(dev, serve=[apps.make(version)], instance_id="v1",
                              app_version="v1", record_history=str(directory),
                              record_history_shape_only=shape_only):
        done = (await dev.send_event(apps.TRIGGER, {"n": 1}))[0]
        await dev.wait_for(lambda: _parked(dev, done), 15)
        await dev.send_event(apps.GO, {})
        assert (await dev.wait_for_run(done, 15)).status is RunStatus.COMPLETED
        parked = [(await dev.send_event(apps.TRIGGER, {"n": i}))[0] for i in (1, 2)]
        for run_id in parked:
            await dev.wait_for(lambda r=run_id: _parked(dev, r), 15)
    return [done, *parked]


def _status(reports: list[compat.FunctionReport]) -> dict[str, str]:
    return {r.function: r.status for r in reports}


@pytest.mark.parametrize("shape_only", [False, True])
async def test_compat_on_recorded_histories(dev: DevServer, tmp_path: Path,
                                            shape_only: bool) -> None:
    run_ids = await _record(dev, tmp_path, "v1", shape_only=shape_only)
    histories = compat.load_histories([tmp_path])
    assert sorted(h.run_id for h in histories) == sorted(run_ids)
    assert sum(h.in_flight for h in histories) == 2
    apps.counts.clear()
    rename = await asyncio.to_thread(compat.replay, [apps.make("rename")], histories)
    [report] = rename
    assert report.status == "new step where a memo was expected"
    assert report.broken_runs == set(run_ids)
    assert len(report.broken_in_flight) == 2
    first = compat._first_problems(report)[0]
    assert first.new_step == "b2" and "b" in first.unconsumed
    for version in ("add_end", "changed_body", "v1"):
        again = await asyncio.to_thread(compat.replay, [apps.make(version)], histories)
        assert _status(again) == {"drift-pipeline": "compatible"}, version
    assert apps.counts == {}  # replay runs no step body


async def test_compat_from_the_gateway_and_its_export(dev: DevServer, tmp_path: Path) -> None:
    run_ids = await _record(dev, tmp_path / "recorded", "par_v1")
    live = await asyncio.to_thread(compat.fetch_gateway, dev.api_url)
    assert sorted(h.run_id for h in live) == sorted(run_ids)
    assert _status(await asyncio.to_thread(compat.replay, [apps.make("par_same")], live)) == {
        "drift-pipeline": "compatible"}
    [report] = await asyncio.to_thread(compat.replay, [apps.make("par_rename")], live)
    assert report.status != "compatible" and len(report.broken_in_flight) == 2
    assert await asyncio.to_thread(compat.export_gateway, dev.api_url, tmp_path / "export") == 3
    exported = compat.load_histories([tmp_path / "export"])
    again = await asyncio.to_thread(compat.replay, [apps.make("par_rename")], exported)
    assert _status(again) == _status([report])


async def test_compat_cli_exit_codes(dev: DevServer, tmp_path: Path) -> None:
    await _record(dev, tmp_path, "v1")
    root = ROOT

    def cli(target: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "connect_worker", "compat",
             f"tests.drift.versions:{target}", str(tmp_path), *extra],
            cwd=root, capture_output=True, text=True, timeout=120, check=False)

    bad = await asyncio.to_thread(cli, "rename")
    assert bad.returncode == 1, bad.stderr
    assert "new step 'b2'" in bad.stdout and "would break 2 of 2 runs in flight" in bad.stdout
    good = await asyncio.to_thread(cli, "add_end", "--json")
    assert good.returncode == 0, good.stderr
    doc = json.loads(good.stdout)
    assert doc["compatible"] is True and doc["runs_in_flight"] == 2


def test_a_run_in_flight_breaks_once_its_running_step_completes() -> None:
    """A v1 run that is executing b right now passes compat on its own memos, but finishes
    b on v1 and then meets v2: other runs' histories say what b's memo looks like."""
    h = {name: compat.drift.hash_step_id(name) for name in ("a", "b", "gate", "c")}
    event = {"name": apps.TRIGGER, "data": {}}

    def history(run_id: str, steps: list[str], status: str) -> compat.History:
        memos = {h[s]: None if s == "gate" else {"data": s.upper()} for s in steps}
        return compat.History(run_id, apps.FN, status, event, None, [h[s] for s in steps],
                              memos, {h[s]: s for s in steps})

    running = history("now", ["a"], "running")
    done = history("done", ["a", "b", "gate", "c"], "completed")
    alone = compat.replay([apps.make("rename")], [running])
    assert alone[0].status == "compatible", alone[0].problems  # its own memos cannot tell
    [report] = compat.replay([apps.make("rename")], [running, done])
    assert report.broken_in_flight == {"now"}
    [p] = [p for p in report.problems if p.run_id == "now"]
    assert p.next_step and p.new_step == "b2" and p.unconsumed == ["b"]
    assert compat.replay([apps.make("add_end")], [running, done])[0].status == "compatible"
