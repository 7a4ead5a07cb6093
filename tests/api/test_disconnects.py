"""A client that goes away loses nothing for anyone else: whether it leaves while queued for the
engine, while its adapter loads, or mid-stream, what it held is released at once and the
requests sharing its work still get their answers. Real client sockets, closed for real, against
the gateway served by uvicorn (lifespan on) in front of the fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from adapters.types import CONFIG_FILE, WEIGHTS_FILE
from server.app import create_app
from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.engines.adapter_slots import engine_name
from server.generation.serving import OpenStream
from server.routes.openai_api import _close_stream, _unless_disconnected
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import engine_at, make_settings, serving
from tests.api.test_openai_routes import chat_body, sse_events
from tests.support import ADMIN_KEY, TENANT_KEYS

CHAT = "/v1/chat/completions"
TENANT = {"Authorization": f"Bearer {TENANT_KEYS['acme']}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class Served:
    url: str
    app: FastAPI
    fake: FastAPI

    def sample(self, name: str, labels: dict[str, str]) -> float:
        value = self.app.state.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else float(value)

    @property
    def queued(self) -> float:
        return self.sample("loragate_engine_queue_depth", {"engine": "local"})

    @property
    def running(self) -> float:
        return self.sample("loragate_engine_requests_running", {"engine": "local"})

    @property
    def in_flight(self) -> float:
        return self.sample("loragate_requests_in_flight", {"route": CHAT})

    @property
    def stats(self) -> Any:
        return self.fake.state.stats


@pytest.fixture
def max_running() -> int:
    return 1  # admission: one request on the engine at a time, the rest queued


@pytest.fixture
def served(tmp_path: Path, knobs: FakeEngineKnobs, max_running: int) -> Iterator[Served]:
    # One adapter slot and a short slot wait: a pin left behind shows as a 503 for the next one.
    settings = make_settings(
        tmp_path,
        engine={"health_interval_s": 0.2, "max_loras": 1},
        max_loaded_adapters=1,
        adapters={"max_upload_bytes": 8 << 20, "wait_for_slot_s": 2},
        admission={"max_running": max_running, "max_queued": 4, "queue_timeout_s": 30},
    )
    fake = create_fake_engine_app(knobs)
    with serving(fake) as fake_url:
        app = create_app(settings, engine=engine_at(fake_url))
        with serving(app, lifespan=True) as url:
            yield Served(url, app, fake)


@pytest.fixture
def adapter_dirs(tmp_path: Path) -> list[Path]:
    return [write_peft_adapter(tmp_path / f"a{i}", seed=i) for i in range(2)]


async def upload(served: Served, directory: Path, name: str) -> str:
    files = {
        "adapter_config": (CONFIG_FILE, (directory / CONFIG_FILE).read_bytes()),
        "adapter_model": (WEIGHTS_FILE, (directory / WEIGHTS_FILE).read_bytes()),
    }
    url = f"{served.url}/admin/v1/tenants/acme/adapters/{name}"
    async with httpx.AsyncClient() as client:
        response = await client.put(url, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text
    digest: str = response.json()["digest"]
    return digest


@contextlib.asynccontextmanager
async def raw_request(served: Served, body: dict[str, Any]) -> AsyncIterator[asyncio.StreamReader]:
    """POST `body` on a socket of our own; leaving the block closes it: the client is gone."""
    where = urlsplit(served.url)
    assert where.hostname is not None and where.port is not None
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    payload = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        f"Authorization: {TENANT['Authorization']}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    writer.write(head.encode() + payload)
    await writer.drain()
    try:
        yield reader
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@dataclass
class Answer:
    status: int
    text: str
    first_byte_at: float
    done_at: float


async def ask(served: Served, body: dict[str, Any]) -> Answer:
    async with (
        httpx.AsyncClient(base_url=served.url, timeout=30) as client,
        client.stream("POST", CHAT, json=body, headers=TENANT) as response,
    ):
        first_byte_at = 0.0
        chunks = []
        async for chunk in response.aiter_text():
            first_byte_at = first_byte_at or time.monotonic()
            chunks.append(chunk)
        return Answer(response.status_code, "".join(chunks), first_byte_at, time.monotonic())


async def eventually(condition: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def slow_body(words: int, **extra: object) -> dict[str, Any]:
    return chat_body(" ".join(f"w{i}" for i in range(words)), **extra)


async def test_a_stream_whose_client_leaves_while_queued_gives_up_its_place(
    served: Served, knobs: FakeEngineKnobs
) -> None:
    knobs.token_interval_s = 0.1
    first = asyncio.create_task(ask(served, slow_body(25, stream=True)))  # ~2.5 s on the engine
    assert await eventually(lambda: served.running == 1, 5)
    async with raw_request(served, slow_body(3, stream=True)):
        assert await eventually(lambda: served.queued == 1, 5)
    assert await eventually(lambda: served.queued == 0, 1.0), "still queued after leaving"
    assert not first.done()  # the place was given up, not reached
    third = asyncio.create_task(ask(served, slow_body(3, stream=True)))
    assert await eventually(lambda: served.queued == 1, 5)
    first_answer, third_answer = await asyncio.gather(first, third)
    assert first_answer.status == third_answer.status == 200
    assert sse_events(third_answer.text)[-1] == "[DONE]"
    # The third went next: nothing ran on the engine for the client that left.
    assert third_answer.first_byte_at - first_answer.done_at < 1.0
    assert served.stats.generate_calls == 2
    assert await eventually(lambda: served.running == served.queued == served.in_flight == 0, 2)


@pytest.mark.parametrize("max_running", [4])  # they all reach the adapter load together
@pytest.mark.parametrize("leaver_streams", [False, True], ids=["leaver-json", "leaver-stream"])
async def test_a_client_leaving_during_its_adapter_load_fails_no_one_else(
    served: Served, knobs: FakeEngineKnobs, adapter_dirs: list[Path], leaver_streams: bool
) -> None:
    digest = await upload(served, adapter_dirs[0], "helper")
    knobs.load_s = 1.5
    body = {**chat_body("one two three"), "model": "helper"}
    async with raw_request(served, {**body, "stream": leaver_streams}):
        await asyncio.sleep(0.3)  # its request started the load
        others = [
            asyncio.create_task(ask(served, {**body, "stream": streams}))
            for streams in (False, True, False)
        ]
        await asyncio.sleep(0.3)  # they wait for the same load
    answers = await asyncio.gather(*others)
    assert [a.status for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert sse_events(answers[1].text)[-1] == "[DONE]"
    assert json.loads(answers[0].text)["model"] == "helper"
    assert served.stats.loads == 1
    assert await eventually(lambda: served.running == served.in_flight == 0, 2)
    await assert_adapter_unpinned(served, adapter_dirs[1], digest)


async def test_a_client_leaving_mid_stream_releases_everything(
    served: Served, knobs: FakeEngineKnobs, adapter_dirs: list[Path]
) -> None:
    digest = await upload(served, adapter_dirs[0], "helper")
    knobs.token_interval_s = 0.2
    async with raw_request(served, {**slow_body(30, stream=True), "model": "helper"}) as reader:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        assert b"data: " in await asyncio.wait_for(reader.read(4096), 5)  # the first event
        assert served.stats.in_flight[engine_name(digest)] == 1
    # Not the ~6 s the stream would have taken: the engine request is aborted, the slot freed.
    assert await eventually(lambda: served.running == served.in_flight == 0, 1.5)
    assert await eventually(lambda: served.stats.in_flight[engine_name(digest)] == 0, 1.5)
    # Counted as the client's abort, not as a 200 it never got in full.
    assert served.sample("loragate_requests_total", {"route": CHAT, "status": "499"}) == 1
    assert served.sample("loragate_requests_total", {"route": CHAT, "status": "200"}) == 0
    await assert_adapter_unpinned(served, adapter_dirs[1], digest)


async def assert_adapter_unpinned(served: Served, other: Path, digest: str) -> None:
    """The one adapter slot is free for another adapter: `digest` is no longer pinned (a pin
    would keep it loaded, and the newcomer would get 503 after the slot wait)."""
    await upload(served, other, "other")
    answer = await ask(served, {**chat_body("hi"), "model": "other"})
    assert answer.status == 200, answer.text
    assert engine_name(digest) not in served.stats.adapters
    assert served.stats.unloaded_while_busy == 0


@pytest.mark.parametrize("how", ["client-left", "request-cancelled"])
async def test_a_stream_set_up_that_completes_anyway_is_closed(how: str) -> None:
    """The set-up may finish as it is cancelled (the cancel lands after its last await): the
    stream it opened is closed all the same, or its adapter pin and engine turn would leak."""
    log: list[str] = []
    client_gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await client_gone.wait()
        return {"type": "http.disconnect"}

    async def events() -> AsyncIterator[bytes]:
        yield b"data: [DONE]\n\n"

    async def close() -> None:
        log.append("closed")

    async def set_up() -> OpenStream:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        return OpenStream(events(), close)

    request = Request({"type": "http"}, receive)
    guarded = _unless_disconnected(request, set_up(), discard=_close_stream)
    route = asyncio.create_task(guarded)
    await asyncio.sleep(0.01)
    if how == "client-left":
        client_gone.set()
        assert await asyncio.wait_for(route, 2) is None
    else:
        route.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(route, 2)
    assert log == ["closed"]
