"""The demo's timeline picture, checked the way a person reads it.

The recorded timeline (``data/demo_timeline.json``) is what ``connect-worker demo``
built from a real run: two v1 workers replaced by two v2 workers, drains of 0.06 to
1.2 s inside a 26 s picture, two steps checkpointed at the drain and continued on v2.
The tests render it, check that text does not collide and that every bar is named,
then render the SVG to PNG with rsvg-convert (installed by scripts/setup.d/rsvg.sh)
and keep the PNG in the test's output directory for a person to look at.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from connect_worker.lab.timeline import (
    MARKERS,
    Bar,
    Lane,
    Marker,
    Note,
    Timeline,
    _text_width,
    continuations,
    render_svg,
)

from ..missing import missing

SVG = "{http://www.w3.org/2000/svg}"
DATA = Path(__file__).parent / "data" / "demo_timeline.json"


def _load(path: Path) -> Timeline:
    d = json.loads(path.read_text(encoding="utf-8"))
    return Timeline(
        title=d["title"], subtitle=d["subtitle"], t0=d["t0"],
        lanes=[Lane(**lane) for lane in d["lanes"]], bars=[Bar(**b) for b in d["bars"]],
        markers=[Marker(**m) for m in d["markers"]], notes=[Note(**n) for n in d["notes"]],
        groups={int(k): v for k, v in d["groups"].items()}, axis_label=d["axis_label"],
    )


def _groups(root: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


def _box(text: ET.Element) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a text element, with the width the renderer assumes."""
    size = float(text.get("font-size") or 12)
    width = _text_width(text.text or "", size)
    x, y = float(text.get("x") or 0), float(text.get("y") or 0)
    anchor = text.get("text-anchor") or "start"
    left = x - width if anchor == "end" else x - width / 2 if anchor == "middle" else x
    return left, y - size * 0.8, left + width, y + size * 0.2


def _overlaps(boxes: list[tuple[float, float, float, float]]) -> list[tuple[int, int]]:
    return [(i, j) for i, a in enumerate(boxes) for j, b in enumerate(boxes[i + 1:], i + 1)
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]]


@pytest.fixture(scope="module")
def recorded() -> tuple[Timeline, ET.Element, str]:
    timeline = _load(DATA)
    svg = render_svg(timeline)
    return timeline, ET.fromstring(svg), svg


def test_every_drain_has_a_close_up_with_its_markers_apart(
    recorded: tuple[Timeline, ET.Element, str],
) -> None:
    timeline, root, _ = recorded
    drained = [lane.key for lane in timeline.lanes
               if any(m.lane == lane.key and m.kind == "sigterm" for m in timeline.markers)]
    closeups = _groups(root, "closeup")
    assert [g.get("data-lane") for g in closeups] == drained
    for closeup in closeups:
        marks = _groups(closeup, "marker")
        kinds = [g.get("class", "").split()[1].removeprefix("marker-") for g in marks]
        assert kinds[0] == "sigterm" and "pause" in kinds and kinds[-1] == "exit", kinds
        labels = [next(g.iter(f"{SVG}text")) for g in marks]
        assert _overlaps([_box(t) for t in labels]) == [], [t.text for t in labels]
        # Each marker line is on its own, at least a few pixels from the next one, even
        # where SIGTERM and PAUSE are a millisecond apart.
        xs = sorted(float(next(g.iter(f"{SVG}line")).get("x1") or 0) for g in marks)
        assert min(b - a for a, b in itertools.pairwise(xs)) >= 6, xs
        # Times are spelled out after the SIGTERM.
        assert all(re.search(r"[+\u2212]\d", t.text or "") for t in labels[1:]), labels


def test_main_chart_names_each_drain_once_and_text_never_collides(
    recorded: tuple[Timeline, ET.Element, str],
) -> None:
    _, root, _ = recorded
    callouts = [t.text or "" for g in _groups(root, "callout") for t in g.iter(f"{SVG}text")]
    drains = [c for c in callouts if c.startswith("SIGTERM")]
    assert [c.rsplit(" ", 1)[1] for c in drains] == ["A", "B", "C", "D"], callouts
    # Text of the lanes (callouts, READY labels, "done" labels) never overlaps.
    texts = [t for cls in ("callout", "marker-done", "note")
             for g in _groups(root, cls) for t in g.iter(f"{SVG}text")
             if not any(g in c for c in _groups(root, "closeup"))]
    assert _overlaps([_box(t) for t in texts]) == [], [t.text for t in texts]


def test_every_bar_is_named_in_it_or_in_the_key(
    recorded: tuple[Timeline, ET.Element, str],
) -> None:
    timeline, root, _ = recorded
    keys = {g.get("data-key"): "".join(g.itertext()) for g in _groups(root, "key-entry")}
    steps = _groups(root, "step")
    assert len(steps) == len(timeline.bars)
    keyed = 0
    for g, bar in zip(steps, sorted(timeline.bars, key=lambda b: (b.lane, b.start)),
                      strict=False):
        title = g.findtext(f"{SVG}title") or ""
        name = title.split(" on ")[0].split(" ", 2)[2]
        key = [t.text for t in g.iter(f"{SVG}text") if t.get("class") == "key"]
        if key:
            keyed += 1
            assert f" {name} on " in keys[key[0]], (key, keys)
            continue
        lines = [t.text or "" for t in g.iter(f"{SVG}text")]
        assert "".join(line for line in lines if not re.fullmatch(r"R\d+", line)) == name, (
            lines, bar)
    assert keyed == len(keys) >= 1  # the recording has bars too short for their name


def test_legend_speaks_plain_words_and_explains_the_speed_up(
    recorded: tuple[Timeline, ET.Element, str],
) -> None:
    _, root, svg = recorded
    text = " ".join(root.itertext())
    for _, words in MARKERS.values():
        # Plain words first, the protocol's term (if any) in brackets after them.
        assert words in text and not words.startswith(("WORKER_", "GATEWAY_"))
    assert "read by the gateway" not in text
    assert "(WORKER_PAUSE)" in text and "(SIGTERM)" in text and "(READY)" in text
    assert re.search(r"sped up \d+x: a step that takes ~\d+ s on a real model takes", text)
    assert "speed-up" not in svg


def test_continued_steps_are_joined_to_the_step_they_continue(
    recorded: tuple[Timeline, ET.Element, str],
) -> None:
    timeline, root, _ = recorded
    pairs = continuations(timeline.bars)
    continued = sorted(b.label for b in timeline.bars if "-continue-" in b.label)
    assert sorted(after.label for _, after in pairs) == continued
    assert all(after.label.startswith(before.label) for before, after in pairs)
    drawn = [(g.get("data-from"), g.get("data-to")) for g in _groups(root, "continuation")]
    assert drawn == [(before.lane, after.lane) for before, after in pairs]
    assert len(drawn) == 2  # write-section-1 and research-landscape, v1 -> v2


def test_markers_a_millisecond_apart_are_spread_in_the_close_up() -> None:
    t0 = 1_000.0
    sigterm = t0 + 20
    timeline = Timeline(
        title="t", subtitle="", t0=t0,
        lanes=[Lane("a", "a", "v1", t0, t0 + 1, sigterm + 0.06)],
        bars=[Bar("a", t0 + 2, t0 + 6, 1, "outline"),
              Bar("a", sigterm - 3, sigterm + 0.03, 1, "write-section-1")],
        markers=[Marker("a", sigterm, "sigterm", "SIGTERM"),
                 Marker("a", sigterm + 0.001, "pause", "PAUSE"),
                 Marker("a", sigterm + 0.03, "ack", "last ACK"),
                 Marker("a", sigterm + 0.06, "exit", "exit 0 (drain 0.1 s)")],
        groups={1: "report 1"},
    )
    root = ET.fromstring(render_svg(timeline))
    main = [float(next(g.iter(f"{SVG}line")).get("x1") or 0) for g in _groups(root, "marker")
            if not any(g in c for c in _groups(root, "closeup"))]
    assert max(main) - min(main) < 10  # the problem: four markers within a few pixels
    (closeup,) = _groups(root, "closeup")
    xs = [float(next(g.iter(f"{SVG}line")).get("x1") or 0) for g in _groups(closeup, "marker")]
    assert min(b - a for a, b in itertools.pairwise(xs)) >= 6, xs
    labels = [t.text for g in _groups(closeup, "marker") for t in g.iter(f"{SVG}text")]
    assert labels == ["SIGTERM", "PAUSE  +1 ms", "last ACK  +30 ms", "exit 0  +60 ms"]


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_png_rendering_of_the_recorded_demo(
    recorded: tuple[Timeline, ET.Element, str], tmp_path: Path,
) -> None:
    """Renders the picture as a person sees it. The PNG stays in this test's tmp_path
    (pytest keeps the last three runs: /tmp/pytest-of-$USER/pytest-current/
    test_png_rendering_of_the_reco0/timeline.png); look at it after changing the layout."""
    _, root, svg = recorded
    if shutil.which("rsvg-convert") is None:
        missing("rsvg-convert missing: scripts/setup.d/rsvg.sh installs it")
    source = tmp_path / "timeline.svg"
    source.write_text(svg, encoding="utf-8")
    png = tmp_path / "timeline.png"
    result = subprocess.run(["rsvg-convert", "-o", str(png), str(source)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no unsupported-feature or font warnings
    assert _png_size(png) == (int(root.get("width") or 0), int(root.get("height") or 0))
    assert png.stat().st_size > 50_000  # a real picture, not a blank page
