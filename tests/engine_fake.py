"""An in-process `Engine`: no network, no server, just what the gateway sees of an engine.

`FakeEngine` implements the whole `server.engines.base.Engine` protocol, so it goes wherever an
engine does (AdapterSlots, EngineMonitor, an EnginePool member) with no `type: ignore`. It
behaves as the HTTP client does in front of vLLM:

- `healthy=False`: `/health` fails (`health()` is False); everything else still answers.
- `reachable=False`: the engine is gone. `health()` is False (the client never raises there)
  and every other call raises `EngineUnavailableError`, a stream already open included.
- `load_s`: how long an adapter load takes; `fail_loads`: loads fail (`EngineError`) after it.
- A model the engine does not serve is a `ModelNotFoundError` (vLLM's 404).

`events` records what the engine was asked to do, in order: `"load <name>"`, `"unload <name>"`,
`"generate <model>"`, `"stream <model>"`; `generations` counts the last two by model. `adapters`
is the engine's own table of loaded adapters (name -> path): a test that clears it plays an
engine restart.

`fake_member` builds a pool member around one, as `server.app.member_factory` does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.engines.adapter_slots import ENGINE_NAME_PREFIX, AdapterSlots
from server.engines.admission import EngineAdmission
from server.engines.base import Engine, EngineLoad, EngineStream, GenerationKind, ServedModel
from server.engines.monitor import EngineMonitor
from server.engines.pool import EngineMember, adapters_listed
from server.errors import EngineError, EngineUnavailableError, ModelNotFoundError
from server.metrics import Metrics
from server.settings import AdmissionSettings, EngineSettings, ModelSettings

MODEL = "test-model"
ANSWER = "fake answer"  # what every generation says; the `model` field echoes the request's


@dataclass
class FakeEngine:
    model: str = MODEL  # the base model's served name
    max_model_len: int | None = 2048  # what the model list reports for it
    healthy: bool = True
    reachable: bool = True
    load_s: float = 0.0
    fail_loads: bool = False
    adapters: dict[str, str | None] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    closed: bool = False
    # What `load()` reports (the engine's own running/waiting counts); None: it reports none.
    reported_load: EngineLoad | None = None

    @property
    def loaded(self) -> set[str]:
        """The engine-side names of the adapters the engine holds."""
        return set(self.adapters)

    @property
    def generations(self) -> Counter[str]:
        """Generation requests (plain and streamed) by the model they named."""
        kinds = ("generate ", "stream ")
        return Counter(e.split(" ", 1)[1] for e in self.events if e.startswith(kinds))

    def _check_reachable(self) -> None:
        if not self.reachable:
            raise EngineUnavailableError("the engine is not reachable")

    async def health(self) -> bool:
        return self.reachable and self.healthy

    async def served_models(self) -> list[ServedModel]:
        self._check_reachable()
        base = ServedModel(self.model, self.max_model_len)
        return [base, *(ServedModel(name, parent=self.model) for name in self.adapters)]

    async def load(self) -> EngineLoad | None:
        return self.reported_load if self.reachable else None

    def _start(self, kind: str, body: dict[str, Any]) -> str:
        self._check_reachable()
        model = str(body.get("model"))
        if model != self.model and model not in self.adapters:
            raise ModelNotFoundError("The model does not exist.", param="model")
        self.events.append(f"{kind} {model}")
        return model

    async def generate(self, kind: GenerationKind, body: dict[str, Any]) -> dict[str, Any]:
        model = self._start("generate", body)
        text = ANSWER
        usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
        if kind == "chat":
            message = {"role": "assistant", "content": text}
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop"}
            obj = "text_completion"
        created = int(time.time())
        return {
            "id": "fake-1", "object": obj, "created": created, "model": model,
            "choices": [choice], "usage": usage,
        }  # fmt: skip

    async def open_stream(self, kind: GenerationKind, body: dict[str, Any]) -> EngineStream:
        model = self._start("stream", body)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return FakeStream(self, kind == "chat", model, usage)

    async def load_adapter(self, engine_name: str, path: str | None) -> None:
        self._check_reachable()
        await asyncio.sleep(self.load_s)
        self._check_reachable()  # gone while loading
        if self.fail_loads:
            raise EngineError("the engine failed (500)")
        self.adapters[engine_name] = path
        self.events.append(f"load {engine_name}")

    async def unload_adapter(self, engine_name: str) -> None:
        self._check_reachable()
        self.adapters.pop(engine_name, None)
        self.events.append(f"unload {engine_name}")

    async def aclose(self) -> None:
        self.closed = True


class FakeStream:
    """vLLM's SSE: a role chunk (chat), a content chunk, a finish chunk, the usage chunk when
    asked for, then `[DONE]`. The engine going unreachable drops it mid-way."""

    def __init__(self, engine: FakeEngine, chat: bool, model: str, usage: bool) -> None:
        self._engine = engine
        self._chat = chat
        self._model = model
        self._usage = usage
        self.closed = False

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        payload = {"id": "fake-1", "object": obj, "created": 0, "model": self._model}
        return f"data: {json.dumps({**payload, 'choices': choices, **extra})}\n\n".encode()

    def _choice(self, text: str, finish: str | None) -> dict[str, Any]:
        if self._chat:
            return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
        return {"index": 0, "text": text, "finish_reason": finish}

    async def __aiter__(self) -> AsyncIterator[bytes]:
        events = [self._event([self._choice(ANSWER, None)])]
        if self._chat:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            events.insert(0, self._event([role]))
        events.append(self._event([self._choice("", "stop")]))
        if self._usage:
            usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
            events.append(self._event([], usage=usage))
        events.append(b"data: [DONE]\n\n")
        for event in events:
            if self.closed:
                return
            await asyncio.sleep(0)
            if not self._engine.reachable:
                raise EngineUnavailableError("the engine dropped the connection")
            yield event

    async def aclose(self) -> None:
        self.closed = True


def fake_member(
    name: str,
    url: str,
    engine: Engine,
    metrics: Metrics,
    *,
    capacity: int = 2,
    max_running: int = 4,
    wait_for_slot_s: float = 5.0,
    adapter_path: Callable[[str], str | None] = lambda digest: f"/store/{digest}",
) -> EngineMember:
    """The pool member for `engine`, wired as `server.app.member_factory` wires one: real
    slots, monitor (polling once a minute: tests call `check_now`) and admission queue."""
    slots = AdapterSlots(engine, adapter_path, capacity, metrics, wait_for_slot_s, name)
    monitor = EngineMonitor(
        engine,
        EngineSettings(health_interval_s=60),
        ModelSettings(name=MODEL, max_model_len=2048),
        metrics,
        name=name,
        on_down=slots.forget_all,
        on_models=lambda served: slots.reconcile(adapters_listed(served, ENGINE_NAME_PREFIX)),
    )
    admission = EngineAdmission(
        AdmissionSettings(max_running=max_running, max_queued=8, queue_timeout_s=5), metrics, name
    )
    return EngineMember(name, url, engine, monitor, slots, admission)
