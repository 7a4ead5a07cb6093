"""A disconnect storm leaves nothing behind: 200 concurrent streams on real sockets against a
real `loragate serve` (Redis for limits and coalescing, a real `redis-server`), half of them
dropped in every phase a request goes through:

- (a) `body`: hangs up halfway through sending the body it declared;
- (b) `waiting`: hangs up with its request sent and no response byte yet, wherever it waits
  then: on the engine's answer, for its adapter to load, for an adapter slot, in the admission
  queue, or for an identical request in flight (coalescing);
- (c) `head`: hangs up as soon as the response head arrives;
- (d) `mid`: hangs up mid-stream, after two events;
- (e) `stalled`: stays connected but reads nothing (small receive buffer, a ~6 MB stream), until
  the gateway cuts it after `LORAGATE_SERVER__SEND_TIMEOUT_S`.

The other half read their streams to the end and each gets its own full answer. Afterwards
every gauge is back to zero (requests in flight, engine queue and running; the engine's own
count of running requests), no tenant holds a concurrency lease in Redis, no coalescing claim is
left, no adapter stays pinned (the two adapter slots go to two other adapters), and every tenant
can at once hold its full `max_concurrent` (and no more). The gateway logs no traceback.

The fake engine (served from a thread of this process, so the test sees its counts) sits behind
two gates the test opens and closes: while closed, generation requests and adapter loads wait
there. So each phase is reached for certain, and checked through what the gateway exports (its
gauges, its Redis leases), never by timing: the storm is sent in waves, each once the previous
one sits where it should, and its clients leave once every request is through admission (its
Redis round trip). Leaving during admission is the last test's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from adapters.types import CONFIG_FILE, WEIGHTS_FILE
from server.engine_servers.fake_engine import (
    FakeEngineKnobs,
    FakeEngineStats,
    create_fake_engine_app,
    fake_tokens,
)
from server.engines.adapter_slots import engine_name
from server.model_prepare import DEFAULT_MODEL_NAME
from tests.adapter_factory import SMOLLM2_CONFIG, write_peft_adapter
from tests.api.conftest import serving
from tests.redis_server import RedisServer
from tests.support import ADMIN_KEY, TENANT_KEYS, write_tenants_file
from tests.unit.test_server_limits import Served, served_gateway

Kind = Literal["good", "body", "waiting", "head", "mid", "stalled"]
DROPPED: tuple[Kind, ...] = ("body", "waiting", "head", "mid", "stalled")

BASE = DEFAULT_MODEL_NAME
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
TENANTS = ("acme", "globex", "initech")
ADAPTERS = {"a": "acme", "b": "globex", "c": "initech", "d": "globex"}  # name -> owner
MAX_LOADED_ADAPTERS = 2  # four adapters for two slots: loads, evictions and slot waits
SEND_TIMEOUT_S = 1.5
TTFT_S, TOKEN_S = 0.1, 0.05  # a normal stream: 11 tokens in about 0.6 s
# A stalled stream: 50 words of 128 KiB (in parts: one text may hold 1 MiB), about 6.4 MB,
# well beyond what the gateway's socket (at most 4 MiB here), the client's small receive buffer
# and the transport hold, so the gateway's writes stall once the client reads nothing.
BIG_WORDS, BIG_WORD_CHARS, BIG_PARTS = 50, 128 << 10, 10
DEADLINE_S = 30.0  # for each observable state to be reached: generous, never the expected time
RELEASE_S = 5.0  # for what a request held to come back once it is over: "at once", give or take
# Leases and claims outlive the test, so one left behind shows however long a check waits.
LEASE_TTL_S = CLAIM_TTL_S = 600
CLIENT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Spec:
    """One client of the storm: what it asks for, and how it behaves."""

    index: int
    wave: str
    kind: Kind
    tenant: str
    model: str
    completions: bool = False
    group: int | None = None  # identical cacheable requests (temperature 0) share a group
    leader: bool = False

    @property
    def engine_bound(self) -> bool:
        """Takes a tenant lease and an engine turn: a body never completes, and a follower waits
        for its group's leader instead (as long as the leader is there)."""
        return self.kind != "body" and (self.group is None or self.leader)


def interleave(counts: dict[Kind, int]) -> list[Kind]:
    """The kinds, each spread evenly over the list."""
    total = sum(counts.values())
    given: Counter[Kind] = Counter()
    out: list[Kind] = []
    for i in range(total):
        kind = max(counts, key=lambda k: counts[k] * (i + 1) / total - given[k])
        given[kind] += 1
        out.append(kind)
    return out


def storm_plan() -> list[Spec]:
    """The 200 clients, wave by wave (the order they are sent in):

    - `body`: 20 that never finish sending their bodies;
    - `leader`: 4 cacheable requests that reach the engine (the base model and adapter a;
      adapter a is loaded for them), each the leader of a group;
    - `engine`: 12 more that reach the engine (base model, adapter a);
    - `loading`: 6 for adapter b, whose load is held at the engine (the second slot);
    - `slots`: 6 for adapters c and d, which wait for a slot (both are taken, by busy adapters);
    - `queued`: 132 that wait in the admission queue (every engine turn is taken by now);
    - `follower`: 20 identical to a leader, waiting for its answer.
    """
    specs: list[Spec] = []

    def add(wave: str, kind: Kind, tenant: str, model: str, **extra: Any) -> None:
        specs.append(Spec(len(specs), wave, kind, tenant, model, **extra))

    for i in range(20):
        add("body", "body", TENANTS[i % 3], BASE)
    groups: list[tuple[str, str, Kind]] = [
        ("acme", BASE, "good"), ("acme", "a", "good"), ("globex", BASE, "mid"),
        ("initech", BASE, "head"),
    ]  # fmt: skip
    for group, (tenant, model, kind) in enumerate(groups):
        add("leader", kind, tenant, model, group=group, leader=True)
    # The uncacheable ones: every fourth (that streams little) on the completions route.
    uncacheable: list[tuple[str, Kind, str, str]] = []
    engine_kinds: list[Kind] = ["good", "waiting", "stalled", "good", "head", "mid"] * 2
    engine_models = [("acme", "a"), ("globex", BASE), ("acme", BASE), ("initech", BASE)]
    for i, kind in enumerate(engine_kinds):
        uncacheable.append(("engine", kind, *engine_models[i % 4]))
    loading_kinds: list[Kind] = ["waiting", "good", "head", "stalled", "mid", "good"]
    for kind in loading_kinds:
        uncacheable.append(("loading", kind, "globex", "b"))
    slot_kinds: list[Kind] = ["waiting", "waiting", "good", "mid", "head", "stalled"]
    for i, kind in enumerate(slot_kinds):  # c and d in turn: each has a waiter that leaves
        uncacheable.append(("slots", kind, *[("initech", "c"), ("globex", "d")][i % 2]))
    follower_kinds: list[Kind] = ["good", "waiting", "head", "mid", "good"]
    # What is left of each kind (100 good, 20 of each way to leave) goes to the queue.
    wanted: dict[Kind, int] = {"good": 100, "waiting": 20, "head": 20, "mid": 20, "stalled": 20}
    so_far = Counter([kind for _, kind, _, _ in uncacheable])
    so_far.update(kind for _, _, kind in groups)
    so_far.update(follower_kinds * len(groups))
    queued_kinds = interleave({k: wanted[k] - so_far[k] for k in wanted})
    queued_models = [
        ("acme", BASE), ("acme", "a"), ("globex", BASE), ("globex", "b"), ("globex", "d"),
        ("initech", BASE), ("initech", "c"),
    ]  # fmt: skip
    for i, kind in enumerate(queued_kinds):
        uncacheable.append(("queued", kind, *queued_models[i % len(queued_models)]))
    for i, (wave, kind, tenant, model) in enumerate(uncacheable):
        add(wave, kind, tenant, model, completions=kind != "stalled" and i % 4 == 3)
    for group, (tenant, model, _) in enumerate(groups):
        for kind in follower_kinds:
            add("follower", kind, tenant, model, group=group)
    return specs


PLAN = storm_plan()
WAVES = ("body", "leader", "engine", "loading", "slots", "queued", "follower")
# Each tenant may hold as many leases as it has requests that could take one, so the storm is
# never refused a lease: every refusal would be a lease that was not given back.
MAX_CONCURRENT = dict(Counter(s.tenant for s in PLAN if s.kind != "body"))
MAX_RUNNING = sum(
    1 for s in PLAN if s.engine_bound and s.wave in ("leader", "engine", "loading", "slots")
)
QUEUED = sum(1 for s in PLAN if s.engine_bound and s.wave == "queued")


def test_the_storm_plan_drops_half_in_every_phase() -> None:
    assert len(PLAN) == 200 and [s.index for s in PLAN] == list(range(200))
    kinds = Counter(s.kind for s in PLAN)
    assert kinds["good"] == 100 and all(kinds[k] == 20 for k in DROPPED), kinds
    # A client leaves from each place a request waits before its response starts...
    assert {s.wave for s in PLAN if s.kind == "waiting"} == set(WAVES) - {"body", "leader"}
    assert {s.model for s in PLAN if s.kind == "waiting" and s.wave == "slots"} == {"c", "d"}
    # ...and the leaders never do (their followers would then go to the engine themselves,
    # which the counts below do not expect): one leader leaves after its head, one mid-stream.
    assert Counter(s.kind for s in PLAN if s.leader) == {"good": 2, "head": 1, "mid": 1}
    assert all(s.group is None for s in PLAN if s.kind == "stalled")
    assert [s.wave for s in PLAN] == sorted((s.wave for s in PLAN), key=WAVES.index)
    assert all(ADAPTERS.get(s.model, s.tenant) == s.tenant for s in PLAN)
    assert (MAX_RUNNING, QUEUED) == (28, 132)


def request_body(spec: Spec) -> dict[str, Any]:
    body: dict[str, Any] = {"model": spec.model, "stream": True}
    if spec.kind == "stalled":
        # A space ends each part: the fake joins the parts as they are.
        text = " ".join("w" * BIG_WORD_CHARS for _ in range(BIG_WORDS // BIG_PARTS)) + " "
        part = {"type": "text", "text": text}
        message = {"role": "user", "content": [part] * BIG_PARTS}
        return {**body, "messages": [message], "max_tokens": BIG_WORDS + 8}
    nonce = f"group{spec.group}" if spec.group is not None else f"r{spec.index}"
    prompt = f"storm {nonce} " + " ".join(f"w{i}" for i in range(1, 9))
    body["max_tokens"] = 16  # more than the 11 tokens of the echo: each stream ends by itself
    if spec.group is not None:
        body["temperature"] = 0  # reproducible: cached, and coalesced while in flight
    if spec.completions:
        return {**body, "prompt": prompt}
    return {**body, "messages": [{"role": "user", "content": prompt}]}


def request_bytes(spec: Spec, port: int) -> tuple[bytes, bytes]:
    """The request's head and body, as sent on the wire."""
    body = json.dumps(request_body(spec)).encode()
    path = COMPLETIONS if spec.completions else CHAT
    return http_head(path, port, spec.tenant, len(body)), body


def http_head(path: str, port: int, tenant: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {TENANT_KEYS[tenant]}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def expected_text(spec: Spec, digests: dict[str, str]) -> str:
    """The fake engine's answer: the prompt echoed, behind a tag naming the adapter's files."""
    tokens = fake_tokens(request_body(spec))
    if spec.model != BASE:
        tokens = [f"[{digests[spec.model][:8]}]", *tokens][: len(tokens)]
    return "".join(tokens)


class GatedEngine:
    """The fake engine behind two gates, each open unless the test closes it: generation
    requests (both routes) and adapter loads wait at theirs while it is closed. One whose caller
    (the gateway) hangs up meanwhile goes no further: the fake never sees it."""

    def __init__(self, knobs: FakeEngineKnobs) -> None:
        self.fake: FastAPI = create_fake_engine_app(knobs)
        self.knobs = knobs
        self.gates = {"generate": threading.Event(), "load": threading.Event()}
        for gate in self.gates.values():
            gate.set()
        self.waiting: Counter[str] = Counter()  # written on the fake's thread only

    @property
    def stats(self) -> FakeEngineStats:
        stats: FakeEngineStats = self.fake.state.stats
        return stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        which = {CHAT: "generate", COMPLETIONS: "generate", "/v1/load_lora_adapter": "load"}
        if scope["type"] != "http" or path not in which:
            await self.fake(scope, receive, send)
            return
        gate = self.gates[which[path]]
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        disconnect: asyncio.Future[Message] | None = None
        if not gate.is_set():
            self.waiting[which[path]] += 1
            try:
                disconnect = asyncio.ensure_future(receive())  # only a disconnect comes now
                while not gate.is_set():
                    if disconnect.done():
                        return
                    await asyncio.sleep(0.01)
            finally:
                self.waiting[which[path]] -= 1

        async def replay() -> Message:
            if messages:
                return messages.pop(0)
            if disconnect is not None:
                return await disconnect
            return await receive()

        await self.fake(scope, replay, send)


@dataclass
class Storm:
    gateway: Served
    engine: GatedEngine
    redis: RedisServer
    digests: dict[str, str]  # adapter name -> digest


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("storm-adapters")
    return {name: write_peft_adapter(root / name, seed=i) for i, name in enumerate(ADAPTERS)}


@pytest.fixture
def storm(tmp_path: Path, redis: RedisServer, adapter_dirs: dict[str, Path]) -> Iterator[Storm]:
    model_dir = tmp_path / "model"  # served_gateway's LORAGATE_MODEL__PATH
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))  # uploads check shapes
    limits = {
        tenant: {
            "max_concurrent": most,
            "requests_per_minute": 100_000,
            "tokens_per_minute": 1_000_000_000,
        }
        for tenant, most in MAX_CONCURRENT.items()
    }
    tenants = write_tenants_file(tmp_path / "storm-tenants.yaml", limits)
    engine = GatedEngine(
        FakeEngineKnobs(model=BASE, max_model_len=2048, ttft_s=TTFT_S, token_interval_s=TOKEN_S)
    )
    with (
        serving(engine) as engine_url,
        served_gateway(
            tmp_path,
            LORAGATE_TENANTS_FILE=str(tenants),
            LORAGATE_ENGINE__URL=engine_url,
            LORAGATE_MODEL__REVISION="storm",
            LORAGATE_REDIS_URL=redis.url,
            # A command's deadline that a busy 2-core machine cannot miss: the storm is to use
            # Redis throughout, never fall back to limits in the process.
            LORAGATE_REDIS__TIMEOUT_S="2",
            LORAGATE_REDIS__LEASE_TTL_S=str(LEASE_TTL_S),
            LORAGATE_CACHE__CLAIM_TTL_S=str(CLAIM_TTL_S),
            LORAGATE_MAX_LOADED_ADAPTERS=str(MAX_LOADED_ADAPTERS),
            LORAGATE_ENGINE__MAX_LORAS=str(MAX_LOADED_ADAPTERS),
            LORAGATE_ADAPTERS__WAIT_FOR_SLOT_S="60",
            LORAGATE_ADMISSION__MAX_RUNNING=str(MAX_RUNNING),
            LORAGATE_ADMISSION__MAX_QUEUED="256",
            LORAGATE_ADMISSION__QUEUE_TIMEOUT_S="60",
            LORAGATE_SERVER__SEND_TIMEOUT_S=str(SEND_TIMEOUT_S),
            LORAGATE_LIMITS__MAX_BODY_BYTES=str(16 << 20),
        ) as gateway,
    ):
        digests = {}
        for name, owner in ADAPTERS.items():
            directory = adapter_dirs[name]
            files = {
                "adapter_config": (CONFIG_FILE, (directory / CONFIG_FILE).read_bytes()),
                "adapter_model": (WEIGHTS_FILE, (directory / WEIGHTS_FILE).read_bytes()),
            }
            response = httpx.put(
                f"http://127.0.0.1:{gateway.port}/admin/v1/tenants/{owner}/adapters/{name}",
                files=files,
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            digests[name] = response.json()["digest"]
        yield Storm(gateway, engine, redis, digests)


# --- what the gateway, Redis and the engine show ---------------------------------------------

SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Metrics:
    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = []
        for line in text.splitlines():
            if (found := SAMPLE.match(line)) is not None:
                labels = dict(LABEL.findall(found.group(2) or ""))
                samples.append((found.group(1), labels, float(found.group(3))))
        return cls(samples)

    def total(self, name: str, **labels: str) -> float:
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def statuses(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for sample, labels, value in self.samples:
            if sample == "loragate_requests_total" and labels.get("route") in (CHAT, COMPLETIONS):
                counts[labels["status"]] += int(value)
        return counts


@dataclass
class Watch:
    storm: Storm
    http: httpx.AsyncClient

    async def metrics(self) -> Metrics:
        url = f"http://127.0.0.1:{self.storm.gateway.metrics_port}/metrics"
        return Metrics.parse((await self.http.get(url, timeout=10)).text)

    async def gauges(self) -> dict[str, float]:
        m = await self.metrics()
        return {
            "in_flight": m.total("loragate_requests_in_flight"),
            "queued": m.total("loragate_engine_queue_depth"),
            "running": m.total("loragate_engine_requests_running"),
            "499": float(m.statuses()["499"]),
            # Admission round trips done (a request's limits, cache read and claim).
            "admitted": m.total("loragate_redis_call_seconds_count", op="admit"),
        }

    def leases(self) -> dict[str, int]:
        """Each tenant's concurrency leases in Redis."""
        replies = {
            tenant: self.storm.redis.command("ZCARD", f"loragate:limits:{tenant}:concurrent")
            for tenant in MAX_CONCURRENT
        }
        return {tenant: int(reply.strip().lstrip(b":")) for tenant, reply in replies.items()}

    def claims(self) -> bytes:
        """The coalescing claims left in Redis (RESP: `*0` for none)."""
        return self.storm.redis.command("KEYS", "loragate:claim:*")

    def log(self) -> str:
        return self.storm.gateway.log.read_text()


async def until(
    check: Callable[[], Awaitable[str | None]], what: str, within_s: float = DEADLINE_S
) -> None:
    """Poll `check` (None once satisfied, else what it sees) until it is satisfied."""
    deadline = time.monotonic() + within_s
    while (seen := await check()) is not None:
        assert time.monotonic() < deadline, f"never {what}; last seen: {seen}"
        await asyncio.sleep(0.05)


def expect(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    return None if have == want else f"{have}, want {want}"


async def nothing_held(watch: Watch) -> str | None:
    """None when nothing is held any more: no request in flight, queued or running in the
    gateway, none waiting at the engine's gates or running on it, no tenant lease and no
    coalescing claim in Redis; else what is still held."""
    gauges = await watch.gauges()
    engine = watch.storm.engine
    at_engine = {**engine.waiting, **engine.stats.in_flight}  # at its gates, running on it
    have = {
        "gateway": {k: gauges[k] for k in ("in_flight", "queued", "running")},
        "engine": at_engine,
        "leases": watch.leases(),
        "claims": watch.claims(),
    }
    want = {
        "gateway": {"in_flight": 0, "queued": 0, "running": 0},
        "engine": dict.fromkeys(at_engine, 0),
        "leases": dict.fromkeys(MAX_CONCURRENT, 0),
        "claims": b"*0\r\n",  # RESP: an empty list of keys
    }
    return expect(have, want)


# --- the clients -----------------------------------------------------------------------------


@dataclass
class Outcome:
    spec: Spec
    raw: bytearray = field(default_factory=bytearray)
    first_byte_at: float | None = None
    error: str | None = None
    sent: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Cues:
    leave: asyncio.Event = field(default_factory=asyncio.Event)  # `body` and `waiting` go
    drain: asyncio.Event = field(default_factory=asyncio.Event)  # `stalled` read what is left


async def receive(sock: socket.socket, outcome: Outcome, done: Callable[[bytes], bool]) -> None:
    """Read into `outcome.raw` until `done` says so or the server closes the connection."""
    loop = asyncio.get_running_loop()
    while not done(bytes(outcome.raw)):
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            return
        outcome.first_byte_at = outcome.first_byte_at or time.monotonic()
        outcome.raw += chunk


def never(_: bytes) -> bool:
    return False


def has_head(raw: bytes) -> bool:
    return b"\r\n\r\n" in raw


def has_two_events(raw: bytes) -> bool:
    return raw.count(b"data: ") >= 2


async def run_client(outcome: Outcome, port: int, cues: Cues) -> None:
    spec = outcome.spec
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if spec.kind == "stalled":
        # Set before connecting, so the window offered the gateway stays small.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    head, body = request_bytes(spec, port)
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            if spec.kind == "body":
                await loop.sock_sendall(sock, head + body[: len(body) // 2])
                outcome.sent.set()
                await cues.leave.wait()
                return
            await loop.sock_sendall(sock, head + body)
            outcome.sent.set()
            if spec.kind == "waiting":
                await cues.leave.wait()
                with contextlib.suppress(BlockingIOError):  # there must be nothing to read
                    outcome.raw += sock.recv(1 << 16, socket.MSG_PEEK)
                return
            if spec.kind == "stalled":
                await cues.drain.wait()
                # The gateway aborted the connection: what its socket held may be dropped.
                with contextlib.suppress(ConnectionResetError):
                    await receive(sock, outcome, never)
                return
            done = {"head": has_head, "mid": has_two_events}.get(spec.kind, never)
            await receive(sock, outcome, done)
    except (OSError, TimeoutError) as e:
        outcome.error = repr(e)
    finally:
        sock.close()


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_reply(raw: bytes) -> Reply:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no complete response head in {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    if headers.get("transfer-encoding") == "chunked":
        rest = dechunk(rest)
    return Reply(int(lines[0].split()[1]), headers, rest)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def head_status(raw: bytes) -> int | None:
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw.split(b" ", 2)[1])


def stream_events(reply: Reply) -> list[str]:
    text = reply.body.decode()
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


def streamed_text(events: list[str]) -> str:
    parts = []
    for event in events:
        if event == "[DONE]":
            continue
        for choice in json.loads(event).get("choices", []):
            if "delta" in choice:  # chat
                parts.append(choice["delta"].get("content") or "")
            else:
                parts.append(choice["text"])
    return "".join(parts)


def check_full_stream(outcome: Outcome, digests: dict[str, str]) -> str:
    """A well-behaved client's answer: its own full stream, ended by [DONE]; its cache status."""
    spec = outcome.spec
    assert outcome.error is None, (spec, outcome.error)
    reply = parse_reply(bytes(outcome.raw))
    assert reply.status == 200, (spec, reply)
    events = stream_events(reply)
    assert events and events[-1] == "[DONE]", (spec, events[-3:])
    assert not any('"error"' in e for e in events), (spec, events)
    assert streamed_text(events) == expected_text(spec, digests), spec
    return reply.headers.get("x-loragate-cache", "")


async def one_request(port: int, tenant: str, path: str, body: dict[str, Any]) -> Reply:
    """One request on a socket of its own, read to the end."""
    outcome = Outcome(lone(tenant, str(body["model"])))
    loop = asyncio.get_running_loop()
    payload = json.dumps(body).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, http_head(path, port, tenant, len(payload)) + payload)
            await receive(sock, outcome, never)
    return parse_reply(bytes(outcome.raw))


def lone(tenant: str, model: str) -> Spec:
    """A well-behaved request outside the storm."""
    return Spec(-1, "check", "good", tenant, model)


# --- the storm -------------------------------------------------------------------------------


async def test_a_disconnect_storm_leaves_nothing_behind(storm: Storm) -> None:
    engine, port, digests = storm.engine, storm.gateway.port, storm.digests
    outcomes = [Outcome(spec) for spec in PLAN]
    cues = Cues()
    tasks: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient() as http:
        watch = Watch(storm, http)

        async def launch(wave: str) -> list[Outcome]:
            sent = [o for o in outcomes if o.spec.wave == wave]
            tasks.extend(asyncio.create_task(run_client(o, port, cues)) for o in sent)
            for outcome in sent:
                await asyncio.wait_for(outcome.sent.wait(), DEADLINE_S)
            return sent

        async def state(**want: float) -> str | None:
            gauges = await watch.gauges()
            have = {k: gauges.get(k, engine.waiting[k]) for k in want}
            return expect(have, want)

        # Stage 1: every client sent, each waiting where its wave should be; nothing answered.
        engine.gates["generate"].clear()
        await launch("body")
        await until(lambda: state(in_flight=20), "20 bodies half sent")
        await launch("leader")
        await until(lambda: state(generate=4, running=4), "the 4 leaders at the engine")
        await launch("engine")
        await until(lambda: state(generate=16, running=16), "16 requests at the engine")
        engine.gates["load"].clear()
        await launch("loading")
        await until(lambda: state(load=1, running=22), "adapter b loading, for 6 requests")
        await launch("slots")
        await until(lambda: state(running=MAX_RUNNING, queued=0), "6 requests waiting for slots")
        await launch("queued")
        await until(lambda: state(queued=QUEUED), f"{QUEUED} requests queued")
        await launch("follower")
        await until(lambda: state(in_flight=200), "all 200 requests in")
        # The followers wait for their leaders once their admission round trip is over.
        admitted = sum(1 for s in PLAN if s.kind != "body")
        await until(lambda: state(admitted=admitted), "every request through admission")
        stage_1 = {"generate": 16, "load": 1, "running": MAX_RUNNING, "queued": QUEUED}
        assert await state(**stage_1) is None
        holders = Counter(s.tenant for s in PLAN if s.engine_bound)
        assert watch.leases() == holders  # one lease in Redis per request bound for the engine
        assert not any(o.raw for o in outcomes), "a response came before the engine answered"

        # Stage 2: the `body` and `waiting` clients hang up; what they held goes to others.
        cues.leave.set()
        gone = [o.spec for o in outcomes if o.spec.kind in ("body", "waiting")]
        holders.subtract(s.tenant for s in gone if s.engine_bound)
        bound_gone = sum(1 for s in gone if s.engine_bound)

        async def after_leaving() -> str | None:
            want = {"in_flight": 160, "499": 40, "running": MAX_RUNNING,
                    "queued": QUEUED - bound_gone}  # fmt: skip
            return await state(**want) or expect(watch.leases(), dict(holders))

        await until(after_leaving, "the 40 clients that left released what they held")
        waiting = [o for o in outcomes if o.spec.kind == "waiting"]
        assert not any(o.raw for o in waiting), [bytes(o.raw[:100]) for o in waiting if o.raw]

        # Stage 3: the engine answers; `head`, `mid` leave as their streams start; `stalled`
        # are cut off by the gateway; the good ones read to the end.
        opened_at = time.monotonic()
        engine.gates["load"].set()
        engine.gates["generate"].set()
        readers = [t for t, o in zip(tasks, outcomes, strict=True) if o.spec.kind != "stalled"]
        await asyncio.wait_for(asyncio.gather(*readers), CLIENT_TIMEOUT_S)

        async def stalls_cut() -> str | None:
            cut = watch.log().count("read nothing for")
            return None if cut == 20 else f"{cut} stalled streams cut"

        await until(stalls_cut, "the 20 stalled streams cut off")
        cues.drain.set()
        await asyncio.wait_for(asyncio.gather(*tasks), CLIENT_TIMEOUT_S)

        for outcome in outcomes:
            spec = outcome.spec
            assert outcome.first_byte_at is None or outcome.first_byte_at > opened_at, spec
            if spec.kind == "good":
                cache = check_full_stream(outcome, digests)
                want = "bypass" if spec.group is None else "miss" if spec.leader else None
                if spec.group in (0, 1) and not spec.leader:
                    want = "hit"  # its leader's answer, computed once
                assert want is None or cache == want, (spec, cache)
            elif spec.kind in ("head", "mid", "stalled"):
                assert outcome.error is None, (spec, outcome.error)
                assert head_status(bytes(outcome.raw)) == 200, (spec, bytes(outcome.raw[:300]))
        for outcome in outcomes:
            if outcome.spec.kind == "stalled":
                assert b"data: [DONE]" not in outcome.raw, outcome.spec

        # Nothing left behind: gauges, the engine's requests, leases, claims.
        await until(lambda: nothing_held(watch), "everything released", RELEASE_S)
        assert engine.stats.unloaded_while_busy == 0
        metrics = await watch.metrics()
        statuses = metrics.statuses()
        # Every request ended as a 200 or a 499 (client gone): no 5xx, no 429, no 503. The 40
        # that left before their response started are 499s; one that left mid-response may
        # keep the status its head carried.
        assert set(statuses) <= {"200", "499"}, statuses
        assert 40 <= statuses["499"] <= 100 and statuses.total() == 200, statuses
        assert metrics.total("loragate_limit_rejections_total") == 0
        assert metrics.total("loragate_admission_rejections_total") == 0
        assert metrics.total("loragate_redis_up") == 1
        assert metrics.total("loragate_redis_errors_total") == 0
        assert metrics.total("loragate_limit_local_fallbacks_total") == 0
        log = watch.log()
        assert log.count("client closed the connection while sending the body") == 20, log
        assert "Traceback" not in log, log

        # No adapter is pinned: both slots go to adapters not loaded now, at once.
        engine.knobs.ttft_s = engine.knobs.token_interval_s = 0.0
        engine.gates["generate"].clear()
        loaded = set(engine.stats.adapters)
        chosen = [n for n in ADAPTERS if engine_name(digests[n]) not in loaded][:2]
        assert len(chosen) == 2, loaded
        pinning = [
            asyncio.create_task(
                one_request(port, ADAPTERS[name], CHAT, request_body(lone(ADAPTERS[name], name)))
            )
            for name in chosen
        ]

        async def slots_taken() -> str | None:
            have = {"generate": engine.waiting["generate"], "loaded": set(engine.stats.adapters)}
            return expect(
                have, {"generate": 2, "loaded": {engine_name(digests[n]) for n in chosen}}
            )

        await until(slots_taken, f"adapters {chosen} loaded in place of {loaded}: one was pinned")
        engine.gates["generate"].set()
        for reply in await asyncio.gather(*pinning):
            assert reply.status == 200 and stream_events(reply)[-1] == "[DONE]", reply

        # Every tenant can hold its full max_concurrent at once, and no more.
        engine.gates["generate"].clear()
        small = {"model": BASE, "messages": [{"role": "user", "content": "hi"}],
                 "max_tokens": 2, "stream": True}  # fmt: skip
        full = [
            asyncio.create_task(one_request(port, tenant, CHAT, small))
            for tenant, most in MAX_CONCURRENT.items()
            for _ in range(most)
        ]

        async def full_held() -> str | None:
            return expect(watch.leases(), MAX_CONCURRENT)

        await until(full_held, "every tenant's full max_concurrent held at once")
        for tenant in MAX_CONCURRENT:
            refused = await one_request(port, tenant, CHAT, small)
            assert refused.status == 429, refused
            assert json.loads(refused.body)["error"]["code"] == "max_concurrent", refused
        engine.gates["generate"].set()
        replies = await asyncio.wait_for(asyncio.gather(*full), CLIENT_TIMEOUT_S)
        assert all(r.status == 200 and stream_events(r)[-1] == "[DONE]" for r in replies)
        await until(lambda: nothing_held(watch), "everything released again", RELEASE_S)
        assert "Traceback" not in watch.log()


# --- leaving while being admitted ------------------------------------------------------------

ADMISSION_ROUNDS, LEAVERS = 6, 40


async def leave_soon_after_sending(port: int, body: dict[str, Any], delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    payload = json.dumps(body).encode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, http_head(CHAT, port, "acme", len(payload)) + payload)
        await asyncio.sleep(delay_s)


async def test_clients_that_leave_while_being_admitted_leave_nothing_behind(storm: Storm) -> None:
    """The moment the storm's waves avoid: clients that hang up within 20 ms of sending, as their
    requests go through admission (one Redis round trip: rate, cache read and claim, lease,
    tokens) or just after, while the engine answers nobody (its gate closed). Whenever each
    leaves, all it held must come back at once: no request left in flight or at the engine, no
    lease or claim left in Redis (they would outlive the test: see LEASE_TTL_S).

    It caught two bugs, which only the moment of leaving separates: a cancellation lost in
    the Redis client (redis-py sends each command inside `asyncio.wait_for`, which on Python
    3.11 swallows the caller's cancellation when the write completes in the same loop
    iteration: the request went on for a client that was gone; `RedisLink.call` now raises it
    again), and the lease, tokens and claim of an admission script whose reply the request was
    cancelled waiting for (nobody released or renewed them until their TTL; `call_or_undo` now
    lets the script finish and gives back what it took).
    """
    storm.engine.gates["generate"].clear()
    async with httpx.AsyncClient() as http:
        watch = Watch(storm, http)
        for round_ in range(ADMISSION_ROUNDS):
            delays = random.Random(round_)
            bodies = []
            for i in range(LEAVERS):
                body: dict[str, Any] = {
                    "model": BASE,
                    "messages": [{"role": "user", "content": f"round {round_} client {i}"}],
                    "max_tokens": 4,
                    "stream": i % 4 != 3,
                }
                if i % 2 == 0:
                    body["temperature"] = 0  # cacheable: its admission claims the key
                bodies.append(body)
            await asyncio.gather(
                *(leave_soon_after_sending(storm.gateway.port, b, delays.uniform(0, 0.02))
                  for b in bodies)
            )  # fmt: skip
            await until(
                lambda: nothing_held(watch),
                f"everything released after round {round_} of {LEAVERS} clients leaving",
                RELEASE_S,
            )
    assert "Traceback" not in watch.log()
