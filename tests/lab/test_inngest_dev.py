"""The pieces of lab/inngest_dev.py that need no server: finding the binary, reading runs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from connect_worker.lab.inngest_dev import Run, find_binary, free_ports


def test_the_binary_comes_from_inngest_cli_else_path(tmp_path: Path) -> None:
    fake = tmp_path / "inngest"
    fake.write_text("#!/bin/sh\necho v0-test\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert find_binary({"INNGEST_CLI": str(fake), "PATH": ""}) == str(fake)
    assert find_binary({"PATH": str(tmp_path)}) == str(fake)
    # A configured path that is not an executable is not silently replaced by PATH's.
    assert find_binary({"INNGEST_CLI": str(tmp_path / "missing"),
                        "PATH": str(tmp_path)}) is None
    assert find_binary({"PATH": os.devnull}) is None


def test_free_ports_are_distinct() -> None:
    ports = free_ports(4)
    assert len(set(ports)) == 4 and all(0 < p < 65536 for p in ports)


def test_a_run_reads_its_status_and_json_output() -> None:
    run = Run.from_json({"run_id": "01J", "status": "Completed", "output": '{"a": 1}',
                         "event_id": "01E", "function_id": "f", "ended_at": None})
    assert run.terminal and run.output == {"a": 1}
    assert not Run.from_json({"status": "Running"}).terminal
