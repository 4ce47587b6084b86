"""The README's demo: a rolling deploy in the middle of reports, and its timeline SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from connect_worker import cli, demo
from connect_worker.timeline import Bar, Lane, Marker, Note, Timeline, render_svg

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
    assert _row(output, "step executions").startswith(
        str(settings.reports * settings.sections))
    assert _row(output, "duplicate executions") == "0"
    assert _row(output, "lost replies") == "0"
    assert _row(output, "interrupted steps") == "0"
    assert _row(output, "worker exit codes") == "0 x 4"
    assert "SIGTERM -> v1-r0" in output and "SIGTERM -> v1-r1" in output
    assert "OK: no report was interrupted" in output

    printed = re.search(r"^timeline: (.+\.svg)$", output, re.MULTILINE)
    assert printed, output
    svg = Path(printed.group(1))
    assert svg.resolve() == (tmp_path / "demo" / "timeline.svg").resolve()
    root = ET.parse(svg).getroot()
    assert root.tag == f"{SVG}svg"

    lanes = [g.get("data-lane") for g in _groups(root, "lane")]
    assert sorted(lanes) == ["v1-r0", "v1-r1", "v2-r0", "v2-r1"]  # one lane per worker
    steps = _groups(root, "step")
    assert len(steps) == settings.reports * settings.sections
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
