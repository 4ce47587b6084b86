"""The lab tools against Inngest's dev server (``--server``): a short soak with the faults
that server allows (no SIGKILL here: a crashed step waits minutes for its lease), and one
rolling deploy of the simulator. Each keeps its promise: every run completed, no
unexplained duplicate, no lost reply."""

from __future__ import annotations

from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer
from connect_worker.lab.simulate import SimulationSettings, run_simulation
from connect_worker.lab.soak import Soak, SoakSettings

pytestmark = pytest.mark.real_server


async def test_soak_on_inngest_keeps_the_promise(inngest: InngestDevServer,
                                                 tmp_path: Path) -> None:
    kinds = ("deploy", "drop", "stall")
    settings = SoakSettings(server=inngest.api_url, minutes=0.25, replicas=2,
                            runs_in_flight=4, steps=2, step_seconds=(0.2, 1.0),
                            fault_interval=(2.0, 4.0), kinds=kinds, drain_timeout=10.0,
                            settle_timeout=120.0, seed=5)
    result = await Soak(settings, tmp_path, lambda _line: None).run()
    assert result.ok, result.table()
    assert set(result.faults) == set(kinds)
    assert result.runs_completed == len(result.run_ids) > 0
    assert sum(result.duplicates.values()) == 0  # nothing here may run a step twice
    drops = [a for a in result.applied if a.fault.kind == "drop"]
    assert all(a.hit for a in drops), [a.note for a in drops]


async def test_simulated_deploy_on_inngest(inngest: InngestDevServer, tmp_path: Path) -> None:
    settings = SimulationSettings(server=inngest.api_url, replicas=2, deploys=1,
                                  reports_in_flight=2, sections=3, step_seconds=0.3,
                                  deploy_interval=1.0, drain_timeout=10.0)
    result = await run_simulation(settings, workdir=tmp_path)
    assert result.ok, result.table()
    assert result.reports_completed == result.reports_started > 0
    assert set(result.exit_codes) == {0}  # every replaced and every final worker
