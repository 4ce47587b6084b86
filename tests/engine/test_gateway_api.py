"""Start/flush auth against a real local HTTP server: hashed key, fallback on 401, env header."""

from __future__ import annotations

import hashlib

from connect_worker.config import Config
from connect_worker.engine.gateway_api import GatewayAPI, hash_signing_key
from connect_worker.errors import AuthError, GatewayError
from connect_worker.ops.httpserver import HTTPServer, Request, Response
from connect_worker.protocol import pb

PRIMARY = "signkey-prod-" + "11" * 32
FALLBACK = "signkey-prod-" + "22" * 32


def test_hash_matches_sdk_rule() -> None:
    assert hash_signing_key(PRIMARY) == hashlib.sha256(bytes.fromhex("11" * 32)).hexdigest()


async def test_fallback_key_after_401_and_env_header() -> None:
    seen: list[Request] = []
    good = f"Bearer {hash_signing_key(FALLBACK)}"

    async def start(request: Request) -> Response:
        seen.append(request)
        if request.headers.get("authorization") != good:
            return Response(401, b"no")
        body = pb.StartResponse(connection_id="01J", gateway_endpoint="ws://127.0.0.1:1/x",
                                gateway_group="g", session_token="t", sync_token="s")
        return Response(200, body.SerializeToString(), "application/octet-stream")

    async with HTTPServer({("POST", "/v0/connect/start"): start}) as server:
        config = Config(api_base_url=f"http://127.0.0.1:{server.port}", signing_key=PRIMARY,
                        signing_key_fallback=FALLBACK, env="branch-1")
        api = GatewayAPI(config)
        try:
            result = await api.start(["old"])
            assert result.gateway_group == "g"
            assert [r.headers["authorization"] for r in seen] == [
                f"Bearer {hash_signing_key(PRIMARY)}", good]
            assert all(r.headers["x-inngest-env"] == "branch-1" for r in seen)
            assert pb.StartRequest.FromString(seen[0].body).exclude_gateways == ["old"]
            # The key that worked is tried first from now on.
            await api.start([])
            assert seen[-1].headers["authorization"] == good
        finally:
            await api.aclose()


async def test_auth_refused_is_fatal_and_keyless() -> None:
    async def start(request: Request) -> Response:
        return Response(403, b"forbidden")

    async with HTTPServer({("POST", "/v0/connect/start"): start}) as server:
        config = Config(api_base_url=f"http://127.0.0.1:{server.port}", signing_key=PRIMARY)
        api = GatewayAPI(config)
        try:
            try:
                await api.start([])
            except AuthError as exc:
                assert "11" * 32 not in str(exc)
                assert hash_signing_key(PRIMARY) not in str(exc)
            else:
                raise AssertionError("expected AuthError")
        finally:
            await api.aclose()


async def test_dev_mode_sends_no_key_and_server_errors_are_retryable() -> None:
    seen: list[Request] = []

    async def start(request: Request) -> Response:
        seen.append(request)
        return Response(500, b"oops")

    async with HTTPServer({("POST", "/v0/connect/start"): start}) as server:
        config = Config(dev=True, api_base_url=f"http://127.0.0.1:{server.port}",
                        signing_key=PRIMARY)
        api = GatewayAPI(config)
        try:
            try:
                await api.start([])
            except AuthError:
                raise AssertionError("500 is not an auth failure") from None
            except GatewayError as exc:
                assert exc.status == 500
            assert "authorization" not in seen[0].headers
        finally:
            await api.aclose()
