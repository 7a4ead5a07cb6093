"""The one seam between the gateway and an inference engine.

Every engine kind (vLLM with many adapters, a merged-model engine, the fake) speaks the OpenAI HTTP
API, so the gateway treats them alike through this protocol. Implementations raise only
`server.errors` types: foreign exceptions are translated at the implementation's boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

GenerationKind = Literal["chat", "completions"]


class EngineStream(Protocol):
    """An open streaming response: raw SSE bytes as the engine sends them."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Engine(Protocol):
    async def health(self) -> bool: ...

    async def generate(self, kind: GenerationKind, body: dict[str, Any]) -> dict[str, Any]: ...

    async def open_stream(self, kind: GenerationKind, body: dict[str, Any]) -> EngineStream:
        """Send a streaming request; raises before returning if the engine refuses it."""
        ...

    async def load_adapter(self, engine_name: str, path: str) -> None:
        """Make the adapter at `path` servable as model `engine_name`; loading a name that is
        already loaded is not an error."""
        ...

    async def unload_adapter(self, engine_name: str) -> None:
        """Stop serving `engine_name`; unloading a name the engine does not know is not an error."""
        ...

    async def aclose(self) -> None: ...
