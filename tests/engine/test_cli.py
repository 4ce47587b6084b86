"""The CLI as a user meets it: real subprocesses, one-line errors, documented settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from connect_worker.config import SETTINGS


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    ours = ("INNGEST_", "CONNECT_WORKER_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    return subprocess.run(
        [sys.executable, "-m", "connect_worker", *args],
        env={**base, **(env or {})}, capture_output=True, text=True, timeout=60, check=False,
    )


def test_help_documents_every_setting() -> None:
    result = run_cli("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for setting in SETTINGS:
        assert setting.env in text, setting.env
        assert setting.flag in text, setting.flag


def test_invalid_value_stops_before_connecting_with_one_line() -> None:
    result = run_cli("run", "examples.pipeline",
                     env={"INNGEST_DEV": "1", "INNGEST_CONNECT_MAX_WORKER_CONCURRENCY": "lots",
                          "INNGEST_API_BASE_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "connect-worker: INNGEST_CONNECT_MAX_WORKER_CONCURRENCY='lots' is invalid: "
        "expected a whole number > 0"
    ]


def test_bad_target_is_one_line() -> None:
    result = run_cli("run", "nope_module_xyz", env={"INNGEST_DEV": "1"})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nope_module_xyz" in result.stderr


def test_secret_never_echoed_in_errors() -> None:
    secret = "signkey-prod-" + "cd" * 32
    result = run_cli("run", "examples.pipeline",
                     env={"INNGEST_SIGNING_KEY": secret, "CONNECT_WORKER_DRAIN_TIMEOUT": "x"})
    assert result.returncode == 2
    assert "cd" * 32 not in result.stderr + result.stdout


def test_taken_health_port_is_one_line_and_exit_2() -> None:
    import socket

    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("run", "examples.pipeline",
                         env={"INNGEST_DEV": "1", "INNGEST_API_BASE_URL": "http://127.0.0.1:9",
                              "CONNECT_WORKER_HTTP_PORT": str(port),
                              "CONNECT_WORKER_LOG_FORMAT": "json"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("connect-worker:")]
    # Dev mode on a laptop: the listener is on loopback (CONNECT_WORKER_HTTP_HOST).
    assert errors == [f"connect-worker: cannot listen on CONNECT_WORKER_HTTP_PORT/PORT={port} "
                      "(CONNECT_WORKER_HTTP_HOST=127.0.0.1): Address already in use"]


def test_failing_user_import_shows_the_users_line(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text("import os\n\nKEY = os.environ['CW_TEST_UNSET_API_KEY']\n")
    result = run_cli("run", str(app), env={"INNGEST_DEV": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[:2] == [
        f"connect-worker: importing {str(app)!r} failed: KeyError: 'CW_TEST_UNSET_API_KEY'",
        f"  at {app}:3 in <module>: KEY = os.environ['CW_TEST_UNSET_API_KEY']",
    ]


def test_a_worker_with_no_gateway_says_once_what_it_tried_and_what_to_start() -> None:
    import json
    import signal
    import socket

    # A bound port nobody listens on: every try is refused at once.
    with socket.socket() as nobody:
        nobody.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{nobody.getsockname()[1]}"
        ours = ("INNGEST_", "CONNECT_WORKER_")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(ours)},
               "INNGEST_DEV": url, "CONNECT_WORKER_HTTP_PORT": "off",
               "CONNECT_WORKER_LOG_FORMAT": "json",
               "CONNECT_WORKER_RECONNECT_MAX_BACKOFF": "0.3"}
        proc = subprocess.Popen([sys.executable, "-m", "connect_worker", "run",
                                 "examples.pipeline"], env=env, stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)
        seen: list[dict[str, object]] = []
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # until the 8th try failed
                if line.startswith("{"):
                    seen.append(json.loads(line))
                if sum(e.get("event") == "connection.retry" for e in seen) == 8:
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
            assert proc.stderr is not None
            proc.stderr.close()
    events = [e["event"] for e in seen if e.get("event", "").startswith("connection.")]
    # Said once, after the third try failed; the worker kept retrying.
    assert events.count("connection.unreachable") == 1
    assert events.index("connection.unreachable") == 2
    (said,) = [e for e in seen if e.get("event") == "connection.unreachable"]
    assert said["api"] == url and said["level"] == "error"
    assert "connect-worker dev" in str(said["hint"]) and url in str(said["hint"])
    assert "ConnectError" in str(said["error"])
