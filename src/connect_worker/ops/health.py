"""The operations listener: /metrics, /healthz and /readyz on one small HTTP port.

No work ever arrives through it; executor requests come over the outbound
Connect WebSocket. Railway's deploy healthcheck points at ``/readyz``, so a new
replica counts as healthy only once its gateway connection is READY, and the old
replica gets SIGTERM only after its replacement is taking work.

``/healthz`` answers "is this process alive and its event loop responsive". The
listener runs on the worker's own event loop, so while the loop is blocked no
request is answered at all (the caller times out, which is also a failure).
Once the loop runs again the queued request must still say 503: a small probe
task sleeps ``probe_interval`` and records how late it woke up, and the handler
takes the larger of that last lag and the time since the probe last ran (minus
the interval). A request that waited behind a blocked loop therefore sees the
block whichever of the two callbacks the loop runs first.

The listener binds ``[::]`` dual-stack (IPV6_V6ONLY off) because Railway's
private network is IPv6 while local tools and some platforms probe over IPv4;
asyncio's own ``start_server`` would set IPV6_V6ONLY and refuse IPv4 clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from .httpserver import HTTPServer, Request, Response
from .logs import event
from .metrics import WorkerMetrics

log = logging.getLogger(__name__)

# generate_latest() writes the classic text format; every Prometheus version parses 0.0.4
# (prometheus_client's CONTENT_TYPE_LATEST moved to 1.0.0, which older servers reject).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket; ``::`` (or ``""``) means dual-stack on all addresses.

    Falls back to IPv4 ``0.0.0.0`` where the kernel has no IPv6.
    """
    sock: socket.socket
    if host in ("::", ""):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address: tuple[str, int] = ("0.0.0.0", port)
        else:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            address = ("::", port)
    else:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        address = (str(sockaddr[0]), port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if address[0] == "::" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            # IPv6 disabled in this kernel or container: serve IPv4 rather than nothing.
            log.warning("IPv6 unavailable (%s); listening on 0.0.0.0:%d only", exc, port)
            return bind_socket("0.0.0.0", port)
        raise
    return sock


class HealthServer:
    """Serve /metrics, /healthz and /readyz while the ``async with`` block runs.

    ``readiness`` is called for every /readyz request and must be cheap; it should
    return True only while a connection is READY and the worker is not draining.
    """

    def __init__(
        self,
        port: int,
        registry: CollectorRegistry,
        readiness: Callable[[], bool],
        *,
        host: str = "::",
        lag_threshold: float = 1.0,
        metrics: WorkerMetrics | None = None,
        probe_interval: float = 0.1,
    ) -> None:
        if lag_threshold <= 0:
            raise ValueError("lag_threshold must be > 0")
        if probe_interval <= 0:
            raise ValueError("probe_interval must be > 0")
        self._registry = registry
        self._readiness = readiness
        self._lag_threshold = lag_threshold
        self._metrics = metrics
        self._probe_interval = probe_interval
        self._server = HTTPServer(
            {
                ("GET", "/metrics"): self._handle_metrics,
                ("GET", "/healthz"): self._handle_healthz,
                ("GET", "/readyz"): self._handle_readyz,
            },
            bind=lambda: bind_socket(host, port),
        )
        self._probe_task: asyncio.Task[None] | None = None
        self._last_probe = time.monotonic()
        self._last_lag = 0.0
        self._lagging = False

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._server.port

    async def start(self) -> None:
        await self._server.start()
        self._last_probe = time.monotonic()
        self._probe_task = asyncio.create_task(self._probe(), name="connect_worker.loop_probe")

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        await self._server.close()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def loop_lag(self) -> float:
        """Seconds the event loop is (or just was) behind: last probe lag or probe staleness."""
        stale = time.monotonic() - self._last_probe - self._probe_interval
        return max(self._last_lag, stale, 0.0)

    def _record(self, lag: float) -> None:
        if self._metrics is not None:
            self._metrics.event_loop_lag_seconds.set(lag)
        lagging = lag > self._lag_threshold
        if lagging and not self._lagging:
            event(log, "event_loop.lagging", level=logging.WARNING,
                  lag_seconds=round(lag, 3), threshold_seconds=self._lag_threshold)
        elif self._lagging and not lagging:
            event(log, "event_loop.recovered", lag_seconds=round(lag, 3))
        self._lagging = lagging

    async def _probe(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self._probe_interval)
            now = time.monotonic()
            self._last_lag = max(0.0, now - started - self._probe_interval)
            self._last_probe = now
            self._record(self._last_lag)

    async def _handle_metrics(self, request: Request) -> Response:
        if self._metrics is not None:
            self._metrics.event_loop_lag_seconds.set(self.loop_lag())
        return Response(200, generate_latest(self._registry), content_type=METRICS_CONTENT_TYPE)

    async def _handle_healthz(self, request: Request) -> Response:
        lag = self.loop_lag()
        if self._metrics is not None:
            self._metrics.event_loop_lag_seconds.set(lag)
        if lag > self._lag_threshold:
            body = f"event loop lagging: {lag:.3f}s > {self._lag_threshold:g}s\n"
            return Response(503, body.encode())
        return Response(200, b"ok\n")

    async def _handle_readyz(self, request: Request) -> Response:
        try:
            ready = bool(self._readiness())
        except Exception:
            log.exception("readiness check failed")
            ready = False
        if ready:
            return Response(200, b"ready\n")
        return Response(503, b"not ready\n")
