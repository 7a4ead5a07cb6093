"""A deterministic fake engine that speaks the same OpenAI HTTP API as vLLM.

Shipped as real code for fast tests and for measuring the gateway alone: served from a thread of
the test process, or as a process (`python -m server.engine_servers.fake_engine --port P`),
which is what `LORAGATE_ENGINE__KIND=fake` starts. Its answer echoes the last prompt word by
word, one "token" each; knobs set the served model, latency and failures. It never stands in for
vLLM in the end-to-end tier.

Optionally it costs what an engine costs (`server/engine_servers/capacity.py`: a batch whose
steps slow as it grows, a bound on the adapters running at once, loads that stall it), and
reports its load on /metrics under vLLM's names, so the gateway's routing can be watched against
engines that saturate. Like vLLM it can demand a key (`--api-key`) and load an adapter a request
names that it does not hold (`--resolve-adapters`, vLLM's LoRA resolver plugins).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import inspect
import itertools
import json
import os
import re
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.engine_servers.capacity import Capacity, Done, EngineModel
from server.engine_servers.engine_guard import API_KEY_ENV

# What vLLM's AuthenticationMiddleware guards (the rest, /health, /metrics, /tokenize, is open).
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
# The names loragate gives adapters on an engine (`lg-` and the content digest): the ones the
# fake's resolver knows how to find, as loragate's resolver plugin does.
RESOLVABLE_NAME = re.compile(r"lg-([0-9a-f]{64})")
FAKE_VOCAB = 32_000


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
    # Cost requests and loads by this model instead of token_interval_s and load_s; ttft_s then
    # only delays a request before the engine sees it. Set before the first request.
    capacity: Capacity | None = None
    api_key: str | None = None  # like vLLM's --api-key: paths under /v1 need it
    # Load an unknown `lg-<digest>` a request names before serving it, like vLLM's resolvers.
    resolve_adapters: bool = False


@dataclass
class FakeEngineStats:
    generate_calls: int = 0
    model_list_calls: int = 0
    tokenize_calls: int = 0
    loads: int = 0
    unloads: int = 0
    # engine name -> adapter path, like vLLM's runtime-loaded LoRA table
    adapters: dict[str, str] = field(default_factory=dict)
    # requests running per engine name
    in_flight: Counter[str] = field(default_factory=Counter)
    # Requests served to the end though their adapter was unloaded while they ran (must stay 0).
    # One whose caller hung up does not count: vLLM aborts it once it sees the disconnect, and
    # an unload that lands first takes nothing from it (vLLM's unload only drops the name).
    unloaded_while_busy: int = 0


@dataclass(eq=False)
class _Run:
    """One generation request while the engine runs it."""

    model: str
    unloaded_under: bool = False  # its adapter was unloaded while it ran


class _Runs:
    """The requests running, by engine name, in `stats.in_flight`; each ends served (sent in
    full) or aborted, and one served after an unload hit it counts in `unloaded_while_busy`."""

    def __init__(self, stats: FakeEngineStats) -> None:
        self._stats = stats
        self._by_model: defaultdict[str, set[_Run]] = defaultdict(set)

    def start(self, model: str) -> _Run:
        run = _Run(model)
        self._by_model[model].add(run)
        self._stats.in_flight[model] += 1
        return run

    def end(self, run: _Run, served: bool) -> None:
        self._by_model[run.model].discard(run)
        self._stats.in_flight[run.model] -= 1
        if served and run.unloaded_under:
            self._stats.unloaded_while_busy += 1

    def unloaded(self, model: str) -> None:
        for run in self._by_model[model]:
            run.unloaded_under = True


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


class CapacityRunner:
    """The capacity model run in real time on the app's event loop: a driver task, alive while
    the engine has work, sleeps until the model's step or load under way ends and hands each
    request the tokens it got."""

    def __init__(self, capacity: Capacity) -> None:
        self.model = EngineModel(capacity)
        self._ids = itertools.count()
        # Per sequence, one item per token it got: True with its last.
        self._tokens: dict[Hashable, asyncio.Queue[bool]] = {}
        self._loads: dict[Hashable, asyncio.Future[None]] = {}
        self._driver: asyncio.Task[None] | None = None

    async def ticks(
        self, adapter: str | None, prompt_tokens: int, count: int
    ) -> AsyncGenerator[None]:
        """Submit a sequence of `count` tokens; yields as each comes. Closed early: aborted."""
        seq_id = next(self._ids)
        queue: asyncio.Queue[bool] = asyncio.Queue()
        self._tokens[seq_id] = queue
        self._catch_up()
        self.model.submit(self._now(), seq_id, adapter, prompt_tokens, count)
        self._ensure_driver()
        try:
            while True:
                last = await queue.get()
                yield
                if last:
                    return
        finally:
            if self._tokens.pop(seq_id, None) is not None:
                self.model.abort(seq_id)

    async def load(self) -> None:
        """One adapter load's time, after the step under way (the batch stalls meanwhile)."""
        key = next(self._ids)
        done = self._loads[key] = asyncio.get_running_loop().create_future()
        self._catch_up()
        self.model.load(self._now(), key)
        self._ensure_driver()
        await asyncio.shield(done)  # a caller that goes away does not undo the load

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _ensure_driver(self) -> None:
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive(), name="fake-engine-capacity")

    async def _drive(self) -> None:
        try:
            while (due := self.model.next_time()) is not None:
                await asyncio.sleep(max(due - self._now(), 0))
                self._catch_up()
        finally:
            self._driver = None

    def _catch_up(self) -> None:
        """Deliver what the model finished by now (before anything changes its state)."""
        for done in self.model.advance(self._now()):
            self._deliver(done)

    def _deliver(self, done: Done) -> None:
        if done.loaded is not None:
            future = self._loads.pop(done.loaded)
            future.set_result(None)
            return
        finished = set(done.finished)
        for seq_id in done.tokens:
            queue = self._tokens.get(seq_id)
            if queue is not None:
                queue.put_nowait(seq_id in finished)
        for seq_id in done.finished:
            self._tokens.pop(seq_id, None)


async def _timed_ticks(knobs: FakeEngineKnobs, count: int) -> AsyncGenerator[None]:
    """Without a capacity model: the first token after ttft_s, then one every interval."""
    await asyncio.sleep(knobs.ttft_s)
    for i in range(count):
        if i:
            await asyncio.sleep(knobs.token_interval_s)
        yield


async def _modelled_ticks(
    knobs: FakeEngineKnobs,
    runner: CapacityRunner,
    adapter: str | None,
    body: dict[str, Any],
    count: int,
) -> AsyncGenerator[None]:
    """With a capacity model: ttft_s on the way in, then the engine's batch sets the pace."""
    await asyncio.sleep(knobs.ttft_s)
    prompt_tokens = len(_prompt_text(body).split())
    async with contextlib.aclosing(runner.ticks(adapter, prompt_tokens, count)) as ticks:
        async for tick in ticks:
            yield tick


async def _stream(
    body: dict[str, Any], tokens: list[str], ticks: AsyncGenerator[None]
) -> AsyncIterator[bytes]:
    chat = "messages" in body
    base = {
        "id": f"fake-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body["model"],
    }
    async with contextlib.aclosing(ticks):
        i = 0
        async for _ in ticks:
            if i == 0 and chat:
                role = {"role": "assistant", "content": ""}
                yield _sse({**base, "choices": [{"index": 0, "delta": role}]})
            last = i == len(tokens) - 1
            finish = _finish_reason(tokens, body) if last else None
            choice = {"delta": {"content": tokens[i]}} if chat else {"text": tokens[i]}
            yield _sse({**base, "choices": [{"index": 0, **choice, "finish_reason": finish}]})
            i += 1
    if (body.get("stream_options") or {}).get("include_usage"):
        yield _sse({**base, "choices": [], "usage": _usage(body, tokens)})
    yield b"data: [DONE]\n\n"


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` unless the client disconnects first (then cancel it and return False), as
    vLLM's `with_cancellation` aborts a non-streamed request whose client went away."""

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()  # its error, if it failed
    return True


class _ClosingStreamingResponse(StreamingResponse):
    """Closes its body when the response ends, a client disconnect included: Starlette then
    cancels the send loop and leaves the generator suspended until it is garbage collected,
    so its `finally` (the in-flight count) would run late, long after vLLM aborts a request."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            body = self.body_iterator
            if inspect.isasyncgen(body):
                await body.aclose()


async def _counted(events: AsyncIterator[bytes], runs: _Runs, run: _Run) -> AsyncIterator[bytes]:
    served = False
    try:
        async for event in events:
            yield event
        served = True
    finally:
        runs.end(run, served)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    error = {"message": message, "type": "fake_error", "param": param, "code": status}
    return JSONResponse({"error": error}, status_code=status)


class ApiKeyGuard:
    """vLLM's AuthenticationMiddleware: under GUARDED_PREFIXES, `Authorization: Bearer <key>`
    or 401 with vLLM's body, `{"error": "Unauthorized"}`. Reads the knob on every request;
    without a key, it lets everything through."""

    def __init__(self, app: ASGIApp, knobs: FakeEngineKnobs) -> None:
        self.app = app
        self._knobs = knobs

    def _authorized(self, scope: Scope, key: str) -> bool:
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = hashlib.sha256(token.encode()).digest()
        return hmac.compare_digest(presented, hashlib.sha256(key.encode()).digest())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self._knobs.api_key
        if key and scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path.startswith(GUARDED_PREFIXES) and not self._authorized(scope, key):
                response = JSONResponse({"error": "Unauthorized"}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _prompt_text(body: dict[str, Any]) -> str:
    """Every word a /tokenize body holds: its prompt, or its messages' text."""
    if "messages" in body:
        parts = []
        for message in body["messages"]:
            content = message.get("content") or ""
            parts.append(
                content if isinstance(content, str) else " ".join(p["text"] for p in content)
            )
        return " ".join(parts)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(prompt)


def _metrics_text(model: str, running: int, waiting: int) -> str:
    labels = f'{{model_name="{model}",engine="0"}}'
    gauges = [
        ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
    ]
    lines = []
    for name, help_text, value in gauges:
        lines += [
            f"# HELP {name} {help_text}",
            f"# TYPE {name} gauge",
            f"{name}{labels} {value:.1f}",
        ]
    return "\n".join(lines) + "\n"


def create_fake_engine_app(knobs: FakeEngineKnobs | None = None) -> FastAPI:
    knobs = knobs or FakeEngineKnobs()
    stats = FakeEngineStats()
    app = FastAPI(title="loragate fake engine")
    app.state.knobs = knobs
    app.state.stats = stats
    runs = _Runs(stats)
    app.add_middleware(ApiKeyGuard, knobs=knobs)
    runners: dict[Capacity, CapacityRunner] = {}
    # One resolution per name at a time, as vLLM's: requests naming it together load it once.
    resolving: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def runner() -> CapacityRunner | None:
        if knobs.capacity is None:
            return None
        if (found := runners.get(knobs.capacity)) is None:
            found = runners[knobs.capacity] = CapacityRunner(knobs.capacity)
        return found

    async def load(name: str, path: str) -> None:
        if (capacity := runner()) is not None:
            await capacity.load()
        else:
            await asyncio.sleep(knobs.load_s)
        stats.loads += 1
        stats.adapters[name] = path

    async def served(model: Any) -> bool:
        """Whether `model` is served here, once a resolver has loaded it if it may."""
        if model == knobs.model or model in stats.adapters:
            return True
        found = RESOLVABLE_NAME.fullmatch(model) if isinstance(model, str) else None
        if not knobs.resolve_adapters or found is None:
            return False
        async with resolving[model]:
            if model not in stats.adapters:
                await load(model, found.group(1))  # loragate's resolver finds it by digest
        return True

    def not_found(model: Any) -> JSONResponse:
        # vLLM's message lists the names it serves; the adapters too, here, so a test sees
        # the gateway keep every engine-side name from the caller.
        aliases = ", ".join([knobs.model, *stats.adapters])
        message = f"The model `{model}` does not exist. Valid aliases: {aliases}."
        return _error(404, message, param="model")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({}, status_code=200 if knobs.healthy else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        # A request the engine has and is not running waits (in the model's line, or in
        # ttft_s before it reaches it).
        in_flight = sum(stats.in_flight.values())
        running = capacity.model.running if (capacity := runner()) is not None else in_flight
        text = _metrics_text(knobs.model, running, max(in_flight - running, 0))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

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

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        stats.tokenize_calls += 1
        body = await request.json()
        model = body.get("model")
        if model is not None and not await served(model):
            return not_found(model)
        words = _prompt_text(body).split()
        return {
            "count": len(words),
            "max_model_len": knobs.max_model_len,
            "tokens": [zlib.crc32(w.encode()) % FAKE_VOCAB for w in words],
            "token_strs": words if body.get("return_token_strs") else None,
        }

    async def generate(request: Request) -> Any:
        stats.generate_calls += 1
        body = await request.json()
        if knobs.fail_status:
            return _error(knobs.fail_status, "fake failure")
        model = body.get("model")
        if not await served(model):
            return not_found(model)
        tokens = fake_tokens(body)
        adapter = None if model == knobs.model else model
        if adapter is not None:
            # An adapter's answer differs from the base's, deterministically per adapter path.
            tokens = [f"[{Path(stats.adapters[adapter]).name[:8]}]", *tokens][: len(tokens)]
        run = runs.start(model)
        capacity = runner()
        if body.get("stream"):
            ticks = _timed_ticks(knobs, len(tokens))
            if capacity is not None:
                ticks = _modelled_ticks(knobs, capacity, adapter, body, len(tokens))
            events = _stream(body, tokens, ticks)
            return _ClosingStreamingResponse(
                _counted(events, runs, run), media_type="text/event-stream"
            )

        async def compute() -> None:
            if capacity is not None:
                ticks = _modelled_ticks(knobs, capacity, adapter, body, len(tokens))
                async with contextlib.aclosing(ticks):
                    async for _ in ticks:
                        pass
            else:
                await asyncio.sleep(knobs.ttft_s + knobs.token_interval_s * max(len(tokens) - 1, 0))

        answered = False
        try:
            if not await _unless_disconnected(request, compute()):
                return PlainTextResponse("client disconnected", status_code=499)
            answered = True
        finally:
            runs.end(run, answered)
        chat = "messages" in body
        return (_chat_result if chat else _completion_result)(body, tokens)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request) -> Any:
        body = await request.json()
        if body["lora_name"] in stats.adapters:
            return _error(400, f"The lora adapter '{body['lora_name']}' has already been loaded.")
        await load(body["lora_name"], body["lora_path"])
        return PlainTextResponse("Success")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request) -> Any:
        body = await request.json()
        if stats.adapters.pop(body["lora_name"], None) is None:
            return _error(404, f"The lora adapter '{body['lora_name']}' cannot be found.")
        runs.unloaded(body["lora_name"])
        stats.unloads += 1
        return PlainTextResponse("Success")

    app.add_api_route("/v1/chat/completions", generate, methods=["POST"])
    app.add_api_route("/v1/completions", generate, methods=["POST"])
    return app


def parse_knobs(argv: list[str] | None = None) -> tuple[argparse.Namespace, FakeEngineKnobs]:
    parser = argparse.ArgumentParser(description="loragate's fake OpenAI-compatible engine")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="fake-model")
    # Unset by default: a fake started for any configured context length is ready with it.
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--token-ms", type=float, default=0.0)
    parser.add_argument("--load-ms", type=float, default=0.0, help="one adapter load")
    parser.add_argument(
        "--api-key",
        # How loragate hands an engine its key: in the environment, never on a command line.
        default=os.environ.get(API_KEY_ENV),
        help=f"like vLLM's: /v1 paths need it (default: ${API_KEY_ENV})",
    )
    parser.add_argument(
        "--resolve-adapters",
        action="store_true",
        help="load an unknown lg-<digest> a request names, like vLLM's LoRA resolvers",
    )
    # Any of these turns the capacity model on, --token-ms its decode step and --load-ms its
    # load; those not given keep the model's defaults.
    model = parser.add_argument_group("capacity model (server/engine_servers/capacity.py)")
    model.add_argument("--max-batch", type=int, help="sequences running at once")
    model.add_argument("--batch-growth", type=float, help="step slowdown per one more running")
    model.add_argument("--lora-slots", type=int, help="adapters running at once (--max-loras)")
    args = parser.parse_args(argv)
    sizes = ("max_batch", "batch_growth", "lora_slots")
    given = {name: getattr(args, name) for name in sizes if getattr(args, name) is not None}
    capacity = None
    if given:
        capacity = Capacity(token_s=args.token_ms / 1000, load_s=args.load_ms / 1000, **given)
    knobs = FakeEngineKnobs(
        model=args.model,
        max_model_len=args.max_model_len,
        ttft_s=args.ttft_ms / 1000,
        token_interval_s=args.token_ms / 1000,
        load_s=args.load_ms / 1000,
        capacity=capacity,
        api_key=args.api_key,
        resolve_adapters=args.resolve_adapters,
    )
    return args, knobs


def main() -> None:
    import uvicorn

    args, knobs = parse_knobs()
    uvicorn.run(create_fake_engine_app(knobs), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
