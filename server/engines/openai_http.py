"""`Engine` over an OpenAI-compatible HTTP engine server: vLLM's (`vllm serve` or its api_server
module), or any engine that speaks the same API with vLLM's runtime adapter endpoints.

The client is aiohttp: on the hot path (one streamed request per call, an event per token) it
costs half the CPU of httpx per streamed request here, which is most of what the gateway adds.
Transport errors and engine error statuses are translated here, once, into `server.errors` types;
no engine error text reaches a caller unfiltered (see `translate_error_status`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from server.engines.base import EngineLoad, EngineStream, GenerationKind, ServedModel, printable
from server.errors import (
    ContextLengthError,
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
MAX_ERROR_MESSAGE_CHARS = 500
MAX_MODEL_LIST_BYTES = 1 << 20
HEALTH_TIMEOUT_S = 5.0
MODEL_LIST_TIMEOUT_S = 5.0
MAX_METRICS_BYTES = 4 << 20
METRICS_TIMEOUT_S = 5.0
# vLLM's gauges of its own scheduler, one sample per model it serves.
RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"

# What an engine's message may say that a caller must not see: the engine-side names of adapters
# (`lg-<digest>`: whose adapter it is, and that it is loaded) and local paths (the store's layout).
_ADAPTER_ENGINE_NAME = re.compile(r"""[`'"]?\blg-[0-9a-fA-F]+\b[`'"]?""")
_LOCAL_PATH = re.compile(r"""(?<![\w.:/~-])(?:~|\.{1,2})?/[^\s'"`,;()\[\]{}<>]+""")
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]]{0,63}")


def translate_transport_error(error: BaseException) -> LoragateError:
    if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return EngineUnavailableError("the engine is not reachable")
    if isinstance(error, TimeoutError):  # a read timeout (aiohttp's are TimeoutErrors too)
        return EngineError("the engine timed out")
    if isinstance(error, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return EngineUnavailableError("the engine dropped the connection")
    return EngineError(f"engine request failed: {type(error).__name__}")


def redact_engine_message(message: str) -> str:
    """An engine's error message fit for the caller: no adapter engine names, no local paths,
    no control characters, bounded."""
    message = message[: MAX_ERROR_MESSAGE_CHARS * 4]  # bounds the regexes' work
    message = _ADAPTER_ENGINE_NAME.sub("<adapter>", message)
    message = _LOCAL_PATH.sub("<path>", message)
    return printable(message, MAX_ERROR_MESSAGE_CHARS)


def _engine_error_fields(content: bytes) -> tuple[str | None, str | None]:
    """The message and param of an OpenAI error envelope, when the body is one."""
    try:
        error = json.loads(content[:MAX_ERROR_BODY_BYTES]).get("error", {})
        message, param = error.get("message"), error.get("param")
    except (ValueError, AttributeError):
        return None, None
    message = message if isinstance(message, str) and message else None
    param = param if isinstance(param, str) and _PARAM.fullmatch(param) else None
    return message, param


def translate_error_status(status: int, content: bytes) -> LoragateError:
    """An engine error status as our error. Only a 400/422 passes the engine's message on (it is
    about the caller's request), redacted; a 404 gets our own message (vLLM's lists the names it
    serves, other tenants' adapters included); any other status never shows the engine's text."""
    if status in (400, 422):
        message, param = _engine_error_fields(content)
        text = redact_engine_message(message) if message else ""
        if not text:
            return InvalidRequestError(f"the engine refused the request ({status})", param=param)
        if "maximum context length" in text.lower():
            return ContextLengthError(text)  # the engine's param (input_tokens) is not ours
        return InvalidRequestError(text, param=param)
    if status == 404:
        return ModelNotFoundError("The model does not exist.", param="model")
    if status in (401, 403):
        # Ours to fix, not the caller's: the gateway's engine.api_key is not the engine's.
        return EngineError("the engine refused the gateway's key (engine.api_key)")
    if status == 503:
        return EngineUnavailableError("the engine is overloaded or starting")
    return EngineError(f"the engine failed ({status})")


def parse_model_list(content: bytes) -> list[ServedModel]:
    """vLLM's /v1/models answer: base models carry `max_model_len`, adapters a `parent`."""
    try:
        cards = json.loads(content)["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError("the engine's model list is not valid") from e
    if not isinstance(cards, list):
        raise EngineError("the engine's model list is not valid")
    models = []
    for card in cards:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            continue
        length, parent = card.get("max_model_len"), card.get("parent")
        valid_length = isinstance(length, int) and not isinstance(length, bool) and length > 0
        models.append(
            ServedModel(
                id=card["id"],
                max_model_len=length if valid_length else None,
                parent=parent if isinstance(parent, str) else None,
            )
        )
    return models


def parse_engine_load(text: str) -> EngineLoad | None:
    """vLLM's scheduler gauges from its /metrics exposition, summed over its models; None when
    the text is not an exposition or lacks them (another engine kind, another vLLM version)."""
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.name in (RUNNING_METRIC, WAITING_METRIC):
                totals[family.name] = sum(sample.value for sample in family.samples)
    except (ValueError, TypeError, IndexError):
        return None
    if len(totals) != 2 or any(v != v or v < 0 for v in totals.values()):  # v != v: NaN
        return None
    return EngineLoad(running=totals[RUNNING_METRIC], waiting=totals[WAITING_METRIC])


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise EngineError(f"the engine's answer is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class AiohttpEngineStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as e:
            raise translate_transport_error(e) from e
        finally:
            self._response.close()

    async def aclose(self) -> None:
        # Closing (not releasing) drops the connection, which makes vLLM abort the request.
        self._response.close()


class OpenAIHttpEngine:
    """Talks to one engine at `base_url`, sending `api_key` (the secret gateway and engines
    share) on every call. The session is made on first use, on the running event loop
    (aiohttp sessions belong to the loop they are made on)."""

    def __init__(
        self,
        base_url: str,
        request_timeout_s: float,
        connect_timeout_s: float,
        api_key: str | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=request_timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No connection cap: admission control, not the pool, decides how much reaches
            # the engine.
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                headers=self._headers,
            )
        return self._session

    async def health(self) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with self._client().get(self._base_url + "/health", timeout=timeout) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def served_models(self) -> list[ServedModel]:
        timeout = aiohttp.ClientTimeout(total=MODEL_LIST_TIMEOUT_S)
        try:
            async with self._client().get(self._base_url + "/v1/models", timeout=timeout) as r:
                status = r.status
                content = await _read_bounded(r, MAX_MODEL_LIST_BYTES)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise translate_transport_error(e) from e
        if status != 200:
            raise EngineError(f"the engine's model list answered {status}")
        return parse_model_list(content)

    async def load(self) -> EngineLoad | None:
        timeout = aiohttp.ClientTimeout(total=METRICS_TIMEOUT_S)
        try:
            async with self._client().get(self._base_url + "/metrics", timeout=timeout) as r:
                if r.status != 200:
                    return None
                content = await _read_bounded(r, MAX_METRICS_BYTES)
        except (aiohttp.ClientError, TimeoutError, EngineError):
            return None
        return parse_engine_load(content.decode("utf-8", errors="replace"))

    async def generate(self, kind: GenerationKind, body: dict[str, Any]) -> dict[str, Any]:
        status, content = await self._post(PATHS[kind], body)
        if status != 200:
            raise translate_error_status(status, content)
        try:
            result: dict[str, Any] = json.loads(content)
        except ValueError as e:
            raise EngineError("the engine answered with invalid JSON") from e
        return result

    async def open_stream(self, kind: GenerationKind, body: dict[str, Any]) -> EngineStream:
        try:
            response = await self._client().post(self._base_url + PATHS[kind], json=body)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise translate_transport_error(e) from e
        if response.status != 200:
            try:
                content = await response.content.read(MAX_ERROR_BODY_BYTES)
            except (aiohttp.ClientError, TimeoutError):
                content = b""
            finally:
                response.close()
            raise translate_error_status(response.status, content)
        return AiohttpEngineStream(response)

    async def load_adapter(self, engine_name: str, path: str | None) -> None:
        if path is None:
            # The engine fetches it from the store itself (`loragate engine`: its LoRA resolver
            # runs when a request names an adapter it does not hold). Tokenizing one character
            # is the cheapest request that does, and it answers only once the load is done.
            body: dict[str, Any] = {"model": engine_name, "prompt": "a"}
            status, content = await self._post("/tokenize", body)
            if status != 200:
                raise translate_error_status(status, content)
            return
        body = {"lora_name": engine_name, "lora_path": path}
        status, content = await self._post("/v1/load_lora_adapter", body)
        # After an engine restart we may reload a name it never lost (our view was stale):
        # vLLM answers 400 "has already been loaded", which is the state we wanted.
        if status == 400 and b"already been loaded" in content:
            return
        if status != 200:
            raise translate_error_status(status, content)

    async def unload_adapter(self, engine_name: str) -> None:
        status, content = await self._post("/v1/unload_lora_adapter", {"lora_name": engine_name})
        if status not in (200, 404):
            raise translate_error_status(status, content)

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        try:
            async with self._client().post(self._base_url + path, json=body) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise translate_transport_error(e) from e

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            await asyncio.sleep(0)  # let the connector close its transports
