"""``connect-worker send | runs | workers | fault``: talk to a running dev gateway
(``connect-worker dev``) over its HTTP API, for developing functions by hand.

Output is for people: local clock times, durations, step names (not hashes), the
worker that ran each step. ``send`` prints only the run IDs on stdout, so
``RUN=$(connect-worker send ...)`` works in scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import httpx

from .config import DEV_API_URL

EXIT_FAILED = 1
EXIT_USAGE = 2


class GatewayError(Exception):
    """The dev gateway is unreachable or refused the command; the message is one line."""


def default_url() -> str:
    """``INNGEST_DEV`` when it is a URL (as the worker reads it), else the dev default."""
    dev = os.environ.get("INNGEST_DEV", "")
    return dev.rstrip("/") if dev.startswith(("http://", "https://")) else DEV_API_URL


def add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, metavar="URL",
                        help=f"dev gateway API (default: INNGEST_DEV if a URL, else {DEV_API_URL})")


def _request(url: str, method: str, path: str, body: Any = None) -> Any:
    try:
        response = httpx.request(method, url + path, json=body, timeout=10)
    except httpx.HTTPError as exc:
        raise GatewayError(f"no dev gateway at {url} ({exc.__class__.__name__}); start one "
                           "with `connect-worker dev` or pass --url") from None
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if response.status_code >= 400:
        detail = payload.get("error") if isinstance(payload, dict) else response.text.strip()
        raise GatewayError(f"{method} {path}: {response.status_code} {detail}")
    return payload


# -- formatting ------------------------------------------------------------------


def clock(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def secs(value: float | None) -> str:
    if value is None:
        return ""
    if value < 10:
        return f"{value:.2f} s"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _worker(item: dict[str, Any]) -> str:
    worker = item.get("worker") or "-"
    version = item.get("app_version")
    return f"{worker} ({version})" if version else worker


def _reply(via: str | None) -> str:
    names = {"ws": "socket", "flush": "HTTP flush", "checkpoint": "HTTP checkpoint"}
    return ", then ".join(names.get(v, v) for v in (via or "").split("+") if v)


def _step_notes(step: dict[str, Any]) -> list[str]:
    """Lines under a step's row: earlier attempts and why they ended, and anything odd."""
    notes = [f"attempt {e['attempt']} on {e['worker'] or '-'}: {e['error']}"
             for e in step["errors"]]
    if step["status"] == "failed" and step["error"]:
        notes.append(f"error: {step['error']}")
    if step.get("note"):
        notes.append(step["note"])
    if len(step.get("copies") or []) > 1:
        notes.append("sent to several workers at once: " + ", ".join(step["copies"]))
    return notes


def format_run(run: dict[str, Any], now: float, *, requests: bool = False) -> list[str]:
    took = secs(run["duration"]) + ("" if run["ended_at"] else " so far")
    lines = [f"{clock(run['started_at'])}  {run['function']}  {run['status']}  {took}  "
             f"run {run['run_id']}  (event {run['event']['name']})"]
    rows = [["step", "status", "attempts", "worker", "started", "took", "reply"]]
    notes: dict[int, list[str]] = {}
    for step in run["steps"]:
        took = secs(step["duration"])
        if step["status"] == "running" and step["started_at"]:
            took = secs(now - step["started_at"]) + " so far"
        rows.append([step["name"], step["status"], str(step["attempts"] or "-"), _worker(step),
                     clock(step["started_at"]), took, _reply(step["reply_via"])])
        notes[len(rows) - 1] = _step_notes(step)
    for req in run["running"]:
        rows.append(["(next step)", "running", str(req["attempt"]), _worker(req),
                     clock(req["sent_at"]), secs(now - req["sent_at"]) + " so far", ""])
        notes[len(rows) - 1] = [req["note"]] if req.get("note") else []
    if len(rows) > 1:
        table = _table(rows, "    ")
        lines.append(table[0])
        for index, line in enumerate(table[1:], start=1):
            lines.append(line)
            lines.extend(f"      {note}" for note in notes.get(index, []))
    if run["error"]:
        lines.append(f"    error: {run['error']}")
    elif run["status"] == "completed":
        lines.append(f"    output: {json.dumps(run['output'])}")
    if requests and run["requests"]:
        lines.append("    requests:")
        req_rows = [["sent", "step", "attempt", "worker", "acked", "replied", "via", "result"]]
        for req in run["requests"]:
            names = ", ".join(str(o["name"] or o["op"]) for o in req["ops"]) or (
                "(return)" if req["result"] == "function returned" else "(next step)")
            req_rows.append([clock(req["sent_at"]), names, str(req["attempt"]), _worker(req),
                             clock(req["acked_at"]), clock(req["replied_at"]),
                             _reply(req["reply_via"]), req["result"] or ""])
        lines.extend(_table(req_rows, "      "))
    return lines


def format_runs(runs: list[dict[str, Any]], now: float) -> str:
    if not runs:
        return "no runs yet: `connect-worker send EVENT` starts one"
    blocks = ["\n".join(format_run(run, now)) for run in runs]
    return "\n\n".join(blocks)


def format_workers(conns: list[dict[str, Any]], now: float) -> str:
    if not conns:
        return "no worker has connected yet"
    rows = [["worker", "connection", "apps", "state", "in flight", "connected", "closed"]]
    for c in conns:
        apps = ", ".join(f"{a}@{c['app_version'][a]}" if c["app_version"].get(a) else a
                         for a in c["apps"])
        state = "DRAINING" if c["live"] and c["paused"] else c["status"]
        flight = "; ".join(f"{f['function']} {f['step'] or 'next step'} "
                           f"({secs(now - f['since'])})" for f in c["in_flight"]) or "-"
        rows.append([c["worker"], c["conn_id"], apps, state, flight, clock(c["connected_at"]),
                     f"{clock(c['closed_at'])} {c['close'] or ''}".strip()])
    return "\n".join(_table(rows, ""))


# -- commands --------------------------------------------------------------------


def send(url: str, name: str, data: Any, out: TextIO) -> int:
    result = _request(url, "POST", "/e/dev", {"name": name, "data": data})
    run_ids: list[str] = []
    for event_id in result.get("ids", []):
        runs = _request(url, "GET", f"/v1/events/{event_id}/runs")
        run_ids.extend(r["run_id"] for r in runs.get("data", []))
    for run_id in run_ids:
        print(run_id, file=out)
    if not run_ids:
        print(f"connect-worker: event {name!r} received, but no synced function is triggered "
              "by it (is a worker connected? see `connect-worker workers`)", file=sys.stderr)
    return 0


def _watch(render: Callable[[], str], out: TextIO, interval: float,
           stop: Callable[[], bool]) -> int:
    """Redraw on a terminal; elsewhere print each new version of the output."""
    last = None
    tty = out.isatty()
    while True:
        text = render()
        if tty:
            out.write(f"\x1b[H\x1b[2J{clock(time.time())}  (refreshing every {interval:g} s; "
                      f"Ctrl-C stops)\n\n{text}\n")
        elif text != last:
            out.write(f"--- {clock(time.time())}\n{text}\n")
        out.flush()
        last = text
        if stop():
            return 0
        time.sleep(interval)


def runs(url: str, run_id: str | None, limit: int, watch: bool, out: TextIO) -> int:
    def render() -> str:
        if run_id:
            run = _request(url, "GET", f"/v1/runs/{run_id}")["data"]["view"]
            return "\n".join(format_run(run, time.time(), requests=True))
        listing = _request(url, "GET", f"/v1/runs?limit={limit}")
        return format_runs(listing["data"], listing["now"])

    if not watch:
        print(render(), file=out)
        return 0
    from .cli import stop_on_signals

    stop_on_signals()
    return _watch(render, out, 1.0, lambda: False)


def workers(url: str, out: TextIO) -> int:
    listing = _request(url, "GET", "/v1/connections")
    print(format_workers(listing["data"], listing["now"]), file=out)
    return 0


FAULTS = {
    "gateway-closing": ("gateway-closing", "send GATEWAY_CLOSING (a gateway deploy): the "
                        "worker reconnects elsewhere, then the socket closes"),
    "drop": ("drop", "drop the socket without a close frame (a network cut)"),
    "withhold-ack": ("withhold-reply-ack", "do not ACK the next reply(s): the worker must "
                     "flush them over HTTP"),
    "dual-dispatch": ("dual-dispatch", "send the next request(s) to two workers at once"),
}


def fault(url: str, name: str, worker: str | None, count: int, out: TextIO) -> int:
    endpoint = FAULTS[name][0]
    body: dict[str, Any] = {"worker": worker} if name in ("gateway-closing", "drop") else {
        "count": count}
    data = _request(url, "POST", f"/v1/faults/{endpoint}", body)["data"]
    if "connections" in data:
        print(f"{name}: {', '.join(data['connections'])}", file=out)
    else:
        pending = data["pending"]
        print(f"{name}: armed (pending: withhold-ack {pending['withhold_reply_ack']}, "
              f"dual-dispatch {pending['dual_dispatch']})", file=out)
    return 0


def add_commands(commands: Any) -> None:
    """Register send, runs, workers and fault on the CLI's subparsers."""
    send_p = commands.add_parser("send", help="send an event to the dev gateway; prints "
                                 "the IDs of the runs it started")
    send_p.add_argument("event", metavar="EVENT", help="event name, e.g. report/requested")
    send_p.add_argument("--data", default="{}", metavar="JSON", help="event data (a JSON "
                        "object; default {})")
    add_url(send_p)
    runs_p = commands.add_parser("runs", help="list the dev gateway's runs with their steps, "
                                 "attempts, workers and durations")
    runs_p.add_argument("run_id", metavar="RUN_ID", nargs="?",
                        help="show one run, with every request sent for it")
    runs_p.add_argument("--watch", action="store_true", help="refresh every second (Ctrl-C "
                        "stops)")
    runs_p.add_argument("--limit", type=int, default=10, help="newest N runs (default 10)")
    runs_p.add_argument("--export", metavar="DIR", default=None, help="write the newest "
                        "--limit runs as history files for `connect-worker compat`")
    add_url(runs_p)
    workers_p = commands.add_parser("workers", help="list the worker connections of the dev "
                                    "gateway (state, app version, in-flight steps)")
    add_url(workers_p)
    fault_p = commands.add_parser(
        "fault", help="inject a fault into a running dev gateway (rehearse a deploy)",
        description="Inject a fault into a running dev gateway. "
        + " ".join(f"{k}: {v[1]}." for k, v in FAULTS.items()))
    fault_p.add_argument("fault", choices=list(FAULTS), metavar="FAULT",
                         help=", ".join(FAULTS))
    fault_p.add_argument("--worker", default=None, metavar="ID",
                         help="gateway-closing/drop: a worker's instance id or connection id "
                         "(default: every live connection)")
    fault_p.add_argument("--count", type=int, default=1,
                         help="withhold-ack/dual-dispatch: how many (default 1)")
    add_url(fault_p)


def run_command(args: argparse.Namespace) -> int:
    url = (args.url or default_url()).rstrip("/")
    try:
        if args.command == "send":
            try:
                data = json.loads(args.data)
            except ValueError as exc:
                print(f"connect-worker: --data is not valid JSON: {exc}", file=sys.stderr)
                return EXIT_USAGE
            if not isinstance(data, dict):
                print("connect-worker: --data must be a JSON object, e.g. '{\"topic\": \"x\"}'",
                      file=sys.stderr)
                return EXIT_USAGE
            return send(url, args.event, data, sys.stdout)
        if args.command == "runs" and args.export:
            from .compat import export_gateway

            count = export_gateway(url, args.export, max(1, args.limit))
            print(f"exported {count} runs to {args.export}")
            return 0
        if args.command == "runs":
            return runs(url, args.run_id, max(1, args.limit), args.watch, sys.stdout)
        if args.command == "workers":
            return workers(url, sys.stdout)
        if args.count < 1:
            print("connect-worker: --count must be >= 1", file=sys.stderr)
            return EXIT_USAGE
        return fault(url, args.fault, args.worker, args.count, sys.stdout)
    except GatewayError as exc:
        print(f"connect-worker: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # `connect-worker runs | head`: the reader has what it wanted. Python would
        # still flush stdout at exit and print a traceback; point it at nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 0
