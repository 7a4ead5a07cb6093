"""An engine stream is closed however its response ends, even when it never starts: otherwise
the adapter it runs on would stay pinned and its engine request keep generating."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.generation.serving import OpenStream
from server.routes.openai_api import RelayedStreamResponse


def run_response(send_fails: bool) -> list[str]:
    log: list[str] = []

    async def events() -> AsyncIterator[bytes]:
        log.append("started")
        yield b"data: [DONE]\n\n"

    async def close() -> None:
        log.append("closed")

    async def send(message: dict[str, Any]) -> None:
        if send_fails:
            raise OSError("client gone")

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    response = RelayedStreamResponse(OpenStream(events(), close))
    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    try:
        asyncio.run(response(scope, receive, send))  # type: ignore[arg-type]
    except Exception:
        log.append("raised")
    return log


def test_stream_is_closed_when_it_completes() -> None:
    assert run_response(send_fails=False) == ["started", "closed"]


def test_stream_is_closed_when_the_client_is_gone_before_the_first_byte() -> None:
    log = run_response(send_fails=True)
    assert "started" not in log and "closed" in log


@pytest.mark.parametrize("send_fails", [True, False])
def test_close_runs_exactly_once(send_fails: bool) -> None:
    assert run_response(send_fails).count("closed") == 1
