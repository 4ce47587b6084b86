"""The Connect wire protocol, free of I/O.

Imports neither anyio, websockets, httpx nor inngest (a test checks this), so it
can be tested without sockets or an event loop.
"""

from __future__ import annotations

from .connection import WorkerConnection
from .durations import format_go_duration, parse_go_duration
from .events import (
    ConnectionReady,
    ExecutorRequest,
    GatewayClosing,
    GatewayEvent,
    GatewayHeartbeat,
    Hello,
    LeaseExtended,
    ReplyAck,
    SyncFailed,
    UnknownMessage,
)
from .state import Input, State

__all__ = [
    "ConnectionReady",
    "ExecutorRequest",
    "GatewayClosing",
    "GatewayEvent",
    "GatewayHeartbeat",
    "Hello",
    "Input",
    "LeaseExtended",
    "ReplyAck",
    "State",
    "SyncFailed",
    "UnknownMessage",
    "WorkerConnection",
    "format_go_duration",
    "parse_go_duration",
]
