"""The SSE relay's ends: a stream is complete only with the engine's `[DONE]`."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.errors import LoragateError
from server.generation.sse_relay import RelayOptions, relay_events


class Upstream:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        return None


async def relay(chunks: list[bytes]) -> tuple[bytes, list[LoragateError]]:
    errors: list[LoragateError] = []
    options = RelayOptions(b"lg-x", b"mine", forward_usage=False)
    events = relay_events(Upstream(chunks), options, lambda: None, lambda p, c: None, errors.append)
    return b"".join([e async for e in events]), errors


async def test_a_stream_with_its_done_ends_cleanly() -> None:
    out, errors = await relay([b'data: {"model":"lg-x"}\n\n', b"data: [DONE]\n\n"])
    assert out == b'data: {"model":"mine"}\n\ndata: [DONE]\n\n' and errors == []


async def test_a_stream_cut_between_two_events_ends_with_an_error_event() -> None:
    """The engine died between two chunks: its connection closed cleanly, but no [DONE]."""
    out, errors = await relay([b'data: {"model":"lg-x"}\n\n'])
    assert out.startswith(b'data: {"model":"mine"}\n\ndata: {"error"')
    assert len(errors) == 1 and errors[0].status_code == 503
