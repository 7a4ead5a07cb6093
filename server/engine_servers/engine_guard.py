"""The engine's door: an ASGI middleware that vLLM loads (`--middleware`) so that every route but
the health probes needs the secret gateways and engines share (`LORAGATE_ENGINE__API_KEY`).

vLLM's own `--api-key` guards only paths under /v1 (and a few other prefixes): /tokenize, which
resolves and loads an adapter, /metrics and the rest stay open. An engine port that other pods
reach must let nothing but the gateways in, so this guards them all.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

API_KEY_ENV = "LORAGATE_ENGINE__API_KEY"
OPEN_PATHS = frozenset({"/health", "/ping"})  # probes: kubelet sends no key
_UNAUTHORIZED = json.dumps(
    {"error": {"message": "Unauthorized", "type": "Unauthorized", "param": None, "code": 401}}
).encode()


class EngineGuard:
    def __init__(self, app: ASGIApp, api_key: str | None = None) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        if not key:
            # Refuse to start open: an engine without its key would take anyone's adapters.
            raise RuntimeError(f"{API_KEY_ENV} is not set: the engine would be open to anyone")
        self.app = app
        self._key_hash = hashlib.sha256(key.encode()).digest()

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer":
                    return False
                # Compare hashes: constant time whatever the token's length.
                return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._key_hash)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if scope["path"] in OPEN_PATHS or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        headers: list[Any] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_UNAUTHORIZED)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
