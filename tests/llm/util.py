from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry

from connect_worker.context import RequestIdentity, _current

# Shaped like a real key so the scrubbing is tested against something realistic.
SECRET = "sk-test-Zq8XvN3p0Lm2Kj5Hg7Fd"


@contextlib.contextmanager
def serving(job_id: str, request_id: str, run_id: str = "run-1") -> Iterator[None]:
    """Pretend to be inside the executor, serving one attempt (request) of one step (job)."""
    token = _current.set(RequestIdentity(request_id, run_id, job_id, "reports",
                                         "reports-generate-report", None))
    try:
        yield
    finally:
        _current.reset(token)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(f"connect_worker_llm_{name}", labels) or 0.0


def log_file(path: Path) -> IO[bytes]:
    """Where a worker subprocess writes its log (read when a test fails)."""
    return open(path, "wb")  # local file, negligible blocking


def assert_no_secret_in_logs(directory: Path) -> None:
    """Worker subprocess logs (JSON lines) must never contain the API key."""
    for path in directory.glob("*.log"):
        assert SECRET not in path.read_text(), f"API key leaked into {path.name}"
