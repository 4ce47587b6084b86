"""The local loop by hand, as a user types it: `connect-worker dev --fast`, real worker
processes, `send`, `runs`, `workers`, `fault ...`, and a rolling deploy rehearsed with
a real SIGTERM. Everything is a real subprocess; waits are on the gateway's log lines."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from connect_worker.devserver import is_ulid

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "connect_worker"]


def _env(**extra: str) -> dict[str, str]:
    ours = ("INNGEST_", "CONNECT_WORKER_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return {**base, "PYTHONPATH": str(ROOT), **extra}


class Gateway:
    """`connect-worker dev --fast` on free ports; its stderr is read line by line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "dev", "--fast", "--port", "0", "--gateway-port", "0"], cwd=ROOT,
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ready = self.wait_for(r"dev gateway ready: page (http://127\.0\.0\.1:\d+)/", 20)
        self.url = ready.group(1)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    found = regex.search(line)
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no log line matching {pattern!r}:\n{tail}")
                self._changed.wait(remaining)

    def index(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return next(i for i, line in enumerate(self.lines) if regex.search(line))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], cwd=ROOT, env=_env(INNGEST_DEV=self.url),
                              capture_output=True, text=True, timeout=30, check=False)

    def worker(self, name: str, version: str, log: Path, **env: str) -> subprocess.Popen[str]:
        with log.open("w") as stderr:  # the child keeps its own copy
            return subprocess.Popen(
                [*CLI, "run", "examples.pipeline"], cwd=ROOT, stdout=subprocess.DEVNULL,
                stderr=stderr, text=True,
                env=_env(INNGEST_DEV=self.url, CONNECT_WORKER_HTTP_PORT="off",
                         CONNECT_WORKER_INSTANCE_ID=name, CONNECT_WORKER_APP_VERSION=version,
                         CONNECT_WORKER_REPLY_ACK_TIMEOUT="0.5", **env),
            )

    def stop(self) -> int | None:
        """SIGTERM, as a process manager stops it; the exit code (None if it hung)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            code = None
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    try:
        yield gw
    finally:
        gw.stop()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_rolling_deploy_rehearsed_by_hand(gateway: Gateway, tmp_path: Path) -> None:
    """v1 runs a report; v2 starts; SIGTERM v1 mid-step: v1 finishes its step and exits 0,
    v2 runs the rest, every step once; `runs` shows who ran what."""
    v1 = gateway.worker("worker-v1", "v1", tmp_path / "v1.log", STEP_SECONDS="2")
    v2: subprocess.Popen[str] | None = None
    try:
        gateway.wait_for(r"connection ready: worker-v1 \(pipeline@v1")
        sent = gateway.cli("send", "report/long", "--data", '{"sections": 4}')
        assert sent.returncode == 0, sent.stderr
        [run_id] = sent.stdout.split()
        assert is_ulid(run_id)
        gateway.wait_for(r"request \S+ ACKed by worker-v1")
        v2 = gateway.worker("worker-v2", "v2", tmp_path / "v2.log", STEP_SECONDS="0.1")
        gateway.wait_for(r"connection ready: worker-v2 \(pipeline@v2")
        v1.send_signal(signal.SIGTERM)
        assert v1.wait(20) == 0
        gateway.wait_for(rf"run completed: pipeline-long-report run {run_id}", 20)
        paused = gateway.index(r"connection paused \(WORKER_PAUSE, draining\): worker-v1")
        # v1 was mid-step: its reply came after it paused, and it closed cleanly.
        gateway.wait_for(rf"reply by socket from worker-v1: run {run_id}", start=paused)
        gateway.wait_for(r"connection closed: worker-v1 .* close 1000 WORKER_SHUTDOWN")

        shown = gateway.cli("runs")
        assert shown.returncode == 0, shown.stderr
        text = shown.stdout
        (tmp_path / "runs.txt").write_text(text)
        assert "pipeline-long-report  completed" in text and run_id in text
        rows = {m.group(1): m.group(2, 3) for m in re.finditer(
            r"^\s+(section-\d)\s+completed\s+(\d+)\s+(worker-v\d \(v\d\))", text, re.M)}
        assert set(rows) == {"section-0", "section-1", "section-2", "section-3"}, text
        assert all(attempts == "1" for attempts, _ in rows.values()), text
        assert {worker for _, worker in rows.values()} == {"worker-v1 (v1)",
                                                          "worker-v2 (v2)"}, text
        detail = gateway.cli("runs", run_id)
        assert "requests:" in detail.stdout and "function returned" in detail.stdout
        # What the finished run returned (the API has it; the page shows it too).
        assert re.search(r"^    output: \S", detail.stdout, re.M), detail.stdout

        # Withhold the next WORKER_REPLY_ACK: the worker flushes that reply over HTTP.
        armed = gateway.cli("fault", "withhold-ack")
        assert armed.returncode == 0 and "pending: withhold-ack 1" in armed.stdout
        [run2] = gateway.cli("send", "report/requested").stdout.split()
        gateway.wait_for(r"WORKER_REPLY_ACK withheld \(fault\)")
        gateway.wait_for(rf"reply by HTTP flush: run {run2}")
        gateway.wait_for(rf"run completed: pipeline-report run {run2}")
        assert "socket, then HTTP flush" in gateway.cli("runs", run2).stdout

        # GATEWAY_CLOSING, then a dropped socket: the worker reconnects each time.
        mark = len(gateway.lines)
        out = gateway.cli("fault", "gateway-closing", "--worker", "worker-v2")
        assert out.returncode == 0 and out.stdout.startswith("gateway-closing: "), out
        gateway.wait_for(r"GATEWAY_CLOSING to worker-v2", start=mark)
        gateway.wait_for(r"connection ready: worker-v2", start=mark)
        mark = len(gateway.lines)
        assert gateway.cli("fault", "drop").returncode == 0
        gateway.wait_for(r"dropping the socket \(fault\): worker-v2", start=mark)
        gateway.wait_for(r"connection ready: worker-v2", start=mark)
        dual = gateway.cli("fault", "dual-dispatch", "--count", "2")
        assert "dual-dispatch 2" in dual.stdout

        workers = gateway.cli("workers").stdout
        assert re.search(r"worker-v2 .*pipeline@v2\s+READY", workers), workers
        assert re.search(r"worker-v1 .*DISCONNECTED .*1000 WORKER_SHUTDOWN", workers), workers
    finally:
        _stop(v1)
        if v2 is not None:
            _stop(v2)


def test_dev_stops_cleanly_on_sigterm() -> None:
    assert Gateway().stop() == 0


def test_runs_watch_prints_each_change(gateway: Gateway) -> None:
    proc = subprocess.Popen([*CLI, "runs", "--watch"], cwd=ROOT,
                            env=_env(INNGEST_DEV=gateway.url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("--- ")
        assert "no runs yet" in proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
    assert proc.returncode == 0, err


def test_client_errors_are_one_line(gateway: Gateway) -> None:
    bad = gateway.cli("send", "x/y", "--data", "[1]")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "connect-worker: --data must be a JSON object, e.g. '{\"topic\": \"x\"}'"]
    none = gateway.cli("send", "nobody/listens")
    assert none.returncode == 0 and none.stdout == ""
    assert "no synced function is triggered by it" in none.stderr
    assert gateway.cli("fault", "drop").stderr.strip() == (
        "connect-worker: POST /v1/faults/drop: 404 no live connection matches")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    gone = subprocess.run([*CLI, "runs", "--url", f"http://127.0.0.1:{port}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=30, check=False)
    assert gone.returncode == 1
    assert gone.stderr.strip().splitlines() == [
        f"connect-worker: no dev gateway at http://127.0.0.1:{port} (ConnectError); start "
        "one with `connect-worker dev` or pass --url"]


def test_dev_with_a_taken_port_is_one_line_and_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*CLI, "dev", "--port", str(port), "--gateway-port", "0"],
                                cwd=ROOT, env=_env(), capture_output=True, text=True,
                                timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"connect-worker: dev gateway cannot listen on 127.0.0.1:{port} (--port): address "
        "already in use; stop what uses it or pass another --port"]


def test_output_into_a_closed_pipe_is_not_an_error(gateway: Gateway) -> None:
    """`connect-worker runs | head`: the reader leaves first; no traceback, exit 0."""
    import shlex

    # `true` exits without reading: the CLI's write (after its HTTP call) meets EPIPE.
    piped = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {shlex.join([*CLI, 'runs'])} | true"],
        cwd=ROOT, env=_env(INNGEST_DEV=gateway.url), capture_output=True, text=True,
        timeout=30, check=False)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
