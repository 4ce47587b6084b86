"""Shared fixtures. The devserver fixtures live in connect_worker.devserver.testing."""

from __future__ import annotations

from connect_worker.devserver.testing import devserver
from connect_worker.lab.inngest_dev import find_binary, server_version

__all__ = ["devserver"]


def pytest_report_header() -> str:
    """Which Inngest dev server the real-server tier (tests/real_server) runs against."""
    binary = find_binary()
    if binary is None:
        return "inngest dev server: not found (tests/real_server is skipped)"
    return f"inngest dev server: {server_version(binary)} ({binary})"
