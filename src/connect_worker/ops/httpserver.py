"""A minimal asyncio HTTP/1.1 server on h11, shared by the devserver API and the
health/metrics listener.

Routes are ``(method, path) -> handler``; a handler gets a :class:`Request` and
returns a :class:`Response`. Paths may end with ``/*`` to match a prefix. One
request per connection loop iteration, keep-alive supported, bodies up to
``max_body`` bytes. Nothing here is meant for the public internet: it serves
loopback tests and a private metrics port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    # The client's IP address ("" if unknown), for handlers that serve loopback only.
    peer: str = ""


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


class HTTPServer:
    """Serve ``routes`` on ``host:port`` (port 0 picks a free one; see ``.port``)."""

    def __init__(
        self,
        routes: dict[tuple[str, str], Handler],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body: int = 16 * 1024 * 1024,
        bind: Callable[[], socket.socket] | None = None,
    ) -> None:
        """``bind``, when given, returns the listening socket to use instead of host:port
        (the health listener binds a dual-stack socket itself)."""
        self._routes = routes
        self._bind = bind
        self._host = host
        self._port = port
        self._max_body = max_body
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._bind is None:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
            return
        sock = self._bind()
        try:
            self._server = await asyncio.start_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)
        self._server = None

    async def __aenter__(self) -> HTTPServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _find(self, method: str, path: str) -> Handler | None:
        handler = self._routes.get((method, path))
        if handler is not None:
            return handler
        for (route_method, route_path), candidate in self._routes.items():
            if (
                route_method == method
                and route_path.endswith("/*")
                and path.startswith(route_path[:-1])
            ):
                return candidate
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request = await self._read_request(conn, reader, peer)
                if request is None:
                    return
                handler = self._find(request.method, request.path)
                if handler is None:
                    response = Response(404, b"not found\n")
                else:
                    try:
                        response = await handler(request)
                    except Exception:
                        log.exception("handler failed for %s %s", request.method, request.path)
                        response = Response(500, b"internal error\n")
                headers = [
                    ("content-type", response.content_type),
                    ("content-length", str(len(response.body))),
                    *response.headers.items(),
                ]
                writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)))
                writer.write(conn.send(h11.Data(data=response.body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, peer: str = ""
    ) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_body:
                    raise h11.RemoteProtocolError("body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                target = urlsplit(head.target.decode("latin-1"))
                return Request(
                    method=head.method.decode("ascii"),
                    path=target.path,
                    query=parse_qs(target.query),
                    headers={k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers},
                    body=bytes(body),
                    peer=peer,
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None
