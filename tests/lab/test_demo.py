"""The README's demo: a rolling deploy in the middle of LLM reports, and its timeline SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from connect_worker import cli
from connect_worker.lab import demo
from connect_worker.lab.fleet import WorkerProcess
from connect_worker.lab.timeline import Bar, Lane, Marker, Note, Timeline, _fit_label, render_svg
from examples.reports.pipelines import PIPELINES

SVG = "{http://www.w3.org/2000/svg}"


def _groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


def _row(output: str, name: str) -> str:
    match = re.search(rf"^\s+{re.escape(name)}\s+(.+)$", output, re.MULTILINE)
    assert match, f"no {name!r} row in:\n{output}"
    return match.group(1).strip()


@pytest.mark.timeout(40)
def test_quick_demo_interrupts_repeats_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = demo.main(["--quick", "--out", str(tmp_path / "demo")])
    output = capsys.readouterr().out
    assert code == 0, output
    settings = demo.QUICK
    assert _row(output, "reports completed") == f"{settings.reports} of {settings.reports}"
    # Every step body of the example reports ran once (and a checkpointed one was
    # continued once): the count recorded by the workers is what the gateway memoised.
    executions = int(_row(output, "step executions").split()[0])
    assert executions >= sum(k.steps for k in settings.kinds())
    assert f"the gateway memoised {executions} step results" in output
    assert _row(output, "duplicate executions") == "0"
    assert _row(output, "lost replies") == "0"
    assert _row(output, "interrupted steps") == "0"
    assert _row(output, "worker exit codes") == "0 x 4"
    assert "SIGTERM -> v1-r0" in output and "SIGTERM -> v1-r1" in output
    # The LLM side, from the workers' llm.call log lines: one model request per step
    # body, none asked twice (every worker shares one result cache in the output dir).
    paid = int(_row(output, "model requests").split()[0])
    assert paid == executions, output
    per_worker = dict(part.rsplit(" ", 1) for part in
                      _row(output, "model requests per worker").split(", "))
    assert sorted(per_worker) == ["v1-r0", "v1-r1", "v2-r0", "v2-r1"]
    assert sum(map(int, per_worker.values())) == paid
    assert _row(output, "answers paid twice") == "0"
    assert re.fullmatch(r"[\d,]+ input, [\d,]+ output", _row(output, "tokens"))
    assert re.match(r"\$0\.\d{4} \(simulated provider", _row(output, "estimated cost"))
    assert "no answer was paid for twice" in output
    assert (tmp_path / "demo" / "llm-cache.sqlite3").exists()

    printed = re.search(r"^timeline: (.+\.svg)$", output, re.MULTILINE)
    assert printed, output
    svg = Path(printed.group(1))
    assert svg.resolve() == (tmp_path / "demo" / "timeline.svg").resolve()
    root = ET.parse(svg).getroot()
    assert root.tag == f"{SVG}svg"

    lanes = [g.get("data-lane") for g in _groups(root, "lane")]
    assert sorted(lanes) == ["v1-r0", "v1-r1", "v2-r0", "v2-r1"]  # one lane per worker
    steps = _groups(root, "step")
    assert len(steps) == executions
    # Bars are labelled with the reports' step names (whole in the tooltip).
    tooltips = " ".join(g.findtext(f"{SVG}title") or "" for g in steps)
    for pipeline in PIPELINES[:settings.reports]:
        for step_id, _ in pipeline.steps:
            assert f" {step_id} on " in tooltips, (step_id, tooltips)
    labelled = 0
    keys = {g.get("data-key"): "".join(g.itertext()) for g in _groups(root, "key-entry")}
    for g in steps:
        step_id = (g.findtext(f"{SVG}title") or "").split(" on ")[0].split(" ", 2)[2]
        lines = [t.text or "" for t in g.iter(f"{SVG}text")]
        key = [t.text for t in g.iter(f"{SVG}text") if t.get("class") == "key"]
        if key:  # too short for its name: a key number, named in the list under the chart
            assert f" {step_id} on " in keys[key[0]], (key, keys)
            continue
        # The whole name (maybe broken at hyphens over lines).
        text = "".join(line for line in lines if not re.fullmatch(r"R\d+", line))
        assert text == step_id, (text, step_id)
        labelled += 1
    assert labelled >= len(steps) // 2, tooltips
    busy = {g.get("data-lane") for g in steps}
    markers: dict[str, set[str]] = {}
    for g in _groups(root, "marker"):
        kinds = {c.removeprefix("marker-") for c in (g.get("class") or "").split()}
        markers.setdefault(g.get("data-lane") or "", set()).update(kinds - {"marker"})
    # Every worker was stopped by SIGTERM (v1 by the deploy, v2 at the end): each lane
    # shows SIGTERM, PAUSE and exit, and a last reply ACK wherever a step ran.
    for lane in lanes:
        assert {"ready", "sigterm", "pause", "exit"} <= markers[lane], (lane, markers)
        if lane in busy:
            assert "ack" in markers[lane], (lane, markers)
    texts = "".join(root.itertext())
    assert "SIGTERM" in texts and "PAUSE" in texts and "last ACK" in texts
    assert "exit 0" in texts


def test_report_kinds_match_the_example_pipelines() -> None:
    assert [(k.fn_id, k.event, k.steps) for k in demo.REPORT_KINDS] == [
        (p.fn_id, p.event, len(p.steps)) for p in PIPELINES]
    assert [k.fn_id for k in demo.DemoSettings().kinds()] == [p.fn_id for p in PIPELINES]


def test_llm_stats_count_paid_cached_and_repeated_requests() -> None:
    def worker(name: str, *calls: dict[str, object]) -> WorkerProcess:
        logs = [{"event": "llm.call", "provider": "simulated", "model": "m", "run_id": "r1",
                 "occurrence": 0, "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.01,
                 **call} for call in calls]
        return WorkerProcess("t", "http://x", name, logs=[*logs, {"event": "drain.end"}],
                             started_at=1.0)

    stats = demo.LLMStats.from_workers([
        worker("a", {"request_id": "q1", "outcome": "ok"},
               {"request_id": "q2", "outcome": "stopped", "output_tokens": 2}),
        worker("b", {"request_id": "q3", "outcome": "ok"},
               {"request_id": "q1", "outcome": "cached", "cost_usd": 0.01},
               {"request_id": "q1", "outcome": "ok", "run_id": "r2"},  # another run
               {"request_id": "q1", "outcome": "ok", "occurrence": 1}),  # asked again
        worker("c", {"request_id": "q3", "outcome": "ok"},  # paid again: a duplicate
               {"request_id": "q4", "outcome": "gave_up"}),
    ])
    assert (stats.paid, stats.cached, stats.stopped, stats.failed) == (6, 1, 1, 1)
    assert stats.duplicates == 1
    assert stats.paid_per_worker == {"a": 2, "b": 3, "c": 1}
    assert (stats.input_tokens, stats.output_tokens) == (60, 27)
    assert round(stats.cost_usd, 6) == 0.06


def test_long_step_names_are_broken_at_hyphens_or_shortened() -> None:
    assert _fit_label("R1", "outline", 100) == (11.0, ["R1", "outline"], True)
    assert _fit_label("R1", "existing-solutions", 70) == (11.0, ["existing-", "solutions"],
                                                          False)
    assert _fit_label("R1", "write-section-2-continue-1", 70) == (
        9.5, ["write-", "section-2-", "continue-1"], False)
    assert _fit_label("R1", "research-landscape", 40) == (9.5, ["resear\u2026"], False)
    assert _fit_label("R1", "research-landscape", 10) is None


def test_render_svg_is_standalone_xml_with_escaped_text() -> None:
    t0 = 1_000.0
    timeline = Timeline(
        title="deploy <v1> & <v2>", subtitle="line one\nline two", t0=t0,
        lanes=[Lane("a", "a", "v1 · pid 1", t0, t0 + 0.5, t0 + 9),
               Lane("b", "b", "v2 · pid 2", t0 + 3, t0 + 4, None)],
        bars=[
            Bar("a", t0 + 1, t0 + 3, 1, "section-0"),
            Bar("a", t0 + 3, t0 + 5, 1, "section-1"),
            Bar("a", t0 + 2, t0 + 8, 2, "section-0"),
            Bar("b", t0 + 5, t0 + 7, 1, "section-2", problem=True),
        ],
        markers=[
            Marker("a", t0 + 6, "sigterm", "SIGTERM"),
            Marker("a", t0 + 6.01, "pause", "PAUSE"),
            Marker("a", t0 + 8, "ack", "last ACK"),
            Marker("a", t0 + 9, "exit", "exit 3", bad=True),
            Marker("b", t0 + 7.1, "done", "R1 done", group=1),
        ],
        notes=[Note(t0 + 4, "deploy")], groups={1: "report 1", 2: "report 2"},
    )
    root = ET.fromstring(render_svg(timeline))
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width") or 0) > 900
    assert [g.get("data-lane") for g in _groups(root, "lane")] == ["a", "b"]
    assert len(_groups(root, "step")) == 4
    assert "deploy <v1> & <v2>" in "".join(root.itertext())


def test_cli_lists_and_dispatches_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert "demo" in cli.build_parser().format_help()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "connect-worker demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--speedup", "0"])
    assert exit_info.value.code == 2
