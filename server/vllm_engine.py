"""`Engine` over vLLM's OpenAI-compatible HTTP server (`vllm serve` or its api_server module).

httpx errors and engine error statuses are translated here, once, into `server.errors` types.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from server.engine import EngineStream, GenerationKind
from server.errors import (
    EngineError,
    EngineUnavailableError,
    InvalidRequestError,
    LoragateError,
    ModelNotFoundError,
)

PATHS: dict[GenerationKind, str] = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
}
MAX_ERROR_BODY_BYTES = 64 << 10


def translate_transport_error(error: httpx.HTTPError) -> LoragateError:
    if isinstance(error, httpx.TimeoutException) and not isinstance(
        error, httpx.ConnectTimeout | httpx.PoolTimeout
    ):
        return EngineError("the engine timed out")
    if isinstance(error, httpx.TransportError):
        return EngineUnavailableError("the engine is not reachable")
    return EngineError(f"engine request failed: {type(error).__name__}")


def translate_error_status(status: int, content: bytes) -> LoragateError:
    message, param = f"the engine answered {status}", None
    try:
        error = json.loads(content[:MAX_ERROR_BODY_BYTES]).get("error", {})
        message = str(error.get("message") or message)[:2000]
        param = error.get("param") if isinstance(error.get("param"), str) else None
    except (ValueError, AttributeError):
        pass
    if status in (400, 422):
        return InvalidRequestError(message, param=param)
    if status == 404:
        return ModelNotFoundError(message, param="model")
    if status == 503:
        return EngineUnavailableError("the engine is overloaded or starting")
    return EngineError(f"the engine failed ({status})")


class HttpxEngineStream:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            raise translate_transport_error(e) from e
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


class VllmEngine:
    def __init__(self, client: httpx.AsyncClient) -> None:
        # The client carries base_url and timeouts; the app's lifespan owns and closes it.
        self._client = client

    async def health(self) -> bool:
        try:
            response = await self._client.get("/health", timeout=5)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def generate(self, kind: GenerationKind, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(PATHS[kind], json=body)
        except httpx.HTTPError as e:
            raise translate_transport_error(e) from e
        if response.status_code != 200:
            raise translate_error_status(response.status_code, response.content)
        try:
            result: dict[str, Any] = response.json()
        except ValueError as e:
            raise EngineError("the engine answered with invalid JSON") from e
        return result

    async def open_stream(self, kind: GenerationKind, body: dict[str, Any]) -> EngineStream:
        request = self._client.build_request("POST", PATHS[kind], json=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as e:
            raise translate_transport_error(e) from e
        if response.status_code != 200:
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await response.aclose()
            raise translate_error_status(response.status_code, content)
        return HttpxEngineStream(response)

    async def load_adapter(self, engine_name: str, path: str) -> None:
        body = {"lora_name": engine_name, "lora_path": path}
        response = await self._post_admin("/v1/load_lora_adapter", body)
        # After an engine restart we may reload a name it never lost (our view was stale):
        # vLLM answers 400 "has already been loaded", which is the state we wanted.
        if response.status_code == 400 and b"already been loaded" in response.content:
            return
        if response.status_code != 200:
            raise translate_error_status(response.status_code, response.content)

    async def unload_adapter(self, engine_name: str) -> None:
        response = await self._post_admin("/v1/unload_lora_adapter", {"lora_name": engine_name})
        if response.status_code not in (200, 404):
            raise translate_error_status(response.status_code, response.content)

    async def _post_admin(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return await self._client.post(path, json=body)
        except httpx.HTTPError as e:
            raise translate_transport_error(e) from e

    async def aclose(self) -> None:
        await self._client.aclose()
