"""Who may talk to the server: the API key on every route, and the bind rule.

* With a key set, every request except ``GET /health`` must carry it, as
  ``Authorization: Bearer KEY`` (API clients) or HTTP Basic auth with KEY as the
  password (so a browser can open the chat page at ``/``: it asks for the
  password once and then sends it with every same-origin request). The key is
  compared in constant time. Refusals are 401 with an OpenAI-style error body.
* ``check_bind(host, key)``: the server binds loopback unless told otherwise,
  and refuses any other address (``0.0.0.0``, ``::``, a LAN address, a host
  name) without a key - unlike engines that listen everywhere with no key.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from corpusfactory.errors import CorpusFactoryError

OPEN_PATHS = frozenset({"/health"})
REALM = "corpusfactory"


class UnsafeBindError(CorpusFactoryError):
    """A non-loopback address was asked for without an API key."""


def is_loopback(host: str) -> bool:
    """True only for 127.0.0.0/8, ::1 (also IPv4-mapped) and the name ``localhost``."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False  # another host name may resolve to any interface
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def check_bind(host: str, api_key: str | None) -> None:
    """Raise UnsafeBindError for a non-loopback host without an API key."""
    if not is_loopback(host) and not api_key:
        raise UnsafeBindError(
            f"refusing to listen on {host!r} without an API key: anyone who can reach it "
            "could use the model. Set serving.api_key (CORPUSFACTORY_SERVING__API_KEY) "
            "or bind 127.0.0.1"
        )


def _same(given: str, key: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8"))


def authorized(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries ``key`` (Bearer, or Basic password)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return _same(value, key)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return _same(decoded.partition(":")[2], key)
    return False


class APIKeyMiddleware:
    """Refuses every request without the key, except on OPEN_PATHS."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.api_key is None
            or scope["type"] not in ("http", "websocket")
            or (scope["type"] == "http" and scope["path"] in OPEN_PATHS)
            or authorized(Headers(scope=scope).get("authorization"), self.api_key)
        ):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": {
                    "message": "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        # Basic lets a browser prompt for the key when it opens the chat page.
        challenge = f'Basic realm="{REALM}", charset="UTF-8"'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", challenge.encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
