"""A tool or service a test needs is missing: a failure under CI (scripts/test installs
it there), a skip elsewhere (a machine that cannot install it, e.g. not root)."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(message: str) -> NoReturn:
    """Fail under CI, skip elsewhere; ``message`` says what is missing and what installs it."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)
