"""The generation service: checks a tenant's request against the model and the limits, sends it
to the engine, and hands back the result or an SSE byte stream. No FastAPI in here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from server.engine import Engine, EngineStream, GenerationKind
from server.engine_monitor import EngineMonitor
from server.errors import (
    ContextLengthError,
    EngineUnavailableError,
    InvalidRequestError,
    LoragateError,
    ModelNotFoundError,
    sse_error_event,
)
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    GenerationRequest,
    ModelCard,
    ModelList,
)
from server.settings import Settings
from server.tenants import Tenant
from server.token_count import TokenCounter

T = TypeVar("T")


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        monitor: EngineMonitor,
        metrics: Metrics,
        token_counter: TokenCounter,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._monitor = monitor
        self._metrics = metrics
        self._tokens = token_counter
        self._created = int(time.time())

    def list_models(self, tenant: Tenant) -> ModelList:
        base = ModelCard(
            id=self._settings.model.name,
            created=self._created,
            owned_by="loragate",
            max_model_len=self._settings.model.max_model_len,
        )
        return ModelList(data=[base])

    async def generate(self, tenant: Tenant, request: GenerationRequest) -> dict[str, Any]:
        kind, body = await self._prepare(tenant, request)
        return await self._call(self._engine.generate(kind, body))

    async def stream(
        self, tenant: Tenant, request: GenerationRequest, started: float
    ) -> AsyncIterator[bytes]:
        """Open the engine stream (errors raise here, before any byte is sent) and return the
        bytes as they arrive; errors after that become an in-band SSE error event."""
        kind, body = await self._prepare(tenant, request)
        upstream = await self._call(self._engine.open_stream(kind, body))
        route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        return self._relay(upstream, route, started)

    async def _relay(
        self, upstream: EngineStream, route: str, started: float
    ) -> AsyncIterator[bytes]:
        first = True
        try:
            async for chunk in upstream:
                if first:
                    self._metrics.time_to_first_token.labels(route).observe(
                        time.perf_counter() - started
                    )
                    first = False
                yield chunk
        except LoragateError as e:
            if isinstance(e, EngineUnavailableError):
                self._monitor.mark_unreachable()
            yield sse_error_event(e)
        finally:
            # Also runs when the client disconnects: closing the upstream response makes the
            # engine abort the request instead of generating for nobody.
            await upstream.aclose()

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except EngineUnavailableError:
            self._monitor.mark_unreachable()
            raise

    async def _prepare(
        self, tenant: Tenant, request: GenerationRequest
    ) -> tuple[GenerationKind, dict[str, Any]]:
        if request.model != self._settings.model.name:
            raise ModelNotFoundError(
                f"The model `{request.model}` does not exist or you do not have access to it.",
                param="model",
            )
        max_tokens = await self._check_bounds(request)
        if not self._monitor.ready:
            raise EngineUnavailableError()
        body = request.engine_body()
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = max_tokens
        kind: GenerationKind = (
            "chat" if isinstance(request, ChatCompletionRequest) else "completions"
        )
        return kind, body

    async def _check_bounds(self, request: GenerationRequest) -> int:
        """Refuse what the limits do not allow; return the max_tokens to send."""
        limits = self._settings.limits
        if (request.n or 1) > limits.max_n:
            raise InvalidRequestError(f"n must be at most {limits.max_n}", param="n")
        if len(request.stop_list()) > limits.max_stop:
            raise InvalidRequestError(f"at most {limits.max_stop} stop sequences", param="stop")
        if (
            isinstance(request, ChatCompletionRequest)
            and len(request.messages) > limits.max_messages
        ):
            raise InvalidRequestError(f"at most {limits.max_messages} messages", param="messages")
        param = (
            "max_completion_tokens"
            if (isinstance(request, ChatCompletionRequest) and request.max_completion_tokens)
            else "max_tokens"
        )
        requested = request.requested_max_tokens()
        if requested is not None and requested > limits.max_tokens:
            raise InvalidRequestError(f"{param} must be at most {limits.max_tokens}", param=param)
        max_tokens = requested or limits.default_max_tokens
        counts = await self._tokens.count(request.prompt_texts())
        # Chat messages form one prompt; a list of completion prompts is a batch of prompts.
        is_chat = isinstance(request, ChatCompletionRequest)
        prompt_tokens = (sum(counts) if is_chat else max(counts)) if counts else None
        context = self._settings.model.max_model_len
        if prompt_tokens is not None and prompt_tokens + max_tokens > context:
            prompt_param = "messages" if is_chat else "prompt"
            raise ContextLengthError(
                f"This model's maximum context length is {context} tokens; the prompt has "
                f"{prompt_tokens} and {max_tokens} more were asked for.",
                param=prompt_param,
            )
        return max_tokens
