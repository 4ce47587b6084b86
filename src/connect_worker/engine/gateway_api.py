"""The two HTTP calls a worker makes to the Inngest API: ``/v0/connect/start`` and
``/v0/connect/flush``.

Authentication follows the SDKs: no header in dev mode; in cloud mode
``Authorization: Bearer <sha256 of the hex-decoded signing key without its
'signkey-<env>-' prefix>``, retried once with the fallback key on 401/403.
httpx exceptions are mapped here, once, to TransportError / GatewayError /
AuthError. Keys never appear in messages.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass

import httpx

from ..config import Config
from ..errors import AuthError, GatewayError, TransportError
from ..protocol import pb
from ..protocol.constants import FLUSH_PATH, START_PATH

log = logging.getLogger(__name__)

_PREFIX = re.compile(r"^signkey-[a-zA-Z0-9]+-")
_PROTOBUF = "application/protobuf"


def hash_signing_key(key: str) -> str:
    """The bearer value Inngest expects for ``key`` (what the Python SDK sends)."""
    bare = _PREFIX.sub("", key)
    try:
        raw = bytes.fromhex(bare)
    except ValueError:
        # Not hex: the server compares the plain key too; hash the text as the JS SDK does.
        raw = bare.encode()
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class StartResult:
    connection_id: str
    gateway_endpoint: str
    gateway_group: str
    session_token: str
    sync_token: str


class GatewayAPI:
    """Client of the Connect REST endpoints; one per worker process."""

    def __init__(self, config: Config, *, timeout: float = 10.0) -> None:
        self._config = config
        self._client = httpx.AsyncClient(base_url=config.api_base_url, timeout=timeout)
        keys = [config.signing_key, config.signing_key_fallback] if not config.dev else []
        self._bearers = [hash_signing_key(k) for k in keys if k]
        # After a 401/403 on the primary, stick to the key that worked (key rotation).
        self._preferred = 0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _post(self, path: str, body: bytes) -> httpx.Response:
        headers = {"content-type": _PROTOBUF}
        if self._config.env:
            headers["x-inngest-env"] = self._config.env
        order = list(range(len(self._bearers)))
        order = order[self._preferred :] + order[: self._preferred] or [-1]
        response: httpx.Response | None = None
        for index in order:
            if index >= 0:
                headers["authorization"] = f"Bearer {self._bearers[index]}"
            try:
                response = await self._client.post(path, content=body, headers=headers)
            except httpx.HTTPError as exc:
                raise TransportError(f"POST {path} failed: {type(exc).__name__}: {exc}") from exc
            if response.status_code not in (401, 403):
                if index >= 0:
                    self._preferred = index
                return response
        assert response is not None
        tried = "signing key and fallback" if len(self._bearers) > 1 else "signing key"
        raise AuthError(
            f"POST {path} was refused with HTTP {response.status_code}: check the {tried}",
            status=response.status_code,
        )

    async def start(self, exclude_gateways: list[str]) -> StartResult:
        """Ask for a gateway and a session; raises GatewayError/TransportError/AuthError."""
        body = pb.StartRequest(exclude_gateways=exclude_gateways).SerializeToString()
        response = await self._post(START_PATH, body)
        if response.status_code != 200:
            raise GatewayError(
                f"{START_PATH} answered HTTP {response.status_code}: "
                f"{response.text[:200]!r}",
                status=response.status_code,
            )
        parsed = pb.StartResponse()
        try:
            parsed.ParseFromString(response.content)
        except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning
            raise GatewayError(f"{START_PATH} returned an undecodable body") from exc
        if not parsed.connection_id or not parsed.gateway_endpoint:
            raise GatewayError(f"{START_PATH} returned no connection id or gateway "
                               "endpoint")
        endpoint = self._config.gateway_url or parsed.gateway_endpoint
        return StartResult(
            connection_id=parsed.connection_id,
            gateway_endpoint=endpoint,
            gateway_group=parsed.gateway_group,
            session_token=parsed.session_token,
            sync_token=parsed.sync_token,
        )

    async def flush(self, sdk_response: bytes) -> None:
        """Persist a reply over HTTP; returns only when the API accepted it (HTTP 200)."""
        response = await self._post(FLUSH_PATH, sdk_response)
        if response.status_code != 200:
            raise GatewayError(
                f"{FLUSH_PATH} answered HTTP {response.status_code}",
                status=response.status_code,
            )
