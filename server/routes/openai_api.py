"""Tenant routes of the OpenAI API: parse, authorize, call the generation service, render."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server import openapi as doc
from server.cache.policy import CACHE_HEADER, CacheDirectives
from server.deps import ServicesDep, TenantDep, parse_body
from server.generation.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    ModelList,
)
from server.generation.serving import OpenStream
from server.middleware import CLIENT_CLOSED_REQUEST

T = TypeVar("T")

router = APIRouter(prefix="/v1", responses=doc.errors(401, 403))

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Generation can fail every way a request can: bad body, unknown model, limits, the engine.
GENERATION_ERRORS = doc.errors(400, 404, 413, 415, 429, 502, 503)


@router.get("/models", openapi_extra=doc.TENANT_AUTH)
@router.head("/models", openapi_extra=doc.TENANT_AUTH)
async def list_models(tenant: TenantDep, services: ServicesDep) -> ModelList:
    return await services.generation.list_models(tenant)


@router.post(
    "/chat/completions",
    response_model=None,
    responses=doc.generation_ok(doc.ChatCompletion) | GENERATION_ERRORS,
    openapi_extra=doc.TENANT_AUTH | doc.json_body(ChatCompletionRequest),
)
async def chat_completions(request: Request, tenant: TenantDep, services: ServicesDep) -> Response:
    started = time.perf_counter()
    body = await parse_body(request, ChatCompletionRequest)
    return await _generate(request, services, tenant, body, started)


@router.post(
    "/completions",
    response_model=None,
    responses=doc.generation_ok(doc.Completion) | GENERATION_ERRORS,
    openapi_extra=doc.TENANT_AUTH | doc.json_body(CompletionRequest),
)
async def completions(request: Request, tenant: TenantDep, services: ServicesDep) -> Response:
    started = time.perf_counter()
    body = await parse_body(request, CompletionRequest)
    return await _generate(request, services, tenant, body, started)


async def _generate(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    body: GenerationRequest,
    started: float,
) -> Response:
    directives = CacheDirectives.from_header(request.headers.get("cache-control"))
    generation = services.generation
    if body.stream:
        # The set-up (queue, adapter slot, adapter load) can take a while: a client gone
        # meanwhile gives up its place. Once the response starts, Starlette notices instead.
        setup = generation.stream(tenant, body, started, directives)
        stream = await _unless_disconnected(request, setup, discard=_close_stream)
        if stream is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return RelayedStreamResponse(stream)
    result = await _unless_disconnected(request, generation.generate(tenant, body, directives))
    if result is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(
        result.content, media_type="application/json", headers={CACHE_HEADER: result.cache}
    )


class RelayedStreamResponse(StreamingResponse):
    """SSE relayed from the engine; the engine stream is closed however the response ends
    (finished, client gone, or never started)."""

    def __init__(self, stream: OpenStream) -> None:
        headers = {**SSE_HEADERS, CACHE_HEADER: stream.cache}
        super().__init__(stream.events, media_type="text/event-stream", headers=headers)
        self._close = stream.close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


async def _unless_disconnected(
    request: Request,
    work: Awaitable[T],
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> T | None:
    """Run `work`; if the client disconnects first, cancel it (and so whatever it holds or
    waits for) and return None. A result that arrives anyway, `work` finishing as it was
    cancelled, is handed to `discard`: nobody will use it, and it may hold resources."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(request))
    abandoned = False
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this request is cancelled itself: the work must not outlive it.
        watch_task.cancel()
        if not work_task.done():
            abandoned = True
            work_task.cancel()
            await asyncio.wait({work_task})
            if discard is not None and not work_task.cancelled() and work_task.exception() is None:
                await discard(work_task.result())
    if abandoned and work_task.cancelled():
        return None
    result = work_task.result()  # the work's own error is raised here, as usual
    return None if abandoned else result


async def _close_stream(stream: OpenStream) -> None:
    await stream.close()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
