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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from .simulate import SimulationResult

# Colour per report (cycled); chosen to stay clear of the marker colours below.
REPORT_COLOURS = (
    "#4e79a7", "#b07aa1", "#59a14f", "#9c755f", "#76b7b2", "#edc948", "#ff9da7", "#8cd17d",
)
# Marker kinds, in the order the legend lists them: (colour, legend text).
MARKERS: dict[str, tuple[str, str]] = {
    "ready": ("#6b7280", "READY (gateway may route steps to it)"),
    "sigterm": ("#d62728", "SIGTERM"),
    "pause": ("#f28e2b", "WORKER_PAUSE read by the gateway"),
    "ack": ("#17803d", "last WORKER_REPLY_ACK (or flush)"),
    "exit": ("#111827", "process exit"),
}
DRAINING = "#fbd9b5"  # the lane's band between SIGTERM and exit
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
                    markers=markers, notes=list(notes), groups=groups)


def _first(values: Iterable[float]) -> float | None:
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


def _text_width(text: str, size: float) -> float:
    return len(text) * size * 0.6


def _nice_step(span: float, px_per_s: float) -> float:
    """A tick interval giving at least ~60 px between labelled ticks."""
    for step in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600):
        if step * px_per_s >= 60:
            return float(step)
    return max(span / 10, 1.0)


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


def render_svg(tl: Timeline, *, px_per_second: float | None = None) -> str:
    """The timeline as a standalone SVG document."""
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

    def x(ts: float) -> float:
        return LABEL_WIDTH + (ts - tl.t0) * px_per_second

    right = LABEL_WIDTH + plot_w + RIGHT_PAD  # grows to fit labels
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
    y, legend_right = _legend(out, tl, y)
    right = max(right, legend_right + 16)
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
    for index, lane in enumerate(tl.lanes):
        lane_bars = sorted((b for b in tl.bars if b.lane == lane.key), key=lambda b: b.start)
        lane_marks = sorted((m for m in tl.markers if m.lane == lane.key and m.kind != "done"),
                            key=lambda m: m.ts)
        lane_done = [m for m in tl.markers if m.lane == lane.key and m.kind == "done"]
        bar_rows, done_rows = _rows(lane_bars, lane_done)
        spans = [(x(m.ts), x(m.ts) + _text_width(m.label, label_size) + 12) for m in lane_marks]
        mark_rows = _pack(spans, 0)
        right = max([right, *(end + 8 for _, end in spans)])
        n_mark_rows = max(mark_rows, default=-1) + 1
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
        sigterm = _first(m.ts for m in lane_marks if m.kind == "sigterm")
        if sigterm is not None:
            drain_end = _first(m.ts for m in lane_marks if m.kind == "exit") or end
            back.append(f'<rect class="draining" x="{x(sigterm):.1f}" y="{band_y:.1f}" '
                        f'width="{max(x(drain_end) - x(sigterm), 1):.1f}" '
                        f'height="{band_h:.1f}" fill="{DRAINING}"/>')
        for bar, row in zip(lane_bars, bar_rows, strict=True):
            out.append(_bar(bar, row, bars_y, x))
        for mark, row in zip(lane_done, done_rows, strict=True):
            out.append(_done(mark, bars_y + row * (BAR_HEIGHT + BAR_GAP), x))
            right = max(right, x(mark.ts) + 10 + _text_width(mark.label, label_size) + 8)
        for mark, row in zip(lane_marks, mark_rows, strict=True):
            out.append(_marker(mark, row, marks_y, bars_bottom + 3, x, label_size))
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

    grid, ticks, y = _axis(tl, span, px_per_second, x, lanes_top, lanes_bottom)
    width = math.ceil(right)
    height = math.ceil(y + 8)
    back = [b.replace("{WIDTH}", str(width)) for b in back]
    back.extend(f'<line x1="0" x2="{width}" y1="{sy:.1f}" y2="{sy:.1f}" stroke="#d1d5db"/>'
                for sy in separators)
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
        "</defs>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    return "\n".join([*head, *back, *grid, *out, *ticks, "</svg>"]) + "\n"


def _legend(out: list[str], tl: Timeline, y: float) -> tuple[float, float]:
    """Report colours on one line, marker kinds on the next; returns (y below, right edge)."""
    x0 = 16.0
    cursor = x0
    for number, text in tl.groups.items():
        colour = REPORT_COLOURS[(number - 1) % len(REPORT_COLOURS)]
        out.append(f'<rect x="{cursor:.1f}" y="{y:.1f}" width="26" height="14" rx="3" '
                   f'fill="{colour}"/>')
        out.append(f'<text x="{cursor + 32:.1f}" y="{y + 11:.1f}" font-size="12">'
                   f"{escape(text)}</text>")
        cursor += 32 + _text_width(text, 12) + 18
    explain = ("bar = one step body run, from the worker's ACK of the request to the gateway "
               "receiving the reply; dot = the report's final request")
    out.append(f'<text x="{cursor:.1f}" y="{y + 11:.1f}" font-size="12" fill="#4b5563">'
               f"{escape(explain)}</text>")
    right = cursor + _text_width(explain, 12)
    y += 21
    cursor = x0
    for colour, text in MARKERS.values():
        out.append(f'<line x1="{cursor + 4:.1f}" x2="{cursor + 4:.1f}" y1="{y:.1f}" '
                   f'y2="{y + 14:.1f}" stroke="{colour}" stroke-width="2.5"/>')
        out.append(f'<text x="{cursor + 11:.1f}" y="{y + 11:.1f}" font-size="12">'
                   f"{escape(text)}</text>")
        cursor += 11 + _text_width(text, 12) + 22
    for fill, text in (("url(#starting)", "starting"), (DRAINING, "draining")):
        out.append(f'<rect x="{cursor:.1f}" y="{y:.1f}" width="26" height="14" '
                   f'fill="{fill}" stroke="#d1d5db"/>')
        out.append(f'<text x="{cursor + 32:.1f}" y="{y + 11:.1f}" font-size="12">'
                   f"{text}</text>")
        cursor += 32 + _text_width(text, 12) + 22
    right = max(right, cursor)
    return y + 20, right


def _bar(bar: Bar, row: int, bars_y: float, x: Any) -> str:
    colour = REPORT_COLOURS[(bar.group - 1) % len(REPORT_COLOURS)] if bar.group else "#9ca3af"
    bx, bw = x(bar.start), max(x(bar.end) - x(bar.start), 1.5)
    by = bars_y + row * (BAR_HEIGHT + BAR_GAP)
    parts = [f'<g class="step" data-lane={quoteattr(bar.lane)}>'
             f"<title>{escape(bar.detail or bar.label)}</title>",
             f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{BAR_HEIGHT}" rx="3" '
             f'fill="{colour}" stroke="#1f2937" stroke-opacity="0.35"/>']
    if bar.problem:
        parts.append(f'<rect x="{bx:.1f}" y="{by:.1f}" width="{bw:.1f}" height="{BAR_HEIGHT}" '
                     'rx="3" fill="url(#problem)" stroke="#d62728" stroke-width="2"/>')
    fitted = _fit_label(f"R{bar.group}" if bar.group else "", bar.label, bw - 6)
    if fitted is not None:
        size, lines, tagged = fitted
        cx = bx + bw / 2
        step = size + 2.5
        first = by + BAR_HEIGHT / 2 - step * (len(lines) - 1) / 2 + size * 0.36
        for index, line in enumerate(lines):
            bold = ' font-weight="bold"' if tagged and index == 0 else ""
            parts.append(f'<text x="{cx:.1f}" y="{first + index * step:.1f}" '
                         f'font-size="{size}" text-anchor="middle" fill="#ffffff"{bold}>'
                         f"{escape(line)}</text>")
    parts.append("</g>")
    return "".join(parts)


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


def _done(mark: Marker, row_y: float, x: Any) -> str:
    colour = REPORT_COLOURS[(mark.group - 1) % len(REPORT_COLOURS)] if mark.group else "#6b7280"
    mx, cy = x(mark.ts), row_y + BAR_HEIGHT / 2
    return (f'<g class="marker marker-done" data-lane={quoteattr(mark.lane)}>'
            f"<title>{escape(mark.label)}</title>"
            f'<circle cx="{mx:.1f}" cy="{cy:.1f}" r="5.5" fill="{colour}" stroke="#ffffff" '
            f'stroke-width="1.5"/><text x="{mx + 9:.1f}" y="{cy + 4:.1f}" font-size="11" '
            f'fill="{colour}" font-weight="bold">{escape(mark.label)}</text></g>')


def _marker(mark: Marker, row: int, marks_y: float, line_bottom: float, x: Any,
            size: float) -> str:
    mx = x(mark.ts)
    ly = marks_y + row * MARK_ROW + 11
    colour = MARKERS.get(mark.kind, ("#111827", ""))[0]
    if mark.bad:
        colour = "#d62728"
    width = 2.5 if mark.kind != "ready" else 1.5
    dash = ' stroke-dasharray="4 3"' if mark.kind == "ready" else ""
    return (f'<g class="marker marker-{escape(mark.kind)}" data-lane={quoteattr(mark.lane)}>'
            f"<title>{escape(mark.label)}</title>"
            f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{ly + 3:.1f}" y2="{line_bottom:.1f}" '
            f'stroke="{colour}" stroke-width="{width}"{dash}/>'
            f'<text x="{mx + 4:.1f}" y="{ly:.1f}" font-size="{size}" fill="{colour}" '
            f'font-weight="bold">{escape(mark.label)}</text></g>')


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
                 'fill="#4b5563">time since the demo started</text>')
    return grid, ticks, bottom + AXIS_HEIGHT + 8
