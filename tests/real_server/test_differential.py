"""The differential check: the same scenarios, with the same worker, against Inngest's
dev server and against our dev gateway, every frame recorded through the same proxy.

Each scenario's recordings are reduced to digests (``differential.digest``: frame
orders per connection and per request, field names, protocol values, the run's outcome)
and compared. Every difference must be in ``ALLOWED``, with its reason; a new one fails
the test (fix the dev gateway, or add it here and to docs/protocol.md §9 with why it
does not matter). Timings are reported (the test's log), never asserted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from connect_worker.lab.inngest_dev import InngestDevServer

from .differential import SCENARIOS, differences, digest, figures, run_both, unexplained

pytestmark = pytest.mark.real_server
log = logging.getLogger(__name__)

# (scenario glob, difference glob) -> why it does not matter. Kept in step with
# docs/protocol.md §9.
ALLOWED: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_dev_gateway_matches_inngest(scenario: str, inngest: InngestDevServer,
                                           tmp_path: Path) -> None:
    real, dev = await run_both(scenario, inngest, tmp_path)
    real_digest, dev_digest = digest(real), digest(dev)
    found = differences(real_digest, dev_digest)
    report = {"scenario": scenario,
              "figures": {"inngest": figures(real), "dev": figures(dev)},
              "differences": [{"what": w, "detail": d,
                               "allowed": not unexplained(scenario, [(w, d)], ALLOWED)}
                              for w, d in found]}
    log.info("differential %s: %s", scenario, json.dumps(report, indent=1))
    (tmp_path / "report.json").write_text(json.dumps(
        {**report, "inngest": real_digest, "dev": dev_digest}, indent=1, default=str))
    # The scenario did what it says on both servers (a broken run compares nothing).
    assert real.run_status == "completed" and dev.run_status == "completed"
    assert real.executions == {"research": 1, "draft": 1, "review": 1}, real.executions
    assert unexplained(scenario, found, ALLOWED) == []
