"""The HTTP API (one port, like the dev server's 8288): Connect REST
(``/v0/connect/start``, ``/v0/connect/flush``), the event API (``/e/{key}``,
``/invoke/{slug}``), a read API for runs and connections, the page at ``/``, and
fault commands (``/v1/faults/...``, loopback clients only) for rehearsing deploys."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError

from ..ops.httpserver import Handler, Request, Response
from ..protocol import constants, pb
from . import logfmt
from .auth import check_authorization
from .browser import guard
from .checkpoint import CheckpointRejected
from .core import Core
from .executor import Executor
from .gateway import Gateway
from .state import Faults, StartCall
from .ulid import new_ulid
from .views import connections_view, run_view, runs_view

log = logging.getLogger(__name__)

PROTOBUF = "application/octet-stream"


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, default=str).encode(), "application/json")


def _is_loopback(peer: str) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _loopback_only(handler: Handler) -> Handler:
    async def guarded(request: Request) -> Response:
        if not _is_loopback(request.peer):
            return _json({"error": "answered for loopback clients only"}, 403)
        return await handler(request)

    return guarded


def _count(request: Request) -> int:
    """``{"count": N}`` from the body (default 1); ValueError if not a whole number >= 1."""
    body = json.loads(request.body or b"{}")
    count = body.get("count", 1) if isinstance(body, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError("count must be a whole number >= 1")
    return count


class NextN:
    """A fault predicate true for the next ``remaining`` requests it is asked about."""

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining

    def __call__(self, request_id: str) -> bool:
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


PAGE = "page.html"


class API:
    def __init__(self, core: Core, gateway: Gateway, executor: Executor) -> None:
        self.core = core
        self.state = core.state
        self.config = core.config
        self.gateway = gateway
        self.executor = executor

    def routes(self) -> dict[tuple[str, str], Handler]:
        # Every route refuses what a page in the developer's browser could send.
        return {key: guard(handler, self.config.allowed_hosts)
                for key, handler in self._routes().items()}

    def _routes(self) -> dict[tuple[str, str], Handler]:
        return {
            ("POST", constants.START_PATH): self.start,
            ("POST", constants.FLUSH_PATH): self.flush,
            ("POST", "/e/*"): self.event,
            ("POST", "/invoke/*"): self.invoke,
            # Checkpoint API (Inngest's pkg/api/apiv1/checkpoint.go).
            ("POST", "/v1/checkpoint"): self.checkpoint,
            ("POST", "/v1/checkpoint/*"): self.checkpoint,
            ("GET", "/v1/runs/*"): self.get_run,
            ("DELETE", "/v1/runs/*"): self.delete_run,
            ("GET", "/v1/events/*"): self.event_runs,
            ("GET", "/v0/connect/envs/*"): self.conns,
            ("GET", "/v0/connect/conns"): self.conns,
            ("GET", "/health"): self.health,
            # For the person at this machine only, even on a --host 0.0.0.0 gateway:
            # the page and lists show event data; faults disturb workers.
            ("GET", "/"): _loopback_only(self.page),
            ("GET", "/v1/runs"): _loopback_only(self.list_runs),
            ("GET", "/v1/connections"): _loopback_only(self.connections),
            ("GET", "/v1/faults"): _loopback_only(self.faults_status),
            ("POST", "/v1/faults/*"): _loopback_only(self.fault),
        }

    async def health(self, request: Request) -> Response:
        return _json({"status": "ok"})

    # -- Connect REST --------------------------------------------------------

    async def start(self, request: Request) -> Response:
        faults = self.state.faults
        headers = dict(request.headers)
        call = StartCall(time.time(), headers, [], 200, env=headers.get("x-inngest-env"))
        self.state.start_calls.append(call)
        self.state.record("in", "HTTP_START")
        if faults.start_delay > 0:
            await asyncio.sleep(faults.start_delay)
        if faults.gateway_down():
            call.status = 503
            self.state.notify()
            return Response(503, b"gateway restarting\n")
        if faults.start_failures:
            call.status = faults.start_failures.pop(0)
            self.state.notify()
            return Response(call.status, b"injected failure\n")
        ok, bearer = check_authorization(headers.get("authorization"), self.config.signing_key)
        if not ok:
            call.status = 401
            self.state.notify()
            return Response(401, b"unauthorized\n")
        body = pb.StartRequest()
        try:
            body.ParseFromString(request.body)
        except (DecodeError, RuntimeWarning, ValueError):
            call.status = 400
            self.state.notify()
            return Response(400, b"invalid StartRequest\n")
        call.exclude_gateways = list(body.exclude_gateways)
        groups = self.config.gateway_groups
        usable = [
            g for g in groups
            if g not in call.exclude_gateways and g not in self.gateway.draining_groups
        ]
        group = (usable or [g for g in groups if g not in self.gateway.draining_groups]
                 or list(groups))[0]
        conn_id = new_ulid()
        session = self.core.issue_session(call.env or self.config.env_name, bearer, group, call)
        call.connection_id = conn_id
        call.gateway_group = group
        self.state.notify()
        resp = pb.StartResponse(
            connection_id=conn_id,
            gateway_endpoint=self._endpoint(group, headers.get("host")),
            gateway_group=group,
            session_token=session.token,
            sync_token=bearer,
        )
        return Response(200, resp.SerializeToString(), PROTOBUF)

    def _endpoint(self, group: str, host_header: str | None) -> str:
        """Like the dev server: the gateway URL uses the hostname the client used."""
        if not host_header:
            return self.gateway.urls[group]
        hostname = urlsplit(f"//{host_header}").hostname or ""
        if not hostname:
            return self.gateway.urls[group]
        if ":" in hostname:
            hostname = f"[{hostname}]"
        return f"ws://{hostname}:{self.gateway.ports[group]}/v0/connect"

    async def flush(self, request: Request) -> Response:
        if time.monotonic() < self.state.faults.flush_failing_until:
            self.state.record("in", "HTTP_FLUSH_FAILED")
            return Response(503, b"injected failure\n")
        ok, _ = check_authorization(request.headers.get("authorization"), self.config.signing_key)
        if not ok:
            return Response(401, b"unauthorized\n")
        if not request.body:
            return Response(400, b"empty body\n")
        resp = pb.SDKResponse()
        try:
            resp.ParseFromString(request.body)
        except (DecodeError, RuntimeWarning, ValueError):
            return Response(400, b"invalid SDKResponse\n")
        # The real handler unmarshals system_trace_ctx unconditionally (§4.2).
        try:
            trace = json.loads(resp.system_trace_ctx)
        except ValueError:
            trace = None
        if not isinstance(trace, dict):
            self.state.record("in", "HTTP_FLUSH_REJECTED", request_id=resp.request_id)
            return Response(400, b"invalid system_trace_ctx\n")
        self.state.record("in", "HTTP_FLUSH", request_id=resp.request_id)
        self.core.persist_reply(resp, "flush", None)
        log.info("reply by HTTP flush: %s", logfmt.reply(resp))
        out = pb.FlushResponse(request_id=resp.request_id)
        return Response(200, out.SerializeToString(), PROTOBUF)

    # -- checkpoints ---------------------------------------------------------

    async def checkpoint(self, request: Request) -> Response:
        """``POST /v1/checkpoint/{run_id}/async``: steps an SDK ran within one request.

        The sync (API-based function) routes, ``/v1/checkpoint`` and ``.../steps``,
        are answered 501 with a reason: durable endpoints are not served here.
        """
        ok, _ = check_authorization(request.headers.get("authorization"), self.config.signing_key)
        if not ok:
            return _json({"error": "Unauthorized", "status": 401}, 401)
        parts = request.path.strip("/").split("/")  # v1 checkpoint {run_id} async
        if len(parts) != 4 or parts[3] != "async":
            return _json({"error": "sync (API-based) checkpointing is not supported by the "
                          "dev gateway; only /v1/checkpoint/{run_id}/async", "status": 501}, 501)
        run_id = parts[2]
        try:
            body = json.loads(request.body or b"null")
        except ValueError as exc:
            return _json({"error": f"invalid request body: {exc}", "status": 400,
                          "data": {"run_id": run_id}}, 400)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        self.state.record("in", "HTTP_CHECKPOINT", request_id=str(request_id or ""),
                          detail=run_id)
        try:
            self.executor.checkpoints.checkpoint_async(run_id, body)
        except CheckpointRejected as exc:
            return _json({"error": str(exc), "status": exc.status, "data": {"run_id": run_id}},
                         exc.status)
        return Response(200, b"")

    # -- events --------------------------------------------------------------

    async def event(self, request: Request) -> Response:
        key = request.path[len("/e/"):]
        if not key:
            return _json({"error": "missing event key", "status": 401}, 401)
        try:
            raw = json.loads(request.body or b"null")
        except ValueError:
            return _json({"error": "invalid JSON", "status": 400}, 400)
        items = raw if isinstance(raw, list) else [raw]
        if not all(isinstance(i, dict) for i in items) or not items:
            return _json({"error": "expected an event object or array", "status": 400}, 400)
        try:
            ids = [self.executor.receive_event(item).id for item in items]
        except ValueError as exc:
            return _json({"error": str(exc), "status": 400}, 400)
        return _json({"ids": ids, "status": 200})

    async def invoke(self, request: Request) -> Response:
        slug = request.path[len("/invoke/"):]
        try:
            raw = json.loads(request.body or b"{}")
        except ValueError:
            return _json({"error": "invalid JSON"}, 400)
        data = raw.get("data", raw) if isinstance(raw, dict) else raw
        try:
            run = self.executor.invoke(slug, data)
        except KeyError:
            return _json({"error": f"function {slug} not found"}, 404)
        return _json({"id": run.event.id, "run_id": run.run_id, "status": 200})

    # -- read API ------------------------------------------------------------

    async def get_run(self, request: Request) -> Response:
        run = self.state.runs.get(request.path[len("/v1/runs/"):].strip("/"))
        if run is None:
            return _json({"error": "run not found"}, 404)
        return _json({"data": {**run.to_json(), "view": run_view(self.state, run)}})

    async def delete_run(self, request: Request) -> Response:
        run_id = request.path[len("/v1/runs/"):].strip("/")
        if not self.executor.cancel_run(run_id):
            return _json({"error": "run not found or not running"}, 404)
        return _json({"data": {"run_id": run_id, "status": "cancelled"}})

    async def event_runs(self, request: Request) -> Response:
        parts = request.path.strip("/").split("/")  # v1 events {id} runs
        if len(parts) != 4 or parts[3] != "runs":
            return _json({"error": "not found"}, 404)
        event = self.state.events.get(parts[2])
        if event is None:
            return _json({"error": "event not found"}, 404)
        runs = [self.state.runs[r].to_json() for r in event.run_ids if r in self.state.runs]
        return _json({"data": runs})

    async def conns(self, request: Request) -> Response:
        return _json({"data": [c.to_json() for c in self.state.connections.values()]})

    # -- for people: the page, runs and connections by name ------------------

    async def page(self, request: Request) -> Response:
        html = resources.files(__package__).joinpath(PAGE).read_bytes()
        return Response(200, html, "text/html; charset=utf-8",
                        {"cache-control": "no-store"})

    async def list_runs(self, request: Request) -> Response:
        try:
            limit = int(request.query.get("limit", ["50"])[0])
        except ValueError:
            return _json({"error": "limit must be a whole number"}, 400)
        return _json({"data": runs_view(self.state, max(1, limit)), "now": time.time()})

    async def connections(self, request: Request) -> Response:
        live = set(self.gateway.live)
        return _json({"data": connections_view(self.state, live), "now": time.time()})

    # -- faults (rehearse a deploy by hand) ----------------------------------

    def _pending_faults(self) -> dict[str, int]:
        faults: Faults = self.state.faults
        withhold = faults.withhold_reply_ack
        return {
            "withhold_reply_ack": withhold.remaining if isinstance(withhold, NextN)
            else int(withhold is True),
            "dual_dispatch": faults.dual_dispatch,
        }

    async def faults_status(self, request: Request) -> Response:
        return _json({"data": self._pending_faults()})

    def _targets(self, request: Request) -> list[str]:
        """Live connections named by ``{"worker": ...}`` (instance id, connection id or
        its tail), or every live connection."""
        body = json.loads(request.body or b"{}")
        wanted = body.get("worker") if isinstance(body, dict) else None
        conns = [c.info for c in self.gateway.live.values()]
        if not wanted:
            return [c.conn_id for c in conns]
        return [c.conn_id for c in conns if wanted in (c.instance_id, c.conn_id)
                or (len(wanted) >= 4 and c.conn_id.endswith(wanted.upper()))]

    async def fault(self, request: Request) -> Response:
        name = request.path[len("/v1/faults/"):].strip("/")
        faults = self.state.faults
        try:
            if name in ("gateway-closing", "drop"):
                targets = self._targets(request)
                if not targets:
                    return _json({"error": "no live connection matches"}, 404)
                action = (self.gateway.gateway_closing if name == "gateway-closing"
                          else self.gateway.drop_socket)
                for conn_id in targets:
                    # GATEWAY_CLOSING waits up to drain_window for the worker: answer now.
                    self.gateway.wire.spawn_background(action(conn_id))
                return _json({"data": {"fault": name, "connections": targets}})
            if name == "withhold-reply-ack":
                count = _count(request)
                current = faults.withhold_reply_ack
                if isinstance(current, NextN):
                    current.remaining += count
                else:
                    faults.withhold_reply_ack = NextN(count)
            elif name == "dual-dispatch":
                faults.dual_dispatch += _count(request)
            else:
                return _json({"error": f"unknown fault {name!r}; one of gateway-closing, "
                              "drop, withhold-reply-ack, dual-dispatch"}, 404)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        self.state.notify()
        return _json({"data": {"fault": name, "pending": self._pending_faults()}})
