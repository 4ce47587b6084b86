"""What a web page in the developer's browser must not be able to do to the dev gateway.

The gateway listens on this machine, and every page the developer has open can send
requests to it. Three checks, in front of every HTTP route (and the WebSocket upgrade):

* **Host**: a loopback name or any IP literal, or a name the gateway was told to accept
  (``--allow-host``, ``DevServerConfig.allowed_hosts``); anything else is 403. A page
  that rebinds its own DNS name to 127.0.0.1 (DNS rebinding) sends its own name as Host,
  so it can neither drive nor *read* the API. An IP literal cannot be rebound, so workers
  that reach a ``--host 0.0.0.0`` gateway by address keep working.
* **Origin / Referer**: when a request carries one and it is not a loopback origin
  (``http://127.0.0.1:*``, ``http://localhost:*``, ``http://[::1]:*``), 403. Browsers
  send Origin on every cross-site POST; workers and the CLI send neither.
* **Content type**: a POST whose body is not JSON or protobuf is 415. A page can POST
  ``text/plain``, form or multipart bodies (or none) to any site without asking; a JSON
  or protobuf body needs the CORS preflight, which this server never answers, so the
  browser does not send it.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from ..ops.httpserver import Handler, Request, Response

# The bodies the gateway's clients send: the CLI, the page and SDKs (JSON); workers'
# /v0/connect/start and /flush (protobuf, spelled two ways).
ACCEPTED_BODIES = ("application/json", "application/protobuf", "application/octet-stream",
                   "application/x-protobuf")
LOOPBACK_NAMES = ("localhost",)


def _hostname(authority: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the bare, lower-cased host name or address."""
    return (urlsplit(f"//{authority}").hostname or "").rstrip(".").lower()


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback_name(name: str) -> bool:
    """localhost, ``*.localhost`` (RFC 6761 resolves them to loopback) or a loopback IP."""
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    address = _ip(name)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


def host_allowed(host_header: str | None, allowed: Iterable[str] = ()) -> bool:
    """The Host header names this machine (or an address, or a name we were told)."""
    if not host_header:
        return True  # HTTP/1.0 clients; a browser always sends Host
    name = _hostname(host_header)
    if not name:
        return False
    return (is_loopback_name(name) or _ip(name) is not None
            or name in {a.rstrip(".").lower() for a in allowed})


def origin_allowed(value: str | None) -> bool:
    """No Origin/Referer (not a browser), or one served from this machine."""
    if value is None:
        return True
    parts = urlsplit(value.strip())
    return parts.scheme in ("http", "https") and is_loopback_name(
        (parts.hostname or "").rstrip(".").lower())


def body_allowed(method: str, content_type: str | None) -> bool:
    # POST is the one state-changing method a page may send cross-site without a
    # preflight (DELETE, PUT, PATCH always ask first, and are never answered).
    if method != "POST":
        return True
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media in ACCEPTED_BODIES


def refusal(method: str, headers: dict[str, str], allowed_hosts: Iterable[str]) -> str | None:
    """Why a request must be refused, or None. ``headers`` have lower-cased names."""
    if not host_allowed(headers.get("host"), allowed_hosts):
        return (f"Host {headers.get('host')!r} is not this machine; start the gateway with "
                "--allow-host NAME to accept it")
    for name in ("origin", "referer"):
        if not origin_allowed(headers.get(name)):
            return f"cross-site request refused ({name.title()} {headers.get(name)!r})"
    return None


def guard(handler: Handler, allowed_hosts: Iterable[str]) -> Handler:
    """``handler`` behind the three checks above (403 or 415 with a one-line reason)."""
    hosts = tuple(allowed_hosts)

    async def guarded(request: Request) -> Response:
        reason = refusal(request.method, request.headers, hosts)
        if reason is not None:
            return _error(403, reason)
        if not body_allowed(request.method, request.headers.get("content-type")):
            return _error(415, "send the body as application/json (a page could send "
                          f"{request.headers.get('content-type') or 'no content type'})")
        return await handler(request)

    return guarded


def _error(status: int, message: str) -> Response:
    return Response(status, json.dumps({"error": message, "status": status}).encode(),
                    "application/json")
