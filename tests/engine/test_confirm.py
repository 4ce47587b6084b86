"""engine/confirm.py: which functions wait for a lease confirmation before their body."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connect_worker import confirm_before_run
from connect_worker.config import Config
from connect_worker.engine import confirm

from .apps import slow


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    confirm.clear()
    yield
    confirm.clear()


def test_the_worker_wide_setting_applies_unless_a_function_chose() -> None:
    assert not confirm.wanted("engine-slow", False)
    assert confirm.wanted("engine-slow", True)
    assert confirm_before_run(slow) is slow  # wraps the decorated function
    assert slow.id == "engine-slow"  # requests name the fully qualified id
    assert confirm.wanted("engine-slow", False)
    assert not confirm.wanted("engine-other", False)
    confirm_before_run("engine-other", enabled=False)
    assert not confirm.wanted("engine-other", True)  # opted out of the worker-wide one


def test_the_environment_variable_turns_it_on_for_the_worker() -> None:
    env = {"INNGEST_DEV": "1"}
    assert not Config.from_env(env).confirm_before_run
    assert Config.from_env({**env, "CONNECT_WORKER_CONFIRM_BEFORE_RUN": "1"}).confirm_before_run
