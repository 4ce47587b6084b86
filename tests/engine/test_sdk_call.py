"""The executor's direct SDK call (``SdkApp``) answers every request exactly as the SDK's
own ``CommHandler.post`` does (the path it replaced): same status, body, no-retry,
retry-after, SDK and request version, for steps, returns, errors, ``def`` functions,
middleware, an unknown function and a malformed payload. Run with each supported SDK."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import inngest
import pytest
from inngest._internal import comm_lib, const, server_lib

from connect_worker.engine.executor import NO_TIMINGS, SdkApp

client = inngest.Inngest(app_id="sdkcall", is_production=False)
middleware_calls: list[str] = []


class Recording(inngest.MiddlewareSync):
    def transform_input(self, ctx: Any, function: Any, steps: Any) -> None:
        middleware_calls.append("transform_input")

    def before_response(self) -> None:
        middleware_calls.append("before_response")


def _trigger(name: str) -> inngest.TriggerEvent:
    return inngest.TriggerEvent(event=f"t/{name}")


@client.create_function(fn_id="steps", trigger=_trigger("steps"), retries=0,
                        middleware=[Recording])
async def steps(ctx: inngest.Context) -> Any:
    async def one() -> dict[str, int]:
        return {"n": 1}

    async def two() -> str:
        return "two"

    first = await ctx.step.run("one", one)
    second = await ctx.step.run("two", two)
    return {"first": first, "second": second, "attempt": ctx.attempt}


@client.create_function(fn_id="fails", trigger=_trigger("fails"), retries=0)
async def fails(ctx: inngest.Context) -> Any:
    raise inngest.NonRetriableError("no")


@client.create_function(fn_id="later", trigger=_trigger("later"), retries=0)
async def later(ctx: inngest.Context) -> Any:
    raise inngest.RetryAfterError("soon", datetime.datetime(2030, 1, 2, 3, 4, 5,
                                                            tzinfo=datetime.UTC))


@client.create_function(fn_id="plain", trigger=_trigger("plain"), retries=0)
def plain(ctx: inngest.ContextSync) -> Any:
    return ctx.step.run("s", lambda: 7) + 1


FUNCTIONS = [steps, fails, later, plain]


def _payload(memos: dict[str, Any], *, attempt: int = 0) -> bytes:
    event = {"name": "t/x", "data": {"k": 1}, "id": "e1", "ts": 0}
    return json.dumps({"event": event, "events": [event], "steps": memos, "use_api": False,
                       "ctx": {"run_id": "run-1", "attempt": attempt,
                               "disable_immediate_execution": False,
                               "stack": {"stack": list(memos)}}}).encode()


def _fields(response: comm_lib.CommResponse) -> dict[str, Any]:
    body = response.body_bytes()
    assert not isinstance(body, Exception)
    parsed = json.loads(body)
    # Error bodies carry the Python stack, whose frames differ between the two paths.
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if isinstance(item, dict):
            item.pop("stack", None)
            if isinstance(item.get("error"), dict):
                item["error"].pop("stack", None)
    return {"status": response.status_code, "body": parsed, "no_retry": response.no_retry,
            "retry_after": response.retry_after, "sdk": response.sdk_version,
            "request_version": response.request_version}


async def _both(fn_id: str, payload: bytes, step_id: str = "step") -> tuple[Any, Any]:
    handler = comm_lib.CommHandler(client=client, enable_unauthed_sync=None,
                                   framework=server_lib.Framework.CONNECT,
                                   functions=FUNCTIONS, streaming=const.Streaming.DISABLE)
    old = await handler.post(comm_lib.CommRequest(
        body=payload, headers={server_lib.HeaderKey.REQUEST_ID.value: "req-1"},
        is_connect=True, public_path=None,
        query_params={server_lib.QueryParamKey.FUNCTION_ID.value: fn_id,
                      server_lib.QueryParamKey.STEP_ID.value: step_id},
        raw_request=None, request_url="", serve_origin=None, serve_path=None,
        timings=NO_TIMINGS))
    sdk = SdkApp(client, FUNCTIONS, handler)
    prepared = await sdk.prepare(payload, fn_id, None)
    if isinstance(prepared, comm_lib.CommResponse):
        new = prepared
    else:
        new = await sdk.run(prepared, None if step_id == "step" else step_id, "req-1", None)
    return _fields(old), _fields(new)


def _memo(step_id: str, data: Any) -> dict[str, Any]:
    from connect_worker.engine.drift import hash_step_id

    return {hash_step_id(step_id): {"data": data}}


CASES = {
    "first step": ("sdkcall-steps", _payload({})),
    "after one memo": ("sdkcall-steps", _payload(_memo("one", {"n": 1}))),
    "returns": ("sdkcall-steps", _payload({**_memo("one", {"n": 1}), **_memo("two", "two")},
                                          attempt=2)),
    "non-retriable error": ("sdkcall-fails", _payload({})),
    "retry after": ("sdkcall-later", _payload({})),
    "def function": ("sdkcall-plain", _payload({})),
    "def function returns": ("sdkcall-plain", _payload(_memo("s", 7))),
    "unknown function": ("sdkcall-nope", _payload({})),
    "id without the app prefix (SDKs before 0.3)": ("steps", _payload({})),
    "malformed payload": ("sdkcall-steps", b'{"event": 1}'),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_direct_call_answers_as_comm_handler_post(case: str) -> None:
    fn_id, payload = CASES[case]
    old, new = asyncio.run(_both(fn_id, payload))
    assert new == old


def test_middleware_runs_on_the_direct_call() -> None:
    middleware_calls.clear()
    old, new = asyncio.run(_both("sdkcall-steps", _payload({})))
    assert new == old and new["status"] == 206
    assert middleware_calls == ["transform_input", "before_response"] * 2
