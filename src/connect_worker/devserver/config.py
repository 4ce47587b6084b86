"""Settings of the local Connect gateway + executor. All durations are seconds.

Defaults are the production values of the real gateway (spec §6); tests pass
small values. ``DevServerConfig.fast()`` gives a set that keeps tests quick.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class DevServerConfig:
    # Values sent to the worker in GATEWAY_CONNECTION_READY.
    heartbeat_interval: float = 10.0
    extend_lease_interval: float = 30.0
    # WORKER_STATUS reports (0 = disabled, the gateway's default).
    status_interval: float = 0.0
    # Request lease; each extension renews it for this long.
    lease_duration: float = 120.0
    # The proxy checks the lease this often, and gives up ``lease_grace`` after
    # it lapsed (step error ``connect_worker_stopped_responding``).
    lease_check_interval: float = 30.0
    lease_grace: float = 5.0
    enforce_lease_expiry: bool = True
    # How long a forward waits for WORKER_REQUEST_ACK; None = lease + grace.
    ack_timeout: float | None = None
    forward_attempts: int = 3
    # Not in the real server as such: how long the router waits (event-driven)
    # for a routable connection before failing with connect_no_healthy_connection
    # (the real router waits 10 x 1 s when only draining connections exist).
    route_wait: float = 10.0
    hello_timeout: float = 5.0
    drain_window: float = 25.0
    # The router skips connections whose last heartbeat is older than this.
    heartbeat_stale: float = 20.0
    # The gateway drops the TCP connection (no close frame) after this long
    # without a heartbeat.
    heartbeat_miss_close: float = 50.0
    reply_ttl: float = 60.0
    session_token_ttl: float = 300.0
    write_timeout: float = 5.0
    # Executor backoff between retries of a queue item (scaled down).
    retry_backoff: float = 0.05
    default_retries: int = 3
    max_apps_per_connection: int = 10
    # None = dev mode (no auth). Otherwise Authorization must carry the plain
    # key, its hash, or "signkey-<env>-<hash>".
    signing_key: str | None = None
    gateway_groups: tuple[str, ...] = ("gw-a",)
    timeline_path: str | None = None
    interval_format: Literal["go", "seconds"] = "go"
    seed: int | None = None
    env_name: str = "dev"
    # Host names (besides loopback names and IP addresses) the HTTP API and the gateway
    # answer to, e.g. a Compose or Kubernetes service name (devserver/browser.py).
    allowed_hosts: tuple[str, ...] = ()
    # False: executor requests carry an empty job_id, as Inngest servers before v1.19.3
    # send them (the field arrived in inngest#4138).
    send_job_id: bool = True

    def __post_init__(self) -> None:
        if not self.gateway_groups:
            raise ValueError("gateway_groups must name at least one group")
        if self.forward_attempts < 1:
            raise ValueError("forward_attempts must be >= 1")
        if self.interval_format not in ("go", "seconds"):
            raise ValueError("interval_format must be 'go' or 'seconds'")

    @property
    def effective_ack_timeout(self) -> float:
        if self.ack_timeout is not None:
            return self.ack_timeout
        return self.lease_duration + self.lease_grace

    def replace(self, **changes: object) -> DevServerConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def fast(cls, **changes: object) -> DevServerConfig:
        """Timings for tests: 1 s heartbeats/extensions, 4 s leases, quick retries."""
        base = cls(
            heartbeat_interval=1.0,
            extend_lease_interval=1.0,
            lease_duration=4.0,
            lease_check_interval=0.5,
            lease_grace=0.5,
            ack_timeout=2.0,
            route_wait=5.0,
            hello_timeout=2.0,
            drain_window=3.0,
            heartbeat_stale=20.0,
            heartbeat_miss_close=50.0,
            reply_ttl=60.0,
            retry_backoff=0.05,
        )
        return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
