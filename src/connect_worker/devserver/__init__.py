"""A local Inngest Connect gateway + executor for tests, demos and benchmarks.

See README.md in this package for the API.
"""

from __future__ import annotations

from .config import DevServerConfig
from .server import DevServer, serve
from .state import (
    ConnectionInfo,
    ConnStatus,
    Dispatch,
    Event,
    Faults,
    Phase,
    ReplyRecord,
    Run,
    RunStatus,
    StartCall,
    SyncRecord,
    TimelineEntry,
)
from .ulid import is_ulid, new_ulid

__all__ = [
    "ConnStatus",
    "ConnectionInfo",
    "DevServer",
    "DevServerConfig",
    "Dispatch",
    "Event",
    "Faults",
    "Phase",
    "ReplyRecord",
    "Run",
    "RunStatus",
    "StartCall",
    "SyncRecord",
    "TimelineEntry",
    "is_ulid",
    "new_ulid",
    "serve",
]
