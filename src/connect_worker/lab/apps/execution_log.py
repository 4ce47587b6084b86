"""One line per step-body run, so tests and the demo can prove exactly-once execution
across worker processes.

:func:`record` appends ``{"step", "run_id", "pid", "ts"}`` (plus any extra fields, e.g.
the soak's ``request_id`` and ``phase``) as one JSON line to the file named by
``CONNECT_WORKER_EXECUTION_LOG`` (nothing when it is unset);
``connect_worker.lab.fleet.read_executions`` reads them back.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any


def record(step: str, run_id: str, **extra: Any) -> None:
    """Append one execution record; O_APPEND writes of one line are atomic."""
    path = os.environ.get("CONNECT_WORKER_EXECUTION_LOG")
    if not path:
        return
    line = json.dumps({"step": step, "run_id": run_id, "pid": os.getpid(), "ts": time.time(),
                       **extra})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
