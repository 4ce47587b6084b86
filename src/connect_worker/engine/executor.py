"""Runs executor requests through the inngest SDK: the only module that drives its
execution internals (``inngest._internal``; ``drift.py`` wraps the SDK's memo lookup, see
``drift.install_hooks``; the rest of the package uses the SDK's public API).

A request goes straight to the SDK's execution (``SdkApp.prepare`` and ``run``: the
request model, the middleware manager, the memos, ``Function.call``,
``CommResponse.from_call_result``), the steps ``CommHandler.post`` takes for an HTTP
request minus the HTTP: no query
parameters or headers to build and parse, no request model to validate, no response
headers to merge, no extra task per request. An SDK upgrade that changes those internals
breaks this file and its contract tests (run with each supported SDK version), not the
daemon. Each request runs on the user loop (see ``userloop.py``) with
``connect_worker.context.current_request()`` set; ``def`` functions run in a thread pool
that carries that context along.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import inngest
import pydantic_core
from inngest._internal import (
    comm_lib,
    const,
    errors,
    execution_lib,
    middleware_lib,
    net,
    server_lib,
    step_lib,
)

from ..context import RequestIdentity, _current
from ..errors import ExecutionError
from ..ops import tracing
from ..protocol import ExecutorRequest, pb
from . import drift as _drift
from .userloop import UserLoop

log = logging.getLogger(__name__)

USER_LOOP_STOP_TIMEOUT = 0.1

T = TypeVar("T")
App = tuple[inngest.Inngest, Sequence[inngest.Function[Any]]]

STATUS_DONE = pb.SDKResponseStatus.DONE
STATUS_NOT_COMPLETED = pb.SDKResponseStatus.NOT_COMPLETED
STATUS_ERROR = pb.SDKResponseStatus.ERROR
SDK_LANGUAGE = const.LANGUAGE
SDK_VERSION = const.VERSION
SDK_VERSION_HEADER = f"inngest-py:v{const.VERSION}"
_RUN_COMPLETE = b'"RunComplete"'


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the SDK answered, ready to become an SDKResponse."""

    status: Any  # pb.SDKResponseStatus value
    body: bytes
    no_retry: bool = False
    retry_after: str | None = None
    sdk_version: str = SDK_VERSION_HEADER
    request_version: int = 0

    @property
    def label(self) -> str:
        """Low-cardinality outcome for metrics and logs."""
        if self.status == STATUS_DONE:
            return "done"
        if self.status == STATUS_NOT_COMPLETED:
            # A run can also end in an opcode list: [DeferAdd..., RunComplete] (inngest
            # 0.5.20 defers). Only such bodies are parsed.
            return "done" if _RUN_COMPLETE in self.body and _ends_run(self.body) else "step"
        return "error"


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One app as announced in WORKER_CONNECT."""

    app_name: str
    app_version: str | None
    functions_json: bytes
    function_slugs: frozenset[str]


class _ContextThreadPool(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that runs each job in the submitter's contextvars context, and
    counts the jobs running in all such pools (Python waits for them at exit; see
    engine/exiting.py)."""

    running = 0
    _count_lock = threading.Lock()

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        context = contextvars.copy_context()
        return super().submit(context.run, _counted, fn, *args, **kwargs)


def _counted(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    pool = _ContextThreadPool
    with pool._count_lock:
        pool.running += 1
    try:
        return fn(*args, **kwargs)
    finally:
        with pool._count_lock:
            pool.running -= 1


def user_threads_running() -> int:
    """``def`` step bodies still running in the SDK's thread pools."""
    return _ContextThreadPool.running


class _NoTiming(net.ServerTiming):
    """A timer that measures nothing: the SDK's timings only fill an HTTP
    ``Server-Timing`` header, and Connect replies carry no headers."""

    def __init__(self) -> None:
        super().__init__("")

    def __enter__(self) -> _NoTiming:
        return self

    def __exit__(self, *args: object) -> None:
        pass

    def to_header(self) -> str:
        return ""


class _NoTimings(net.ServerTimings):
    """The SDK's per-request timings, not measured.

    Its default runs, for each request, a task waking every 100 ms to time event-loop
    blocking (with thousands of steps in flight those wake-ups were most of the worker's
    CPU), and six timers and a header string per request. Stateless, so one is shared.
    """

    def __init__(self) -> None:  # no super().__init__(): it builds the real timers
        self.async_block = self.comm_handler = self.function = _NO_TIMING  # type: ignore[assignment]
        self.mw_transform_input = self.mw_transform_output = self.use_api = _NO_TIMING

    def to_header(self) -> str:
        return ""


_NO_TIMING = _NoTiming()
NO_TIMINGS = _NoTimings()  # (also read by lab/bench.py, to cost the SDK as we call it)


class SdkApp:
    """One app's functions, executed the way ``CommHandler.post`` does for a Connect
    request (same order, same SDK objects, same answers), without the HTTP around it.

    Middleware (the client's and each function's) runs as it does under ``post``: the
    manager is built per request by the SDK's own ``MiddlewareManager.from_client``.
    """

    def __init__(self, client: inngest.Inngest, functions: Sequence[inngest.Function[Any]],
                 handler: comm_lib.CommHandler) -> None:
        self.client = client
        # ``CommHandler._get_function``'s lookup as a dict: the id or the on_failure id,
        # then the same with the app id prefixed (ids from SDKs before 0.3).
        self._fns: dict[str, inngest.Function[Any]] = {}
        for fn in functions:
            self._fns.setdefault(fn.get_id(), fn)
            if fn.on_failure_fn_id is not None:
                self._fns.setdefault(fn.on_failure_fn_id, fn)
        self.handler = handler  # its thread pool runs `def` functions (see Executor)
        self._prefix = f"{client.app_id}-"

    def _error(self, err: Exception) -> comm_lib.CommResponse:
        # As ``post``'s wrapper answers an error: the SDK's error body and headers.
        response = comm_lib.CommResponse.from_error(self.client.logger, err)
        response.headers = {**response.headers, **net.create_headers(
            env=self.client.env, framework=server_lib.Framework.CONNECT,
            server_kind=self.client._mode)}
        return response

    async def prepare(self, payload: bytes, fn_id: str,
                      raw_request: object) -> _Prepared | comm_lib.CommResponse:
        """``CommHandler.post``'s steps before the call: the SDK's error answer, or what
        the call needs (the memos tell the drift guard whether there is anything to watch)."""
        client = self.client
        middleware = middleware_lib.MiddlewareManager.from_client(
            client, raw_request, NO_TIMINGS)
        try:
            # ``ServerRequest.from_raw`` validates the model it just validated again.
            request = server_lib.ServerRequest.model_validate_json(payload)
        except Exception as err:
            return self._error(err)
        fn = self._fns.get(fn_id) or self._fns.get(self._prefix + fn_id)
        if fn is None:
            return self._error(errors.FunctionNotFoundError(f"function {fn_id} not found"))
        events = request.events
        steps = request.steps
        if request.use_api:
            # Batch and memos too large for the request: the SDK fetches them.
            fetched_events, fetched_steps = await asyncio.gather(
                client._get_batch(request.ctx.run_id), client._get_steps(request.ctx.run_id))
            if isinstance(fetched_events, Exception):
                return self._error(fetched_events)
            events = fetched_events
            if isinstance(fetched_steps, Exception):
                return self._error(fetched_steps)
            steps = fetched_steps
        if events is None:
            return self._error(Exception("events not in request"))
        return _Prepared(request, fn, fn_id, events, step_lib.StepMemos.from_raw(steps),
                         middleware)

    async def run(self, call: _Prepared, step_id: str | None, request_id: str | None,
                  job_id: str | None,
                  tracker: _drift.RequestDrift | None = None) -> comm_lib.CommResponse:
        """The call itself, and the SDK's answer to it (``tracker`` watches its memos)."""
        client, request, fn, middleware = self.client, call.request, call.fn, call.middleware
        if step_id == server_lib.UNSPECIFIED_STEP_ID:
            step_id = None
        drift_token = None
        if fn.is_handler_async:
            execution = execution_lib.ExecutionV0(
                call.memos, middleware, request, step_id, NO_TIMINGS)
            if tracker is not None:
                drift_token = _drift.set_tracker(tracker)
                tracker.attach(execution, fn)
            try:
                # Awaited here, not in a task of its own: nothing streams.
                call_res = await fn.call(client, execution_lib.Context(
                    attempt=request.ctx.attempt, event=request.event, events=call.events,
                    group=step_lib.Group(), job_id=job_id, logger=client.logger,
                    request_id=request_id, run_id=request.ctx.run_id,
                    step=step_lib.Step(client, execution, middleware,
                                       step_lib.StepIDCounter(), step_id),
                ), call.fn_id, middleware)
            finally:
                if drift_token is not None:
                    _drift.reset_tracker(drift_token)
        else:
            execution_sync = execution_lib.ExecutionV0Sync(
                call.memos, middleware, request, step_id, NO_TIMINGS)
            if tracker is not None:
                tracker.attach(execution_sync, fn)
            fn_call = functools.partial(fn.call_sync, client, execution_lib.ContextSync(
                attempt=request.ctx.attempt, event=request.event, events=call.events,
                group=step_lib.GroupSync(), job_id=job_id, logger=client.logger,
                request_id=request_id, run_id=request.ctx.run_id,
                step=step_lib.StepSync(client, execution_sync, middleware,
                                       step_lib.StepIDCounter(), step_id),
            ), call.fn_id, middleware)
            drift_token = _drift.set_tracker(tracker) if tracker is not None else None
            try:
                pool = self.handler._thread_pool
                if pool is not None:  # (it copies this context: the tracker goes along)
                    call_res = await asyncio.get_running_loop().run_in_executor(pool, fn_call)
                else:
                    call_res = fn_call()
            finally:
                if drift_token is not None:
                    _drift.reset_tracker(drift_token)
        return comm_lib.CommResponse.from_call_result(
            client.logger, call_res, client.env, server_lib.Framework.CONNECT, None)


@dataclass(slots=True)
class _Prepared:
    request: server_lib.ServerRequest
    fn: inngest.Function[Any]
    fn_id: str
    events: list[server_lib.Event]
    memos: step_lib.StepMemos
    middleware: middleware_lib.MiddlewareManager


def error_outcome(name: str, message: str, *, no_retry: bool = False,
                  retry_after: str | None = None) -> Outcome:
    body = json.dumps({"name": name, "message": message, "stack": ""}).encode()
    return Outcome(status=STATUS_ERROR, body=body, no_retry=no_retry, retry_after=retry_after)


class Executor:
    """Maps executor requests to the right app's SDK handler and runs them."""

    def __init__(self, apps: Sequence[App], *, app_version: str | None = None,
                 new_loop: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
                 drift: _drift.DriftGuard | None = None,
                 user_loop: UserLoop | None = None) -> None:
        if not apps:
            raise ExecutionError("no apps to serve")
        self._sdk: dict[str, SdkApp] = {}
        self.drift = drift
        if drift is not None:
            _drift.install_hooks()
        self.apps: list[AppSpec] = []
        for client, functions in apps:
            configs = comm_lib.get_function_configs(
                "wss://connect", {fn.id: fn for fn in functions}
            )
            if isinstance(configs, Exception):
                raise ExecutionError(f"app {client.app_id!r}: {configs}") from configs
            handler = comm_lib.CommHandler(
                client=client,
                enable_unauthed_sync=None,
                framework=server_lib.Framework.CONNECT,
                functions=list(functions),
                streaming=const.Streaming.DISABLE,
            )
            pool = getattr(handler, "_thread_pool", None)
            if isinstance(pool, concurrent.futures.ThreadPoolExecutor):
                # The SDK runs `def` functions here; ours keeps current_request() visible.
                handler._thread_pool = _ContextThreadPool(
                    max_workers=pool._max_workers, thread_name_prefix="connect-worker-fn"
                )
                pool.shutdown(wait=False)
            self._sdk[client.app_id] = SdkApp(client, functions, handler)
            self.apps.append(
                AppSpec(
                    app_name=client.app_id,
                    app_version=app_version or client.app_version,
                    # Serialised exactly as the official client does (aliases, no nulls).
                    functions_json=pydantic_core.to_json(configs, exclude_none=True),
                    function_slugs=frozenset(c.id for c in configs),
                )
            )
        self._slugs = {app.app_name: app.function_slugs for app in self.apps}
        self.user_loop = user_loop or UserLoop(new_loop=new_loop)

    def start(self) -> None:
        self.user_loop.start()

    def stop(self) -> None:
        # Abandoned steps had their second to unwind in the drain; an idle loop stops at
        # once. This only bounds how long user code blocking the loop holds the exit.
        self.user_loop.stop(timeout=USER_LOOP_STOP_TIMEOUT)

    def check_served(self, request: ExecutorRequest) -> Outcome | None:
        """An error outcome when this worker does not serve the request's app or function."""
        slugs = self._slugs.get(request.app_name)
        if slugs is None:
            return error_outcome(
                "AppNotFound",
                f"this worker does not serve app {request.app_name!r} "
                f"(it serves {sorted(self._slugs)})",
            )
        if request.function_slug not in slugs:
            return error_outcome(
                "FunctionNotFound",
                f"app {request.app_name!r} on this worker has no function "
                f"{request.function_slug!r}",
            )
        return None

    def submit(self, request: ExecutorRequest,
               on_done: Callable[[asyncio.Future[Outcome]], None],
               loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[Outcome]:
        """Start ``request`` on the user loop; ``on_done`` gets the future (of ``loop``,
        the caller's) once it is done. Cancelling the future cancels the user task."""
        return self.user_loop.submit(self._call(request), on_done, loop)

    async def _call(self, request: ExecutorRequest) -> Outcome:
        sdk = self._sdk[request.app_name]
        identity = RequestIdentity(
            request_id=request.request_id,
            run_id=request.run_id,
            job_id=request.job_id,
            app_name=request.app_name,
            function_slug=request.function_slug,
            step_id=request.step_id,
            payload=request.request_payload,
        )
        token = _current.set(identity)
        span_token = tracing.enter_step(request)  # the step's span is current in user code
        tracker = None
        try:
            prepared = await sdk.prepare(request.request_payload, request.function_slug, request)
            if isinstance(prepared, comm_lib.CommResponse):
                response = prepared
            else:
                if self.drift is not None and self.drift.watches(
                        prepared.memos.size, request.step_id):
                    tracker = self.drift.begin(_drift.Request(
                        request.run_id, request.function_slug, request.step_id,
                        request.request_payload))
                response = await sdk.run(prepared, request.step_id or None,
                                         request.request_id or None, request.job_id or None,
                                         tracker)
        except _drift.DriftStop as stop:
            # fail: the drifted step's body did not run; nothing was paid twice.
            return error_outcome("VersionDrift", tracker.failure if tracker and tracker.failure
                                 else str(stop), no_retry=True)
        finally:
            tracing.exit_step(span_token)
            _current.reset(token)
        body = response.body_bytes()
        if isinstance(body, Exception):
            log.error("the SDK produced an unserialisable response: %s", body)
            return error_outcome("SerializationError", "the step result could not be serialised")
        if tracker is not None and self.drift is not None:
            returned = response.status_code == 200 or (
                response.status_code == 206 and _RUN_COMPLETE in body and _ends_run(body))
            failure = self.drift.finish(tracker, returned=returned,
                                        failed=response.status_code >= 400 and response.no_retry,
                                        body=body)
            if failure is not None:
                return error_outcome("VersionDrift", failure, no_retry=True)
        status = {200: STATUS_DONE, 206: STATUS_NOT_COMPLETED}.get(
            response.status_code, STATUS_ERROR
        )
        return Outcome(
            status=status,
            body=body,
            no_retry=response.no_retry,
            retry_after=response.retry_after,
            sdk_version=response.sdk_version or SDK_VERSION_HEADER,
            request_version=response.request_version or 0,
        )


def _ends_run(body: bytes) -> bool:
    """Whether an opcode list holds RunComplete (the function returned)."""
    try:
        ops = json.loads(body)
    except ValueError:
        return False
    return isinstance(ops, list) and any(
        isinstance(op, dict) and op.get("op") == "RunComplete" for op in ops
    )

