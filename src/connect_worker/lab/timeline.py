"""A timeline picture of a deploy: one lane per worker process, one bar per step.

:func:`from_simulation` turns a :class:`~connect_worker.lab.simulate.SimulationResult`
(real worker processes on the local gateway) into a :class:`Timeline`;
:func:`render_svg` draws it as one self-contained SVG file (no scripts, no external
fonts or styles; hovering a bar shows its details in browsers that support
``<title>``).

Every lane is one worker process, labelled with its instance id and version. A
bar is one step body run on that worker, from the gateway receiving the worker's
``WORKER_REQUEST_ACK`` to it receiving the reply, coloured by report. Markers on
a lane show when it became READY and, for a worker that was stopped, when it got
SIGTERM, when the gateway read its ``WORKER_PAUSE``, when the gateway
acknowledged its last reply and when the process exited.

A drain usually takes a fraction of a second, so at the scale of the whole deploy
its four markers fall within a few pixels. The main chart therefore names each
drain once ("SIGTERM -> exit 0 (drain 0.1 s) · close-up A") and draws a close-up
of every drain below it: SIGTERM to exit stretched to half the picture, each
marker on its own row with its time after the SIGTERM, over the steps that were
running. A bar too short for its step name carries a key number, listed with the
name under the chart; a step continued from a checkpoint (``-continue-1``) is
joined to the step it continues by a dashed arrow.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from .simulate import SimulationResult

T = TypeVar("T")

# Colour per report (cycled); chosen to stay clear of the marker colours below.
REPORT_COLOURS = (
    "#4e79a7", "#b07aa1", "#59a14f", "#9c755f", "#76b7b2", "#edc948", "#ff9da7", "#8cd17d",
)
# Marker kinds, in the order the legend lists them: (colour, legend text). Plain words
# first, the protocol's term in brackets.
MARKERS: dict[str, tuple[str, str]] = {
    "ready": ("#6b7280", "can take steps (READY)"),
    "sigterm": ("#d62728", "told to stop (SIGTERM)"),
    "pause": ("#f28e2b", "gateway stops sending it steps (WORKER_PAUSE)"),
    "ack": ("#17803d", "gateway has its last result (WORKER_REPLY_ACK or HTTP flush)"),
    "exit": ("#111827", "process exited"),
}
DRAINING = "#fbd9b5"  # the lane's band between SIGTERM and exit
# A text outline in the background's colour, painted under the glyphs.
HALO = 'stroke="{}" stroke-width="3" stroke-linejoin="round" paint-order="stroke"'
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""


@dataclass(frozen=True)
class Lane:
    key: str  # instance id
    title: str  # e.g. "v1-r0"
    subtitle: str  # e.g. "v1 · pid 1234 · 4 steps"
    started: float  # process start (epoch seconds)
    ready: float | None = None  # first READY connection
    ended: float | None = None  # process exit


@dataclass(frozen=True)
class Bar:
    lane: str
    start: float
    end: float
    group: int  # report number, 1-based: picks the colour
    label: str  # e.g. "section-2"
    detail: str = ""  # tooltip
    problem: bool = False  # drawn hatched: no reply, or a repeated step


@dataclass(frozen=True)
class Marker:
    lane: str
    ts: float
    kind: str  # a key of MARKERS, or "done" (a report's final request, in its colour)
    label: str
    group: int = 0
    bad: bool = False  # e.g. a non-zero exit: drawn red


@dataclass(frozen=True)
class Note:
    """A vertical line across every lane, e.g. "rolling deploy v1 -> v2 begins"."""

    ts: float
    label: str


@dataclass
class Timeline:
    title: str
    subtitle: str
    t0: float
    lanes: list[Lane]
    bars: list[Bar] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)
    groups: dict[int, str] = field(default_factory=dict)  # report number -> legend text
    axis_label: str = "seconds since the start"

    def end(self) -> float:
        times = [self.t0 + 1.0]
        for lane in self.lanes:
            times.extend(t for t in (lane.started, lane.ready, lane.ended) if t is not None)
        times.extend(b.end for b in self.bars)
        times.extend(m.ts for m in self.markers)
        times.extend(n.ts for n in self.notes)
        return max(times)


# ----- building a timeline from a simulation --------------------------------------------


def from_simulation(
    result: SimulationResult, *, title: str, subtitle: str = "",
    notes: Sequence[Note] = (), t0: float | None = None,
    axis_label: str = "seconds since the start",
) -> Timeline:
    """Lanes, bars and markers from what the gateway and the workers recorded."""
    workers = result.workers
    start = t0 if t0 is not None else min((w.started_at for w in workers), default=0.0)
    reports = {run_id: i + 1 for i, run_id in enumerate(result.run_ids)}
    conns_of: dict[str, set[str]] = {}
    for conn_id, instance in result.connections.items():
        conns_of.setdefault(instance, set()).add(conn_id)
    instance_of_pid = {w.pid: w.instance_id for w in workers if w.started_at}
    entries = result.timeline
    dispatches = [d for d in result.dispatches if d.get("acked_at") is not None]
    dispatched_to = {d["request_id"]: result.connections.get(d["conn_id"], "?")
                     for d in dispatches}

    # Step executions per (run, worker), to name the step each dispatch ran.
    runs_by_worker: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in result.executions:
        worker = instance_of_pid.get(e["pid"], "?")
        runs_by_worker.setdefault((e["run_id"], worker), []).append(e)
    seen_steps: set[tuple[str, str]] = set()

    bars: list[Bar] = []
    markers: list[Marker] = []
    for d in sorted(dispatches, key=lambda d: d["acked_at"]):
        lane = result.connections.get(d["conn_id"], "?")
        report = reports.get(d["run_id"], 0)
        begin = float(d["acked_at"])
        end = d.get("replied_at")
        candidates = [
            e for e in runs_by_worker.get((d["run_id"], lane), [])
            if begin - 0.25 <= e["ts"] <= (end if end is not None else math.inf) + 0.25
        ]
        if not candidates:
            if end is not None:
                # A request that ran no new step: the report's final (completing) call.
                markers.append(Marker(lane, float(end), "done", f"R{report} done", report))
            continue
        execution = min(candidates, key=lambda e: abs(e["ts"] - begin))
        runs_by_worker[(d["run_id"], lane)].remove(execution)
        step = str(execution["step"])
        repeated = (d["run_id"], step) in seen_steps
        seen_steps.add((d["run_id"], step))
        lost = end is None
        finish = float(end) if end is not None else _lane_end(workers, lane, begin)
        how = "no reply" if lost else f"reply via {d.get('reply_via') or 'ws'}"
        bars.append(Bar(
            lane=lane, start=begin, end=finish, group=report, label=step,
            detail=(f"report {report} {step} on {lane}: {finish - begin:.2f} s, {how}"
                    + (" (REPEATED)" if repeated else "")),
            problem=lost or repeated,
        ))

    lanes: list[Lane] = []
    for w in workers:
        if not w.started_at:
            continue
        conns = conns_of.get(w.instance_id, set())
        ready = _first(e["ts"] for e in entries
                       if e["kind"] == "WORKER_READY" and e["conn_id"] in conns)
        steps = sum(1 for b in bars if b.lane == w.instance_id)
        version = w.app_version or "?"
        lanes.append(Lane(
            key=w.instance_id, title=w.instance_id,
            subtitle=f"{version} · pid {w.pid} · {steps} step{'s' * (steps != 1)}",
            started=w.started_at, ready=ready, ended=w.exited_at,
        ))
        if ready is not None:
            markers.append(Marker(w.instance_id, ready, "ready", "READY"))
        if w.signalled_at is None:
            continue
        markers.append(Marker(w.instance_id, w.signalled_at, "sigterm", "SIGTERM"))
        pause = _first(e["ts"] for e in entries
                       if e["kind"] == "WORKER_PAUSE" and e["conn_id"] in conns
                       and e["ts"] >= w.signalled_at)
        if pause is not None:
            markers.append(Marker(w.instance_id, pause, "pause", "PAUSE"))
        acks = [e["ts"] for e in entries
                if (e["kind"] == "WORKER_REPLY_ACK" and e["conn_id"] in conns)
                or (e["kind"] == "HTTP_FLUSH" and dispatched_to.get(e["request_id"] or "")
                    == w.instance_id)]
        if acks:
            markers.append(Marker(w.instance_id, max(acks), "ack", "last ACK"))
        if w.exited_at is not None:
            drain = w.exited_at - w.signalled_at
            markers.append(Marker(w.instance_id, w.exited_at, "exit",
                                  f"exit {w.returncode} (drain {drain:.1f} s)",
                                  bad=w.returncode != 0))
    groups = {n: f"report {n}" for n in sorted(set(reports.values()))}
    return Timeline(title=title, subtitle=subtitle, t0=start, lanes=lanes, bars=bars,
                    markers=markers, notes=list(notes), groups=groups, axis_label=axis_label)


def _first(values: Iterable[T]) -> T | None:
    return next(iter(values), None)


def _lane_end(workers: Sequence[Any], instance: str, fallback: float) -> float:
    for w in workers:
        if w.instance_id == instance and w.exited_at is not None:
            return float(w.exited_at)
    return fallback + 0.5


# ----- rendering ------------------------------------------------------------------------

LABEL_WIDTH = 190
RIGHT_PAD = 40
BAR_HEIGHT = 34
BAR_GAP = 4
MARK_ROW = 15
LANE_PAD = 8
AXIS_HEIGHT = 34
MIN_WIDTH = 960  # below this the legend and the close-ups get cramped
# Close-ups of each drain: one lane's SIGTERM .. exit stretched to the close-up's width.
CLOSEUP_BAR = 22
CLOSEUP_GAP = 16
CLOSEUP_MIN_SEP = 7.0  # px between two marker lines in a close-up, however close in time
# A bar narrower than this gets its key number drawn beside it instead of inside.
KEY_INSIDE_MIN = 14.0
CONTINUATION = re.compile(r"^(?P<base>.+)-continue-\d+$")


def _text_width(text: str, size: float) -> float:
    return len(text) * size * 0.6


def _nice_step(span: float, px_per_s: float, min_px: float = 60) -> float:
    """A tick interval giving at least ``min_px`` between labelled ticks."""
    for step in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30,
                 60, 120, 300, 600):
        if step * px_per_s >= min_px:
            return float(step)
    return max(span / 10, 1.0)


def _offset(seconds: float) -> str:
    """A time relative to SIGTERM: "+36 ms", "+1.15 s", or a minus sign before it."""
    sign = "+" if seconds >= 0 else "\u2212"
    seconds = abs(seconds)
    if seconds < 1:
        return f"{sign}{seconds * 1000:.0f} ms"
    return f"{sign}{seconds:.2f} s"


def _fit_text(text: str, size: float, room: float) -> str:
    """``text`` cut short with an ellipsis to fit ``room`` pixels ("" if nothing fits)."""
    if _text_width(text, size) <= room:
        return text
    keep = int(room / (size * 0.6)) - 1
    return text[:keep].rstrip() + "\u2026" if keep >= 4 else ""


def _colour(group: int) -> str:
    return REPORT_COLOURS[(group - 1) % len(REPORT_COLOURS)] if group else "#9ca3af"


def _pack(intervals: Sequence[tuple[float, float]], gap: float) -> list[int]:
    """Row index per interval, greedy: the first row whose last interval ended before it."""
    ends: list[float] = []
    rows: list[int] = []
    for start, end in intervals:
        for i, last in enumerate(ends):
            if start >= last + gap:
                ends[i] = end
                rows.append(i)
                break
        else:
            ends.append(end)
            rows.append(len(ends) - 1)
    return rows


def _rows(lane_bars: Sequence[Bar], lane_done: Sequence[Marker]) -> tuple[list[int], list[int]]:
    """Row per bar and per "done" marker: one row per report, in report order (a report's
    steps run one after another, so they share a row); anything overlapping within a
    report's row (a repeated step) gets a row of its own below."""
    groups = sorted({b.group for b in lane_bars} | {m.group for m in lane_done})
    row_of = {g: i for i, g in enumerate(groups)}
    ends: dict[int, float] = {}
    extra: list[float] = []
    bar_rows: list[int] = []
    for bar in lane_bars:
        row = row_of[bar.group]
        if bar.start >= ends.get(row, -math.inf) - 0.01:
            ends[row] = bar.end
            bar_rows.append(row)
            continue
        for i, end in enumerate(extra):
            if bar.start >= end:
                extra[i] = bar.end
                bar_rows.append(len(groups) + i)
                break
        else:
            extra.append(bar.end)
            bar_rows.append(len(groups) + len(extra) - 1)
    return bar_rows, [row_of[m.group] for m in lane_done]


def continuations(bars: Sequence[Bar]) -> list[tuple[Bar, Bar]]:
    """(checkpointed step, its continuation) pairs: ``write-section-1`` stopped at a drain
    and ``write-section-1-continue-1`` of the same report that picked up its checkpoint.
    The continued step is the latest run of the base name that ended before the
    continuation started."""
    links: list[tuple[Bar, Bar]] = []
    for bar in bars:
        match = CONTINUATION.match(bar.label)
        if match is None:
            continue
        earlier = [b for b in bars if b.group == bar.group and b.label == match["base"]
                   and b.end <= bar.start + 0.5]
        if earlier:
            links.append((max(earlier, key=lambda b: b.end), bar))
    return links


@dataclass
class _Drain:
    """One lane's drain, drawn small in the main chart and stretched in a close-up."""

    letter: str
    lane: Lane
    sigterm: float
    end: float
    marks: list[Marker]
    exit: Marker | None

    @property
    def callout(self) -> str:
        outcome = self.exit.label if self.exit is not None else "no exit seen"
        return f"SIGTERM \u2192 {outcome} \u00b7 close-up {self.letter}"


def _drains(tl: Timeline) -> list[_Drain]:
    drains: list[_Drain] = []
    for lane in tl.lanes:
        marks = sorted((m for m in tl.markers if m.lane == lane.key and m.kind != "done"),
                       key=lambda m: m.ts)
        sigterm = _first(m.ts for m in marks if m.kind == "sigterm")
        if sigterm is None:
            continue
        exit_mark = _first(m for m in marks if m.kind == "exit")
        after = [m.ts for m in marks if m.ts >= sigterm]
        end = exit_mark.ts if exit_mark is not None else max(after)
        letter = chr(ord("A") + len(drains) % 26) + ("" if len(drains) < 26 else
                                                       str(len(drains) // 26))
        drains.append(_Drain(letter, lane, sigterm, max(end, sigterm),
                             [m for m in marks if m.ts >= sigterm], exit_mark))
    return drains


def render_svg(tl: Timeline, *, px_per_second: float | None = None) -> str:
    """The timeline as a standalone SVG document.

    Below the main chart: a close-up of every drain (SIGTERM to exit stretched to a
    readable width, each marker on its own row with its time after SIGTERM), and a key
    for the step bars too short to carry their name.
    """
    span = max(tl.end() - tl.t0, 1.0)
    if px_per_second is None:
        durations = sorted(b.end - b.start for b in tl.bars) or [1.0]
        typical = durations[len(durations) // 2]
        # Wide enough that a typical step bar holds a step name like "write-section-4"
        # broken in two (~70 px) ...
        px_per_second = 96 / max(typical, 0.05)
        # ... within a picture of 900-1600 px of plot.
        px_per_second = min(max(px_per_second, 900 / span), max(1600 / span, 20.0))
    plot_w = span * px_per_second
    plot_right = LABEL_WIDTH + plot_w

    def x(ts: float) -> float:
        return LABEL_WIDTH + (ts - tl.t0) * px_per_second

    drains = _drains(tl)
    links = continuations(tl.bars)
    titles = {lane.key: lane.title for lane in tl.lanes}
    right = max(plot_right + RIGHT_PAD, MIN_WIDTH)  # grows to fit text
    out: list[str] = []
    y = 16.0
    out.append(f'<text x="16" y="{y + 14:.1f}" font-size="18" font-weight="bold">'
               f"{escape(tl.title)}</text>")
    right = max(right, 16 + _text_width(tl.title, 18) * 1.05 + 16)
    y += 24
    for line in tl.subtitle.splitlines():
        out.append(f'<text x="16" y="{y + 12:.1f}" font-size="12.5" fill="#374151">'
                   f"{escape(line)}</text>")
        right = max(right, 16 + _text_width(line, 12.5) + 16)
        y += 17
    y += 8
    y = _legend(out, tl, y, right - 16, links=bool(links))
    y += 12

    # Notes (vertical lines across every lane) get their labels above the lanes.
    note_spans = [(x(n.ts), x(n.ts) + _text_width(n.label, 11.5) + 10) for n in tl.notes]
    note_rows = _pack(note_spans, 0)
    right = max([right, *(end + 8 for _, end in note_spans)])
    notes_top = y
    y += (max(note_rows, default=-1) + 1) * MARK_ROW + (6 if tl.notes else 0)
    lanes_top = y

    back: list[str] = []  # lane shading and process lifetimes, under the grid
    separators: list[float] = []
    label_size = 11.0
    placed: dict[int, tuple[float, float, float]] = {}  # id(bar) -> (x, y, width)
    keyed: list[tuple[int, Bar]] = []  # bars too short for their name, with their key
    drain_of = {d.lane.key: d for d in drains}
    for index, lane in enumerate(tl.lanes):
        lane_bars = sorted((b for b in tl.bars if b.lane == lane.key), key=lambda b: b.start)
        lane_marks = sorted((m for m in tl.markers if m.lane == lane.key and m.kind != "done"),
                            key=lambda m: m.ts)
        lane_done = [m for m in tl.markers if m.lane == lane.key and m.kind == "done"]
        drain = drain_of.get(lane.key)
        bar_rows, done_rows = _rows(lane_bars, lane_done)
        # Text above the bars: READY labels, and one callout per drain (its markers fall
        # within a few pixels of each other here; the close-up spells them out).
        texts: list[tuple[float, str, str]] = [
            (m.ts, m.label, MARKERS.get(m.kind, ("#111827", ""))[0])
            for m in lane_marks if drain is None or m.ts < drain.sigterm]
        if drain is not None:
            bad = drain.exit is not None and drain.exit.bad
            texts.append((drain.sigterm, drain.callout,
                          "#d62728" if bad else MARKERS["sigterm"][0]))
        spans = []
        for ts, text, _ in texts:
            width = _text_width(text, label_size) + 12
            start = x(ts) if x(ts) + width <= right else x(ts) - width
            spans.append((start, start + width))
        text_rows = _pack(spans, 0)
        n_mark_rows = max(text_rows, default=-1) + 1
        n_bar_rows = max([0, *(r + 1 for r in bar_rows), *(r + 1 for r in done_rows)]) or 1
        top = y
        marks_y = top + LANE_PAD
        bars_y = marks_y + n_mark_rows * MARK_ROW + 4
        bars_bottom = bars_y + n_bar_rows * (BAR_HEIGHT + BAR_GAP) - BAR_GAP
        bottom = bars_bottom + LANE_PAD
        separators.append(top)
        shade = "#f6f7f9" if index % 2 == 0 else "#ffffff"
        back.append(f'<rect x="0" y="{top:.1f}" width="{{WIDTH}}" height="{bottom - top:.1f}" '
                    f'fill="{shade}"/>')
        mid = (bars_y + bars_bottom) / 2
        out.append(f'<g class="lane" data-lane={quoteattr(lane.key)}>'
                   f'<text x="14" y="{mid - 3:.1f}" font-size="14" font-weight="bold">'
                   f"{escape(lane.title)}</text>"
                   f'<text x="14" y="{mid + 13:.1f}" font-size="11" fill="#4b5563">'
                   f"{escape(lane.subtitle)}</text></g>")
        # The process's life: hatched while starting, a band while it can take work.
        band_y, band_h = bars_y - 3, bars_bottom - bars_y + 6
        ready = lane.ready if lane.ready is not None else lane.ended
        end = lane.ended if lane.ended is not None else tl.t0 + span
        if ready is not None and ready > lane.started:
            back.append(f'<rect x="{x(lane.started):.1f}" y="{band_y:.1f}" '
                        f'width="{x(ready) - x(lane.started):.1f}" height="{band_h:.1f}" '
                        f'fill="url(#starting)" stroke="#d1d5db" stroke-width="0.8"/>')
        alive_from = ready if ready is not None else lane.started
        back.append(f'<rect x="{x(alive_from):.1f}" y="{band_y:.1f}" '
                    f'width="{max(x(end) - x(alive_from), 0):.1f}" height="{band_h:.1f}" '
                    f'fill="#e3e9f2" stroke="#c9d2e0" stroke-width="0.8"/>')
        if drain is not None:
            back.append(f'<rect class="draining" x="{x(drain.sigterm):.1f}" y="{band_y:.1f}" '
                        f'width="{max(x(drain.end) - x(drain.sigterm), 3):.1f}" '
                        f'height="{band_h:.1f}" fill="{DRAINING}"/>')
        for bar, row in zip(lane_bars, bar_rows, strict=True):
            bx, bw = x(bar.start), max(x(bar.end) - x(bar.start), 1.5)
            by = bars_y + row * (BAR_HEIGHT + BAR_GAP)
            placed[id(bar)] = (bx, by, bw)
            svg, needs_key = _bar(bar, bx, by, bw, len(keyed) + 1,
                                  _link_note(bar, links, titles))
            if needs_key:
                keyed.append((len(keyed) + 1, bar))
            out.append(svg)
        for mark, row in zip(lane_done, done_rows, strict=True):
            row_y = bars_y + row * (BAR_HEIGHT + BAR_GAP)
            # The label goes left of the dot when a drain starts right after it.
            crowded = drain is not None and 0 <= drain.sigterm - mark.ts < (
                (_text_width(mark.label, label_size) + 14) / px_per_second)
            out.append(_done(mark, row_y, x, left=crowded))
        out.extend(_marker_line(mark, bars_y - 4, bars_bottom + 3, x) for mark in lane_marks)
        for (ts, text, colour), (start, _), row in zip(texts, spans, text_rows, strict=True):
            ly = marks_y + row * MARK_ROW + 11
            tick = (f'<line x1="{x(ts):.1f}" x2="{x(ts):.1f}" y1="{ly + 3:.1f}" '
                    f'y2="{bars_y - 4:.1f}" stroke="{colour}" stroke-width="1.2"/>')
            out.append(f'<g class="callout">{tick}<text x="{start + 4:.1f}" y="{ly:.1f}" '
                       f'font-size="{label_size}" fill="{colour}" font-weight="bold">'
                       f"{escape(text)}</text></g>")
        y = bottom
    lanes_bottom = y
    separators.append(y)

    for note, row in zip(tl.notes, note_rows, strict=True):
        nx = x(note.ts)
        ny = notes_top + row * MARK_ROW + 11
        out.append(f'<g class="note"><line x1="{nx:.1f}" x2="{nx:.1f}" y1="{ny + 3:.1f}" '
                   f'y2="{lanes_bottom:.1f}" stroke="#6d28d9" stroke-width="1.3" '
                   f'stroke-dasharray="6 4"/><text x="{nx + 4:.1f}" y="{ny:.1f}" '
                   f'font-size="11.5" fill="#6d28d9" font-weight="bold">{escape(note.label)}'
                   "</text></g>")
    for before, after in links:
        if id(before) in placed and id(after) in placed:
            out.append(_link(before, after, placed[id(before)], placed[id(after)], titles))

    grid, ticks, y = _axis(tl, span, px_per_second, x, lanes_top, lanes_bottom)
    width = math.ceil(right)
    tail: list[str] = []
    if drains:
        y = _closeups(tail, tl, drains, links, y + 10, width)
    if keyed:
        y = _key_table(tail, keyed, y + 10, width, titles)
    height = math.ceil(y + 8)
    back = [b.replace("{WIDTH}", str(width)) for b in back]
    back.extend(f'<line x1="0" x2="{width}" y1="{sy:.1f}" y2="{sy:.1f}" stroke="#d1d5db"/>'
                for sy in separators)
    arrows = "".join(
        f'<marker id="arrow-{g}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        f'fill="{_colour(g)}"/></marker>'
        for g in sorted({after.group for _, after in links}))
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {FONT} font-size="12" fill="#111827">',
        f"<title>{escape(tl.title)}</title>",
        "<defs>",
        '<pattern id="starting" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#f3f4f6"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#d1d5db" stroke-width="2"/></pattern>',
        '<pattern id="problem" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#d62728" '
        'stroke-width="3"/></pattern>',
        arrows,
        "</defs>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    return "\n".join([*head, *back, *grid, *out, *ticks, *tail, "</svg>"]) + "\n"


def _legend(out: list[str], tl: Timeline, y: float, max_right: float, *,
            links: bool) -> float:
    """Report colours, then what bars, markers and bands mean, in plain words with the
    protocol term in brackets; items wrap onto new rows. Returns the y below."""
    items: list[tuple[str, str]] = []  # (swatch kind/colour, text)
    for number, text in tl.groups.items():
        items.append((f"report:{_colour(number)}", text))
    items.append(("bar", "bar = one step of a report, from the worker accepting it "
                         "(ACK) until the gateway has its result"))
    items.append(("dot", "\u25cf = the report's final request (report done)"))
    items.extend((f"line:{colour}", text) for colour, text in MARKERS.values())
    items.append(("fill:url(#starting)", "starting up"))
    items.append((f"fill:{DRAINING}", "draining: finishing its steps, taking no new ones"))
    if links:
        items.append(("link", "a step stopped at a drain, continued from its checkpoint "
                              "on the new version (-continue-1)"))
    if any(b.problem for b in tl.bars):
        items.append(("fill:url(#problem)", "problem: no reply, or the step ran twice"))
    x0 = 16.0
    cursor = x0
    for kind, text in items:
        width = 32 + _text_width(text, 12) + 20
        if cursor > x0 and cursor + width > max_right:
            cursor = x0
            y += 21
        swatch, _, value = kind.partition(":")
        if swatch == "report":
            out.append(f'<rect x="{cursor:.1f}" y="{y:.1f}" width="26" height="14" rx="3" '
                       f'fill="{value}"/>')
        elif swatch == "bar":
            out.append(f'<rect x="{cursor:.1f}" y="{y:.1f}" width="26" height="14" rx="3" '
                       'fill="#9ca3af"/>')
        elif swatch == "dot":
            width -= 32
            cursor -= 32
        elif swatch == "line":
            out.append(f'<line x1="{cursor + 13:.1f}" x2="{cursor + 13:.1f}" y1="{y:.1f}" '
                       f'y2="{y + 14:.1f}" stroke="{value}" stroke-width="2.5"/>')
        elif swatch == "fill":
            out.append(f'<rect x="{cursor:.1f}" y="{y:.1f}" width="26" height="14" '
                       f'fill="{value}" stroke="#d1d5db"/>')
        elif swatch == "link":
            out.append(f'<path d="M{cursor:.1f},{y + 11:.1f} C{cursor + 13:.1f},{y + 11:.1f} '
                       f'{cursor + 13:.1f},{y + 3:.1f} {cursor + 26:.1f},{y + 3:.1f}" '
                       'fill="none" stroke="#4b5563" stroke-width="1.8" '
                       'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{cursor + 32:.1f}" y="{y + 11:.1f}" font-size="12">'
                   f"{escape(text)}</text>")
        cursor += width
    return y + 20


def _link_note(bar: Bar, links: Sequence[tuple[Bar, Bar]], titles: dict[str, str]) -> str:
    for before, after in links:
        if after is bar:
            where = titles.get(before.lane, before.lane)
            return f"; continues {before.label}, checkpointed on {where} at its drain"
        if before is bar:
            where = titles.get(after.lane, after.lane)
            return f"; stopped at the drain, continued on {where} as {after.label}"
    return ""


def _bar(bar: Bar, bx: float, by: float, bw: float, key: int, note: str) -> tuple[str, bool]:
    """One step bar; returns (svg, whether it is shown by ``key`` instead of its name)."""
    parts = [f'<g class="step" data-lane={quoteattr(bar.lane)}>'
             f"<title>{escape((bar.detail or bar.label) + note)}</title>",
             f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{BAR_HEIGHT}" rx="3" '
             f'fill="{_colour(bar.group)}" stroke="#1f2937" stroke-opacity="0.35"/>']
    if bar.problem:
        parts.append(f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{BAR_HEIGHT}" '
                     'rx="3" fill="url(#problem)" stroke="#d62728" stroke-width="2"/>')
    fitted = _fit_label(f"R{bar.group}" if bar.group else "", bar.label, bw - 6)
    keyed = fitted is None or fitted[1][-1].endswith("\u2026")
    if fitted is not None and not keyed:
        size, lines, tagged = fitted
        cx = bx + bw / 2
        step = size + 2.5
        first = by + BAR_HEIGHT / 2 - step * (len(lines) - 1) / 2 + size * 0.36
        for index, line in enumerate(lines):
            bold = ' font-weight="bold"' if tagged and index == 0 else ""
            parts.append(f'<text x="{cx:.1f}" y="{first + index * step:.1f}" '
                         f'font-size="{size}" text-anchor="middle" fill="#ffffff"{bold}>'
                         f"{escape(line)}</text>")
    elif keyed:
        # Too short for its name: a key number, listed under the chart with the name.
        inside = bw >= max(KEY_INSIDE_MIN, _text_width(str(key), 10.5) + 4)
        kx = bx + bw / 2 if inside else bx + bw + 2
        anchor = "middle" if inside else "start"
        fill = "#ffffff" if inside else "#111827"
        parts.append(f'<text class="key" x="{kx:.1f}" y="{by + BAR_HEIGHT / 2 + 4:.1f}" '
                     f'font-size="10.5" font-weight="bold" text-anchor="{anchor}" '
                     f'fill="{fill}">{key}</text>')
    parts.append("</g>")
    return "".join(parts), keyed


def _split(label: str, lines: int) -> list[str] | None:
    """``label`` cut at hyphens into ``lines`` lines of the most even length (None if it
    has too few hyphens)."""
    words = label.split("-")
    if len(words) < lines:
        return None
    best: list[str] | None = None
    for cuts in itertools.combinations(range(1, len(words)), lines - 1):
        bounds = (0, *cuts, len(words))
        parts = ["-".join(words[a:b]) + ("-" if b < len(words) else "")
                 for a, b in itertools.pairwise(bounds)]
        if best is None or max(map(len, parts)) < max(map(len, best)):
            best = parts
    return best


def _fit_label(tag: str, label: str, room: float) -> tuple[float, list[str], bool] | None:
    """The largest way to write a bar's report tag (e.g. "R1") and step name in ``room``
    pixels: (font size, lines, whether the first line is the tag), or None if even a
    shortened name does not fit. Long step names are broken at hyphens; as a last
    resort the name is cut short with an ellipsis (the tooltip has it whole)."""
    options: list[tuple[float, list[str], bool]] = []
    for size in (11.0, 9.5):
        if tag:
            options.append((size, [tag, label], True))
        options.extend((size, parts, False)
                       for parts in (_split(label, 2), _split(label, 3) if size < 11 else None)
                       if parts is not None)
    for size, lines, tagged in options:
        if max(_text_width(line, size) for line in lines) <= room:
            return size, lines, tagged
    size = 9.5
    for keep in range(len(label) - 1, 2, -1):
        short = label[:keep].rstrip("-") + "\u2026"
        if _text_width(short, size) <= room:
            return size, [short], False
    return None


def _link(before: Bar, after: Bar, a: tuple[float, float, float],
          b: tuple[float, float, float], titles: dict[str, str]) -> str:
    """A dashed arrow from a checkpointed step's end to the start of its continuation."""
    x1, y1 = a[0] + a[2], a[1] + BAR_HEIGHT / 2
    x2, y2 = b[0], b[1] + BAR_HEIGHT / 2
    bow = max(40.0, abs(x2 - x1) / 2)
    colour = _colour(after.group)
    return (f'<g class="continuation" data-from={quoteattr(before.lane)} '
            f'data-to={quoteattr(after.lane)}><title>{escape(after.label)} continues '
            f'{escape(before.label)} from {escape(titles.get(before.lane, before.lane))}'
            "</title>"
            f'<path d="M{x1:.1f},{y1:.1f} C{x1 + bow:.1f},{y1:.1f} {x2 - bow:.1f},{y2:.1f} '
            f'{x2:.1f},{y2:.1f}" fill="none" stroke="{colour}" stroke-width="2.2" '
            f'stroke-dasharray="6 4" marker-end="url(#arrow-{after.group})"/>'
            f'<circle cx="{x1:.1f}" cy="{y1:.1f}" r="3" fill="{colour}" stroke="#ffffff"/></g>')


def _done(mark: Marker, row_y: float, x: Any, *, left: bool = False) -> str:
    colour = _colour(mark.group) if mark.group else "#6b7280"
    mx, cy = x(mark.ts), row_y + BAR_HEIGHT / 2
    tx, anchor = (mx - 9, "end") if left else (mx + 9, "start")
    return (f'<g class="marker marker-done" data-lane={quoteattr(mark.lane)}>'
            f"<title>{escape(mark.label)}</title>"
            f'<circle cx="{mx:.1f}" cy="{cy:.1f}" r="5.5" fill="{colour}" stroke="#ffffff" '
            f'stroke-width="1.5"/><text x="{tx:.1f}" y="{cy + 4:.1f}" font-size="11" '
            f'fill="{colour}" font-weight="bold" text-anchor="{anchor}">'
            f"{escape(mark.label)}</text></g>")


def _marker_style(mark: Marker) -> tuple[str, float, str]:
    colour = MARKERS.get(mark.kind, ("#111827", ""))[0]
    if mark.bad:
        colour = "#d62728"
    width = 2.5 if mark.kind != "ready" else 1.5
    dash = ' stroke-dasharray="4 3"' if mark.kind == "ready" else ""
    return colour, width, dash


def _marker_line(mark: Marker, top: float, bottom: float, x: Any) -> str:
    """A marker in the main chart: a line (its name is in the tooltip and the legend)."""
    mx = x(mark.ts)
    colour, width, dash = _marker_style(mark)
    return (f'<g class="marker marker-{escape(mark.kind)}" data-lane={quoteattr(mark.lane)}>'
            f"<title>{escape(mark.label)}</title>"
            f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{top:.1f}" y2="{bottom:.1f}" '
            f'stroke="{colour}" stroke-width="{width}"{dash}/></g>')


def _axis(tl: Timeline, span: float, px_per_second: float, x: Any, top: float,
          bottom: float) -> tuple[list[str], list[str], float]:
    """Grid lines (drawn under the bars) and the labelled axis below the lanes."""
    step = _nice_step(span, px_per_second)
    grid: list[str] = []
    ticks: list[str] = []
    n = 0
    while n * step <= span + 1e-9:
        t = n * step
        tx = x(tl.t0 + t)
        grid.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top:.1f}" y2="{bottom:.1f}" '
                    'stroke="#d9dde3" stroke-width="1"/>')
        ticks.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{bottom:.1f}" '
                     f'y2="{bottom + 5:.1f}" stroke="#6b7280"/>')
        label = f"{t:.1f} s" if step < 1 else f"{t:.0f} s"
        ticks.append(f'<text x="{tx:.1f}" y="{bottom + 18:.1f}" font-size="11" '
                     f'text-anchor="middle" fill="#4b5563">{label}</text>')
        n += 1
    ticks.append(f'<text x="{LABEL_WIDTH + 4:.1f}" y="{bottom + 34:.1f}" font-size="11" '
                 f'fill="#4b5563">{escape(tl.axis_label)}</text>')
    return grid, ticks, bottom + AXIS_HEIGHT + 8


def _closeups(out: list[str], tl: Timeline, drains: Sequence[_Drain],
              links: Sequence[tuple[Bar, Bar]], y: float, width: int) -> float:
    """Every drain stretched to half the picture's width, in a grid of two columns."""
    out.append(f'<text x="16" y="{y + 14:.1f}" font-size="14" font-weight="bold">'
               "Drains, close up</text>")
    out.append(f'<text x="16" y="{y + 31:.1f}" font-size="12" fill="#4b5563">'
               "Each drain from its SIGTERM to the process exit, stretched so that every "
               "event is apart; times are after the SIGTERM.</text>")
    y += 44
    columns = 2 if width >= 900 else 1
    col_w = (width - 32 - CLOSEUP_GAP * (columns - 1)) / columns
    for start in range(0, len(drains), columns):
        heights = []
        for col, drain in enumerate(drains[start:start + columns]):
            left = 16 + col * (col_w + CLOSEUP_GAP)
            heights.append(_closeup(out, tl, drain, links, left, y, col_w))
        y += max(heights) + CLOSEUP_GAP
    return y


def _closeup(out: list[str], tl: Timeline, drain: _Drain, links: Sequence[tuple[Bar, Bar]],
             left: float, top: float, width: float) -> float:
    """One drain: its markers, each on its own row, over the steps it was running.
    Returns the height used."""
    lane, s = drain.lane, drain.sigterm
    titles = {lane.key: lane.title for lane in tl.lanes}
    pad = max((drain.end - s) * 0.08, 0.004)
    lo, hi = s - pad, drain.end + pad
    inner_l, inner_r = left + 12, left + width - 12
    scale = (inner_r - inner_l) / (hi - lo)

    def xi(ts: float) -> float:
        return inner_l + (min(max(ts, lo), hi) - lo) * scale

    parts: list[str] = [f'<g class="closeup" data-lane={quoteattr(lane.key)}>']
    title = f"{drain.letter}  {lane.title}: SIGTERM at {s - tl.t0:.2f} s"
    if drain.exit is not None:
        title += (f", {drain.exit.label.split(' (')[0]} after {drain.exit.ts - s:.2f} s "
                  "of draining")
    parts.append(f'<text x="{left + 6:.1f}" y="{top + 16:.1f}" font-size="12.5" '
                 f'font-weight="bold">{escape(title)}</text>')
    y = top + 24
    marks_top = y
    bars = sorted((b for b in tl.bars if b.lane == lane.key and b.end >= lo and b.start <= hi),
                  key=lambda b: b.start)
    rows_top = marks_top + len(drain.marks) * MARK_ROW + 6
    rows_bottom = rows_top + max(len(bars), 1) * (CLOSEUP_BAR + 4)
    # The worker's band, draining from SIGTERM on.
    parts.append(f'<rect x="{inner_l:.1f}" y="{rows_top - 3:.1f}" '
                 f'width="{inner_r - inner_l:.1f}" height="{rows_bottom - rows_top + 2:.1f}" '
                 'fill="#e3e9f2"/>')
    parts.append(f'<rect class="draining" x="{xi(s):.1f}" y="{rows_top - 3:.1f}" '
                 f'width="{max(xi(drain.end) - xi(s), 2):.1f}" '
                 f'height="{rows_bottom - rows_top + 2:.1f}" fill="{DRAINING}"/>')
    texts: list[str] = []
    for index, bar in enumerate(bars):
        by = rows_top + index * (CLOSEUP_BAR + 4)
        bx, bx2 = xi(bar.start), xi(bar.end)
        bw = max(bx2 - bx, 2.0)
        text = f"R{bar.group} {bar.label}" if bar.group else bar.label
        if bar.start < lo:
            text = f"\u25c0 {text}"  # began before the close-up's window
        outcome = ""
        for before, after in links:
            if before is bar:
                outcome = ("checkpointed at the drain, continued on "
                           f"{titles.get(after.lane, after.lane)}")
            elif after is bar:
                outcome = f"continues {before.label} from {titles.get(before.lane, before.lane)}"
        if not outcome and bar.end <= hi:
            outcome = f"result {_offset(bar.end - s)}"
        text = f"{text}: {outcome}" if outcome else text
        parts.append(f'<g class="closeup-step" data-lane={quoteattr(bar.lane)}>'
                     f"<title>{escape((bar.detail or bar.label) + _link_note(bar, links, titles))}"
                     "</title>"
                     f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" '
                     f'height="{CLOSEUP_BAR}" rx="3" fill="{_colour(bar.group)}"/></g>')
        # Inside the bar if it fits, else after its end, else whichever side has more room.
        inside, after_end = bw - 12, inner_r - bx2 - 8
        if _text_width(text, 11) <= inside or inside >= after_end:
            tx, fill, halo, text = bx + 6, "#ffffff", _colour(bar.group), _fit_text(
                text, 11, inside)
        else:
            tx, fill, halo, text = bx2 + 4, "#111827", DRAINING, _fit_text(text, 11, after_end)
        # Drawn after the marker lines, with a halo, so a line never cuts through words.
        texts.append(f'<text x="{tx:.1f}" y="{by + CLOSEUP_BAR / 2 + 4:.1f}" font-size="11" '
                     f'fill="{fill}" {HALO.format(halo)}>{escape(text)}</text>')
    if not bars:
        parts.append(f'<text x="{xi(s) + 6:.1f}" y="{rows_top + 15:.1f}" font-size="11" '
                     'fill="#4b5563" font-style="italic">no step was running</text>')
    for row, (mark, mx) in enumerate(zip(drain.marks, _spread([xi(m.ts) for m in drain.marks],
                                                             CLOSEUP_MIN_SEP, inner_r),
                                         strict=True)):
        colour, stroke, dash = _marker_style(mark)
        # The exit marker's own "(drain 1.2 s)" would repeat the offset.
        name = mark.label.split(" (")[0] if mark.kind == "exit" else mark.label
        label = name if mark.kind == "sigterm" else f"{name}  {_offset(mark.ts - s)}"
        ly = marks_top + row * MARK_ROW + 11
        tw = _text_width(label, 11)
        tx, anchor = (mx + 4, "start") if mx + 4 + tw <= inner_r else (mx - 4, "end")
        parts.append(f'<g class="marker marker-{escape(mark.kind)}" '
                     f'data-lane={quoteattr(mark.lane)}><title>{escape(mark.label)}</title>'
                     f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{ly - 9:.1f}" '
                     f'y2="{rows_bottom:.1f}" stroke="{colour}" stroke-width="{stroke}"{dash}/>'
                     f'<text x="{tx:.1f}" y="{ly:.1f}" font-size="11" fill="{colour}" '
                     f'font-weight="bold" text-anchor="{anchor}" {HALO.format("#ffffff")}>'
                     f"{escape(label)}</text></g>")
    parts.extend(texts)
    # Axis: time after SIGTERM.
    axis_y = rows_bottom + 2
    step = _nice_step(hi - lo, scale, min_px=70)
    parts.append(f'<line x1="{inner_l:.1f}" x2="{inner_r:.1f}" y1="{axis_y:.1f}" '
                 f'y2="{axis_y:.1f}" stroke="#9ca3af"/>')
    n = math.ceil(-pad / step)
    while s + n * step <= hi + 1e-12:
        tx = xi(s + n * step)
        label = "SIGTERM" if n == 0 else (f"{n * step * 1000:+.0f} ms" if step < 1
                                          else f"{n * step:+.0f} s")
        if tx + _text_width(label, 10.5) / 2 > left + width - 2:
            break  # its label would stick out of the close-up's frame
        parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{axis_y:.1f}" '
                     f'y2="{axis_y + 4:.1f}" stroke="#6b7280"/><text x="{tx:.1f}" '
                     f'y="{axis_y + 16:.1f}" font-size="10.5" text-anchor="middle" '
                     f'fill="#4b5563">{label}</text>')
        n += 1
    height = axis_y + 22 - top
    parts.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" '
                 f'height="{height:.1f}" fill="none" stroke="#d1d5db" rx="4"/></g>')
    out.extend(parts)
    return height


def _spread(xs: Sequence[float], gap: float, limit: float) -> list[float]:
    """Sorted positions nudged apart to at least ``gap`` (and kept left of ``limit``):
    events a millisecond apart stay distinguishable; their labels carry the exact time."""
    spread = list(xs)
    for i in range(1, len(spread)):
        spread[i] = max(spread[i], spread[i - 1] + gap)
    if spread:
        spread[-1] = min(spread[-1], limit)
    for i in range(len(spread) - 2, -1, -1):
        spread[i] = min(spread[i], spread[i + 1] - gap)
    return spread


def _key_table(out: list[str], keyed: Sequence[tuple[int, Bar]], y: float,
               width: int, titles: dict[str, str]) -> float:
    """The names of the bars too short to carry them, by key number, in columns."""
    out.append(f'<text x="16" y="{y + 14:.1f}" font-size="14" font-weight="bold">'
               "Steps too short to name in the chart</text>")
    y += 24
    entries = []
    for key, bar in keyed:
        tag = f"R{bar.group} " if bar.group else ""
        entries.append((key, bar, f"{tag}{bar.label} on {titles.get(bar.lane, bar.lane)}, "
                                  f"{bar.end - bar.start:.2f} s"))
    col_w = max(_text_width(text, 11.5) for _, _, text in entries) + 48
    columns = max(1, min(len(entries), int((width - 32) // col_w)))
    per_column = math.ceil(len(entries) / columns)
    for index, (key, bar, text) in enumerate(entries):
        cx = 16 + (index // per_column) * col_w
        cy = y + (index % per_column) * 18
        out.append(f'<g class="key-entry" data-key="{key}"><rect x="{cx:.1f}" y="{cy:.1f}" '
                   f'width="22" height="14" rx="3" fill="{_colour(bar.group)}"/>'
                   f'<text x="{cx + 11:.1f}" y="{cy + 11:.1f}" font-size="10.5" '
                   f'font-weight="bold" fill="#ffffff" text-anchor="middle">{key}</text>'
                   f'<text x="{cx + 28:.1f}" y="{cy + 11:.1f}" font-size="11.5">'
                   f"{escape(text)}</text></g>")
    return y + per_column * 18
