"""Several replicas rolled one by one under load: the simulator, small."""

from __future__ import annotations

from pathlib import Path

from connect_worker.lab.simulate import RACES_REPLY_CLOSE, SimulationSettings, run_simulation


async def test_rolling_deploys_under_load_lose_and_repeat_nothing(tmp_path: Path) -> None:
    settings = SimulationSettings(replicas=2, deploys=2, reports_in_flight=3, sections=4,
                                  step_seconds=0.3, deploy_interval=1.0, drain_timeout=15,
                                  # The gateway's reply/close race (simulate-deploy --races):
                                  # a drain that closed before its last ACK would lose a reply.
                                  reply_close_race=RACES_REPLY_CLOSE)
    result = await run_simulation(settings, workdir=tmp_path)
    assert result.reports_started >= 3
    assert result.reports_completed == result.reports_started, result.table()
    assert result.step_executions == result.reports_started * 4
    assert result.duplicate_executions == 0
    assert result.lost_replies == 0
    assert result.steps_abandoned == 0
    # Every replaced replica (2 deploys x 2) and the last two drained with exit 0.
    assert result.exit_codes == {0: 6}
    # Work really moved across versions during the deploys.
    assert len({e["pid"] for e in result.executions}) >= 3
    # The drains carried work: the simulator signals a replaced replica once it has a
    # step in flight (a step can still end in the milliseconds before the signal lands:
    # one of the four may drain empty). Workers are listed in spawn order, so the first
    # four are the replaced ones.
    drains = [w.events("drain.start")[0]["in_flight"] for w in result.workers[:4]]
    assert sum(1 for n in drains if n >= 1) >= 3, drains
