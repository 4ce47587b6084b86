"""The one error hierarchy of connect_worker.

::

    ConnectWorkerError
    ├── ConfigError            bad setting; names the variable and what is accepted
    ├── ProtocolError
    │   ├── LocalProtocolError   we tried to send something the state machine forbids (a bug)
    │   └── RemoteProtocolError  the gateway sent something we cannot decode or did not expect
    ├── TransportError         the WebSocket or HTTP connection failed (retryable)
    ├── GatewayError           the Connect API answered with an error (retryable)
    │   ├── AuthError          the signing key was refused (fatal: retrying cannot fix it)
    │   └── SyncError          the gateway could not register our apps (SYNC_FAILED)
    ├── TargetError            the TARGET module or its functions cannot be loaded
    └── ExecutionError         the SDK failed to run a request (not user-code errors)

Foreign exceptions (websockets, httpx, OSError) are mapped to these once, where
they are raised; nothing else in the daemon catches library exceptions.
Messages never contain secrets.
"""

from __future__ import annotations


class ConnectWorkerError(Exception):
    """Base class of every error connect_worker raises."""


class ConfigError(ConnectWorkerError):
    """A setting is invalid. The message names the variable and the accepted values."""


class ProtocolError(ConnectWorkerError):
    """The Connect protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We attempted an action the connection state does not allow (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The gateway sent something we could not decode or did not expect."""


class TransportError(ConnectWorkerError):
    """The network connection failed; the supervisor reconnects."""


class GatewayError(ConnectWorkerError):
    """The Connect API refused a request with a retryable error."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(GatewayError):
    """The signing key (and its fallback) was refused; retrying cannot help."""


class SyncError(GatewayError):
    """The gateway answered WORKER_CONNECT with SYNC_FAILED; fatal if it keeps happening."""


class TargetError(ConnectWorkerError):
    """The TARGET given to ``connect-worker run`` cannot be loaded."""


class ExecutionError(ConnectWorkerError):
    """The SDK could not run a request (not an exception raised by user code)."""
