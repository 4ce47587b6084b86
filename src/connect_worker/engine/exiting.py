"""The last thing a worker process does after its drain: exit, without waiting for user code.

Once ``drain.end`` is logged every step is delivered, handed back or abandoned, so
nothing of the worker's is pending. What can still run is user code the engine already
gave up on: a ``def`` step's body in the SDK's thread pool (a thread cannot be cancelled)
or an ``async`` step that blocks its loop. Python joins thread-pool threads at exit, so
such a body held the process until it returned, seconds after ``drain.end`` (measured:
3.85 s for a handed-back ``def`` step sleeping 5 s), eating into the grace period before
the platform's SIGKILL. Here the process exits at once instead, and says what it left.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from ..ops.logs import event
from .executor import user_threads_running

log = logging.getLogger("connect_worker")


def lingering_threads() -> list[str]:
    """Names of the non-daemon threads Python would wait for at exit (not this one)."""
    current = threading.current_thread()
    return sorted(t.name for t in threading.enumerate()
                  if t is not current and t.is_alive() and not t.daemon)


def exit_after_drain(code: int) -> int:
    """Log ``worker.exit``; return ``code``, or end the process now if user code that
    Python would wait for is still running."""
    lingering = lingering_threads()
    # Thread-pool workers are joined at exit even as daemons (concurrent.futures'
    # atexit hook); idle ones end at once, busy ones only when their body returns.
    running = user_threads_running()
    event(log, "worker.exit", exit_code=code, user_code_running=running,
          lingering_threads=lingering[:10])
    if lingering or running:
        logging.shutdown()  # flush every handler: os._exit skips the interpreter's cleanup
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    return code
