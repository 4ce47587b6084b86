"""``DevServer``: the local Connect gateway + executor, usable as a library."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..ops.httpserver import HTTPServer
from ..protocol import pb
from .api import API
from .config import DevServerConfig
from .core import Core
from .executor import Executor
from .gateway import Gateway
from .state import (
    ConnectionInfo,
    ConnStatus,
    Dispatch,
    Event,
    Faults,
    ReplyRecord,
    Run,
    StartCall,
    SyncRecord,
    TimelineEntry,
)

log = logging.getLogger(__name__)


class DevServer:
    """Binds 127.0.0.1 (free ports unless given) on ``async with``.

    All attributes are live views of the recorded state; see
    ``connect_worker/devserver/README.md`` for the full API.
    """

    def __init__(
        self,
        config: DevServerConfig | None = None,
        *,
        host: str = "127.0.0.1",
        api_port: int = 0,
        gateway_port: int = 0,
    ) -> None:
        self.config = config or DevServerConfig()
        self._host = host
        self._api_port = api_port
        self._gateway_port = gateway_port
        self.core = Core(self.config)
        self.gateway = Gateway(self.core)
        self.executor = Executor(self.core, self.gateway)
        self.api = API(self.core, self.gateway, self.executor)
        self._http: HTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        ports: dict[str, int] = {}
        if self._gateway_port:
            for i, group in enumerate(self.config.gateway_groups):
                ports[group] = self._gateway_port + i
        await self.gateway.start(self._host, ports)
        self._http = HTTPServer(self.api.routes(), host=self._host, port=self._api_port)
        await self._http.start()

    async def close(self) -> None:
        await self.executor.close()
        await self.gateway.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        self.core.state.close()

    async def __aenter__(self) -> DevServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- addresses -------------------------------------------------------------

    @property
    def api_url(self) -> str:
        assert self._http is not None, "DevServer not started"
        return f"http://{self._host}:{self._http.port}"

    @property
    def gateway_url(self) -> str:
        return self.gateway.urls[self.config.gateway_groups[0]]

    @property
    def gateway_urls(self) -> dict[str, str]:
        return dict(self.gateway.urls)

    # -- recorded state --------------------------------------------------------

    @property
    def faults(self) -> Faults:
        return self.core.state.faults

    @property
    def runs(self) -> dict[str, Run]:
        return self.core.state.runs

    @property
    def events(self) -> dict[str, Event]:
        return self.core.state.events

    @property
    def connections(self) -> list[ConnectionInfo]:
        return list(self.core.state.connections.values())

    def connection(self, conn_id: str) -> ConnectionInfo:
        return self.core.state.connections[conn_id]

    @property
    def live_connections(self) -> list[ConnectionInfo]:
        return [c.info for c in self.gateway.live.values()]

    @property
    def dispatches(self) -> list[Dispatch]:
        return self.core.state.dispatches

    @property
    def replies(self) -> list[ReplyRecord]:
        return self.core.state.replies

    @property
    def flushes(self) -> list[ReplyRecord]:
        return self.core.state.flushes

    @property
    def start_calls(self) -> list[StartCall]:
        return self.core.state.start_calls

    @property
    def timeline(self) -> list[TimelineEntry]:
        return self.core.state.timeline

    @property
    def functions(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self.core.state.functions

    @property
    def syncs(self) -> list[SyncRecord]:
        return self.core.state.syncs

    @property
    def errors(self) -> list[str]:
        return self.core.state.errors

    def dispatch_counts_by_job(self) -> dict[str, int]:
        return self.core.state.dispatch_counts_by_job()

    def dispatch_counts_by_step(self) -> dict[tuple[str, str], int]:
        return self.core.state.dispatch_counts_by_step()

    def step_executions(self) -> dict[tuple[str, str], int]:
        return self.core.state.step_executions()

    def dump(self) -> str:
        return self.core.state.dump()

    # -- driving ---------------------------------------------------------------

    async def send_event(self, name: str, data: Any = None, **fields: Any) -> list[str]:
        """Like ``POST /e/{key}``; returns the IDs of the runs it started."""
        event = self.executor.receive_event({"name": name, "data": data or {}, **fields})
        return list(event.run_ids)

    async def invoke(self, slug: str, data: Any = None) -> str:
        return self.executor.invoke(slug, data or {}).run_id

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` is true; re-evaluated on every state change."""
        try:
            await self.core.state.wait_for(predicate, timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.dump()}") from None

    async def wait_for_run(self, run_id: str, timeout: float = 30.0) -> Run:  # noqa: ASYNC109
        """Wait until the run is completed, failed or cancelled."""

        def done() -> bool:
            run = self.runs.get(run_id)
            return run is not None and run.status.terminal

        await self.wait_for(done, timeout)
        return self.runs[run_id]

    async def wait_for_connection(
        self,
        predicate: Callable[[ConnectionInfo], bool] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> ConnectionInfo:
        """Wait for a READY connection (matching ``predicate`` if given) and return it."""
        def find() -> ConnectionInfo | None:
            for info in self.live_connections:
                if info.status is ConnStatus.READY and (predicate is None or predicate(info)):
                    return info
            return None

        await self.wait_for(lambda: find() is not None, timeout)
        found = find()
        assert found is not None
        return found

    # -- fault injection -------------------------------------------------------

    async def drop_socket(self, conn_id: str) -> None:
        """Abrupt TCP close, no close frame."""
        await self.gateway.drop_socket(conn_id)

    async def gateway_closing(self, conn_id: str) -> None:
        """Drain one connection like a deploying gateway (§5.4.2); returns once closed."""
        await self.gateway.gateway_closing(conn_id)

    async def drain_gateway(self, group: str) -> None:
        """Drain a whole gateway group; it refuses new upgrades from then on."""
        await self.gateway.drain_group(group)

    async def restart_gateway(self, down_for: float) -> None:
        """Every gateway group restarts: all sockets drop (no close frame), and
        ``/v0/connect/start`` and WebSocket upgrades answer 503 for ``down_for`` s."""
        await self.gateway.restart(down_for)

    def fail_flush(self, seconds: float) -> None:
        """``/v0/connect/flush`` answers 503 for the next ``seconds``."""
        self.faults.flush_failing_until = time.monotonic() + seconds

    async def send_raw(self, conn_id: str, data: bytes | str) -> None:
        await self.gateway.send_raw(conn_id, data)

    async def send_message(self, conn_id: str, kind: int, payload: bytes = b"") -> bool:
        """Write a well-formed ConnectMessage of any kind (e.g. an unexpected one)."""
        return await self.gateway.send_kind(conn_id, kind, payload)

    async def expire_lease(self, request_id: str) -> bool:
        return self.core.leases.expire(request_id)

    def cancel_run(self, run_id: str) -> bool:
        return self.executor.cancel_run(run_id)


async def serve(
    config: DevServerConfig | None = None,
    *,
    host: str = "127.0.0.1",
    api_port: int = 8288,
    gateway_port: int = 8289,
    ready: Callable[[DevServer], None] | None = None,
) -> None:
    """Run a devserver until cancelled (``connect-worker dev``)."""
    async with DevServer(config, host=host, api_port=api_port, gateway_port=gateway_port) as dev:
        log.info("devserver API at %s", dev.api_url)
        for group, url in dev.gateway_urls.items():
            log.info("devserver gateway %s at %s", group, url)
        if ready is not None:
            ready(dev)
        await asyncio.Event().wait()


__all__ = ["DevServer", "pb", "serve"]
