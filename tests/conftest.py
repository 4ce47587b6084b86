"""Shared fixtures. The devserver fixtures live in connect_worker.devserver.testing."""

from __future__ import annotations

from connect_worker.devserver.testing import devserver

__all__ = ["devserver"]
