"""The generated protobuf classes, re-exported under stable names.

Everything outside ``connect_worker.protocol`` that needs a raw message (the
devserver, tests) imports it from here, never from ``_pb`` directly.
"""

from __future__ import annotations

from ._pb.connect_pb2 import (
    DESCRIPTOR,
    AppConfiguration,
    AuthData,
    ConnectMessage,
    FlushResponse,
    GatewayConnectionReadyData,
    GatewayExecutorRequestData,
    GatewayMessageType,
    SDKResponse,
    SDKResponseStatus,
    StartRequest,
    StartResponse,
    SystemAttributes,
    SystemError,
    WorkerConnectRequestData,
    WorkerDisconnectReason,
    WorkerReplyAckData,
    WorkerRequestAckData,
    WorkerRequestExtendLeaseAckData,
    WorkerRequestExtendLeaseData,
    WorkerStatusData,
)

__all__ = [
    "DESCRIPTOR",
    "AppConfiguration",
    "AuthData",
    "ConnectMessage",
    "FlushResponse",
    "GatewayConnectionReadyData",
    "GatewayExecutorRequestData",
    "GatewayMessageType",
    "SDKResponse",
    "SDKResponseStatus",
    "StartRequest",
    "StartResponse",
    "SystemAttributes",
    "SystemError",
    "WorkerConnectRequestData",
    "WorkerDisconnectReason",
    "WorkerReplyAckData",
    "WorkerRequestAckData",
    "WorkerRequestExtendLeaseAckData",
    "WorkerRequestExtendLeaseData",
    "WorkerStatusData",
]
