"""The one seam between the gateway and an inference engine.

Every engine kind (vLLM with many adapters, a merged-model engine, the fake) speaks the OpenAI HTTP
API, so the gateway treats them alike through this protocol. Implementations raise only
`server.errors` types: foreign exceptions are translated at the implementation's boundary.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

GenerationKind = Literal["chat", "completions"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def printable(text: str, limit: int) -> str:
    """Engine-supplied text made fit to show a caller or a log: control characters (newlines
    included, so a log line stays one line) become a space, and it is cut to `limit`."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


@dataclass(frozen=True)
class ServedModel:
    """One entry of the engine's model list. `parent` is set for an adapter (the base model it
    runs on), None for a base model; `max_model_len` is None when the engine reports none."""

    id: str
    max_model_len: int | None = None
    parent: str | None = None


@dataclass(frozen=True)
class EngineLoad:
    """What the engine itself reports it is running and holding in its own queue (vLLM's
    `num_requests_running` / `num_requests_waiting`), over every gateway that sends to it."""

    running: float
    waiting: float


class EngineStream(Protocol):
    """An open streaming response: raw SSE bytes as the engine sends them."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    async def health(self) -> bool: ...

    async def served_models(self) -> list[ServedModel]:
        """What the engine serves now, base models and loaded adapters; raises an
        `EngineUnavailableError` or `EngineError` when the list cannot be read."""
        ...

    async def load(self) -> EngineLoad | None:
        """The engine's own report of its load; None when it reports none that can be read."""
        ...

    async def generate(self, kind: GenerationKind, body: dict[str, Any]) -> dict[str, Any]: ...

    async def open_stream(self, kind: GenerationKind, body: dict[str, Any]) -> EngineStream:
        """Send a streaming request; raises before returning if the engine refuses it."""
        ...

    async def load_adapter(self, engine_name: str, path: str | None) -> None:
        """Make the adapter at `path` servable as model `engine_name`, or with no path, the
        adapter the engine finds under that name in the store; loading a name that is already
        loaded is not an error."""
        ...

    async def unload_adapter(self, engine_name: str) -> None:
        """Stop serving `engine_name`; unloading a name the engine does not know is not an error."""
        ...

    async def aclose(self) -> None: ...
