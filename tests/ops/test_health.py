"""The operations listener: /readyz gate, /healthz with a blocked loop, /metrics, dual stack."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from connect_worker.ops.health import HealthServer
from connect_worker.ops.metrics import WorkerMetrics

BOUND = 5.0  # seconds any single wait in these tests may take


def _ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _raw_get(port: int, path: str, sent: threading.Event) -> tuple[int, bytes]:
    """GET over a plain socket from another thread; ``sent`` is set once the request is out."""
    with socket.create_connection(("127.0.0.1", port), timeout=BOUND) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        sent.set()
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_readyz_follows_the_readiness_callable() -> None:
    ready = False
    async with HealthServer(0, CollectorRegistry(), lambda: ready, host="127.0.0.1") as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}",
                                     timeout=BOUND) as client:
            response = await client.get("/readyz")
            assert (response.status_code, response.text) == (503, "not ready\n")
            ready = True
            response = await client.get("/readyz")
            assert (response.status_code, response.text) == (200, "ready\n")
            ready = False  # e.g. SIGTERM: draining
            assert (await client.get("/readyz")).status_code == 503


async def test_readyz_is_503_when_the_callable_raises(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    async with HealthServer(0, CollectorRegistry(), broken, host="127.0.0.1") as server:
        async with httpx.AsyncClient(timeout=BOUND) as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/readyz")
    assert response.status_code == 503


async def test_healthz_reports_a_blocked_event_loop() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    threshold = 0.3
    async with HealthServer(0, registry, lambda: True, host="127.0.0.1",
                            lag_threshold=threshold, metrics=metrics) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}",
                                     timeout=BOUND) as client:
            assert (await client.get("/healthz")).status_code == 200

            loop = asyncio.get_running_loop()
            sent = threading.Event()
            pending = loop.run_in_executor(None, _raw_get, server.port, "/healthz", sent)
            # Block the loop the way a synchronous call inside a coroutine would: the
            # request is queued in the kernel meanwhile and answered once the loop runs.
            assert sent.wait(BOUND)
            time.sleep(threshold * 3)  # noqa: ASYNC251 (blocking the loop is the point)
            status, body = await asyncio.wait_for(pending, BOUND)
            assert status == 503, body
            assert b"event loop lagging" in body
            lag = registry.get_sample_value("connect_worker_event_loop_lag_seconds")
            assert lag is not None and lag >= threshold * 2

            # Once the probe has run again the loop counts as healthy again.
            deadline = loop.time() + BOUND
            while (response := await client.get("/healthz")).status_code != 200:
                assert loop.time() < deadline, response.text
            assert response.text == "ok\n"


async def test_metrics_serves_the_registry_in_text_format() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.set_build_info("0.1.0", "sha", "dep-9")
    async with HealthServer(0, registry, lambda: True, host="127.0.0.1",
                            metrics=metrics) as server:
        async with httpx.AsyncClient(timeout=BOUND) as client:
            response = await client.get(f"http://127.0.0.1:{server.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert ('connect_worker_build_info{app_version="sha",deployment_id="dep-9",'
            'version="0.1.0"} 1.0') in response.text
    assert "connect_worker_event_loop_lag_seconds " in response.text


async def test_unknown_paths_are_404_and_no_work_route_exists() -> None:
    async with HealthServer(0, CollectorRegistry(), lambda: True, host="127.0.0.1") as server:
        async with httpx.AsyncClient(timeout=BOUND) as client:
            for path in ("/", "/api/inngest"):
                response = await client.get(f"http://127.0.0.1:{server.port}{path}")
                assert response.status_code == 404
            response = await client.post(f"http://127.0.0.1:{server.port}/readyz")
            assert response.status_code == 404


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback on this host")
async def test_dual_stack_listener_answers_ipv6_and_ipv4() -> None:
    async with HealthServer(0, CollectorRegistry(), lambda: True) as server:  # host "::"
        async with httpx.AsyncClient(timeout=BOUND) as client:
            v6 = await client.get(f"http://[::1]:{server.port}/readyz")
            v4 = await client.get(f"http://127.0.0.1:{server.port}/readyz")
    assert (v6.status_code, v4.status_code) == (200, 200)


async def test_close_releases_the_port() -> None:
    server = HealthServer(0, CollectorRegistry(), lambda: True, host="127.0.0.1")
    await server.start()
    port = server.port
    await server.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=BOUND).close()
