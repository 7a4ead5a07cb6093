"""A deterministic fake engine that speaks the same OpenAI HTTP API as vLLM.

Shipped as real code for fast tests and for measuring the gateway alone: served from a thread of
the test process, or as a process (`python -m server.engine_servers.fake_engine --port P`),
which is what `LORAGATE_ENGINE__KIND=fake` starts. Its answer echoes the last prompt word by
word, one "token" each; knobs set the served model, latency and failures. It never stands in for
vLLM in the end-to-end tier.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class FakeEngineKnobs:
    model: str = "fake-model"  # the base model's served name
    # What /v1/models reports for the base model (None: no max_model_len, which vLLM always has).
    max_model_len: int | None = 2048
    ttft_s: float = 0.0
    token_interval_s: float = 0.0
    fail_status: int | None = None  # answer every generation request with this status
    load_s: float = 0.0  # how long an adapter load takes
    healthy: bool = True
    models_status: int | None = None  # answer /v1/models with this status instead of the list


@dataclass
class FakeEngineStats:
    generate_calls: int = 0
    model_list_calls: int = 0
    loads: int = 0
    unloads: int = 0
    # engine name -> adapter path, like vLLM's runtime-loaded LoRA table
    adapters: dict[str, str] = field(default_factory=dict)
    # requests running per engine name, and unloads that hit a busy adapter (must stay 0)
    in_flight: Counter[str] = field(default_factory=Counter)
    unloaded_while_busy: int = 0


def fake_tokens(body: dict[str, Any]) -> list[str]:
    if "messages" in body:
        last = body["messages"][-1]["content"]
        text = last if isinstance(last, str) else "".join(p["text"] for p in last)
    else:
        prompt = body["prompt"]
        text = prompt if isinstance(prompt, str) else prompt[0]
    words = ["echo:", *text.split()]
    max_tokens = int(body.get("max_tokens") or 16)
    return [w if i == 0 else f" {w}" for i, w in enumerate(words)][:max_tokens]


def _finish_reason(tokens: list[str], body: dict[str, Any]) -> str:
    return "length" if len(tokens) == int(body.get("max_tokens") or 16) else "stop"


def _usage(body: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    prompt_tokens = len(json.dumps(body.get("messages") or body.get("prompt")).split())
    completion = len(tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _chat_result(body: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(tokens)},
                "finish_reason": _finish_reason(tokens, body),
            }
        ],
        "usage": _usage(body, tokens),
    }


def _completion_result(body: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {"index": 0, "text": "".join(tokens), "finish_reason": _finish_reason(tokens, body)}
        ],
        "usage": _usage(body, tokens),
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _stream(
    body: dict[str, Any], tokens: list[str], knobs: FakeEngineKnobs
) -> AsyncIterator[bytes]:
    chat = "messages" in body
    base = {
        "id": f"fake-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body["model"],
    }
    await asyncio.sleep(knobs.ttft_s)
    if chat:
        yield _sse(
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        )
    for i, token in enumerate(tokens):
        if i:
            await asyncio.sleep(knobs.token_interval_s)
        last = i == len(tokens) - 1
        finish = _finish_reason(tokens, body) if last else None
        choice = {"delta": {"content": token}} if chat else {"text": token}
        yield _sse({**base, "choices": [{"index": 0, **choice, "finish_reason": finish}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _sse({**base, "choices": [], "usage": _usage(body, tokens)})
    yield b"data: [DONE]\n\n"


async def _counted(
    events: AsyncIterator[bytes], stats: FakeEngineStats, model: str
) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    finally:
        stats.in_flight[model] -= 1


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    error = {"message": message, "type": "fake_error", "param": param, "code": status}
    return JSONResponse({"error": error}, status_code=status)


def create_fake_engine_app(knobs: FakeEngineKnobs | None = None) -> FastAPI:
    knobs = knobs or FakeEngineKnobs()
    stats = FakeEngineStats()
    app = FastAPI(title="loragate fake engine")
    app.state.knobs = knobs
    app.state.stats = stats

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({}, status_code=200 if knobs.healthy else 503)

    @app.get("/v1/models")
    async def models() -> Any:
        stats.model_list_calls += 1
        if knobs.models_status:
            return _error(knobs.models_status, "fake failure")
        # vLLM's shape: the base model with its max_model_len, then each loaded adapter with
        # `root` (its path) and `parent` (the base model).
        card: dict[str, Any] = {"object": "model", "created": 0, "owned_by": "fake"}
        base = {**card, "id": knobs.model, "root": knobs.model, "parent": None}
        if knobs.max_model_len is not None:
            base["max_model_len"] = knobs.max_model_len
        adapters = [
            {**card, "id": name, "root": path, "parent": knobs.model}
            for name, path in stats.adapters.items()
        ]
        return {"object": "list", "data": [base, *adapters]}

    async def generate(request: Request) -> Any:
        stats.generate_calls += 1
        body = await request.json()
        if knobs.fail_status:
            return _error(knobs.fail_status, "fake failure")
        model = body.get("model")
        if model != knobs.model and model not in stats.adapters:
            # vLLM's message lists the names it serves; the adapters too, here, so a test sees
            # the gateway keep every engine-side name from the caller.
            aliases = ", ".join([knobs.model, *stats.adapters])
            message = f"The model `{model}` does not exist. Valid aliases: {aliases}."
            return _error(404, message, param="model")
        tokens = fake_tokens(body)
        if model != knobs.model:
            # An adapter's answer differs from the base's, deterministically per adapter path.
            tokens = [f"[{Path(stats.adapters[model]).name[:8]}]", *tokens][: len(tokens)]
        stats.in_flight[model] += 1
        if body.get("stream"):
            events = _stream(body, tokens, knobs)
            return StreamingResponse(_counted(events, stats, model), media_type="text/event-stream")
        try:
            await asyncio.sleep(knobs.ttft_s + knobs.token_interval_s * max(len(tokens) - 1, 0))
        finally:
            stats.in_flight[model] -= 1
        chat = "messages" in body
        return (_chat_result if chat else _completion_result)(body, tokens)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> Any:
        body = await request.json()
        if body["lora_name"] in stats.adapters:
            return _error(400, f"The lora adapter '{body['lora_name']}' has already been loaded.")
        await asyncio.sleep(knobs.load_s)
        stats.loads += 1
        stats.adapters[body["lora_name"]] = body["lora_path"]
        return PlainTextResponse("Success")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> Any:
        body = await request.json()
        if stats.in_flight[body["lora_name"]]:
            stats.unloaded_while_busy += 1
        if stats.adapters.pop(body["lora_name"], None) is None:
            return _error(404, f"The lora adapter '{body['lora_name']}' cannot be found.")
        stats.unloads += 1
        return PlainTextResponse("Success")

    app.add_api_route("/v1/chat/completions", generate, methods=["POST"])
    app.add_api_route("/v1/completions", generate, methods=["POST"])
    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="loragate's fake OpenAI-compatible engine")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    # Unset by default: a fake started for any configured context length is ready with it.
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--token-ms", type=float, default=0.0)
    args = parser.parse_args()
    knobs = FakeEngineKnobs(
        model=args.model,
        max_model_len=args.max_model_len,
        ttft_s=args.ttft_ms / 1000,
        token_interval_s=args.token_ms / 1000,
    )
    uvicorn.run(create_fake_engine_app(knobs), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
