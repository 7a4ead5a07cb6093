"""A soak: mixed traffic for `--minutes` while adapters are uploaded, replaced and deleted and
Redis is restarted twice; RSS, open files and store size over time, and every request accounted.

The script starts what it measures, on free loopback ports, in a temp dir: a `redis-server` (no
persistence) and one `loragate serve`, which starts its engine as its own child: loragate's fake
engine by default (`LORAGATE_ENGINE__KIND=fake`, `--ttft-ms` / `--token-ms` of latency, base model
`soak-model` whose `config.json` is SmolLM2's shapes, so real adapters validate), or with
`--engine vllm` the real vLLM engine and the prepared default model (`make model`). The gateway
gets its own tenants file: `acme` (max_concurrent 5, tokens_per_minute 300k), `globex`
(requests_per_minute 6000, max_concurrent 8), `initech` (no limits), and an admin key; 3 adapter
slots (`LORAGATE_MAX_LOADED_ADAPTERS`) for 4 adapter contents, so adapters are evicted and
reloaded. Four small real PEFT adapters (rank 8, SmolLM2 shapes, `tests/adapter_factory.py`) are
made once at start, in a child process (torch stays out of this one).

For `--minutes`, at the same time:

- Traffic: `--concurrency` clients (httpx, one asyncio loop) each sending one request after
  another: chat or completions, streamed or not, the base model or one of the tenant's adapters
  that exist now, half cacheable (temperature 0, prompts from a small pool, so repeated) and half
  not (temperature 0.8, fresh prompts); 15% of the streams are cut by the client after 1-3 events;
  5% of the requests name any `churn-*` adapter, existing or not (a client with a stale list).
- Operator: every `--admin-every` s (jittered) one admin call for a random tenant: create a
  `churn-*` adapter, replace an adapter with other content (`?replace=true`), delete a `churn-*`
  one, upload the same content again (200 `unchanged`), upload other content without replace
  (409 expected), or list the tenant's adapters (which must match what the script did).
- Redis: stopped by the PID the script holds at 1/3 (SIGKILL: a crash) and 2/3 (SIGTERM) of the
  run, started again on the same port `--redis-down-s` later.
- Samples every `--sample-every` s: RSS and open file descriptors of the gateway process and,
  summed, of its descendants (the engine), the gateway's TCP connections, the store directory's
  size (bytes, files, adapter versions in `blobs/`), and the gateway's own gauges from its metrics
  listener (requests in flight, admission queue and running, adapters loaded, redis_up); and,
  every 0.5 s, `loragate_redis_up` alone: when the gateway's Redis breaker opened and closed, so
  the report says how long after each restart the gateway was on Redis again for good, and how
  often the breaker opened while Redis was up.

Every request gets one class:

- `ok`: 200 and well formed (a stream ends with `[DONE]` and has no error event). With the fake
  engine the text is also checked: the echo of the prompt, and for an adapter tagged with the
  digest of a version the name had at some moment while the request ran (so a stale cache entry
  or a request served by a replaced or deleted version is caught).
- `aborted`: a stream the client cut on purpose before `[DONE]` (not lost).
- `gone`: 404 `model_not_found` for an adapter that did not exist at some moment while the
  request ran (deleted, being deleted, not created yet). A 200 for one that did not exist at any
  moment of it is lost (`served_deleted_adapter`).
- `limited`: 429 for a limit the tenant has (a 429 for a limit it does not have is lost).
- `LOST`: everything else: any 5xx, a 503 too (at this concurrency neither admission bound can be
  reached, the adapter slots free up within milliseconds, the engine never restarts, and by the
  README a Redis outage must not cause a 5xx), any other 4xx, a transport error, a timeout
  (`--request-timeout-s`, default 60 s: the fake engine answers in well under a second), a
  stream without `[DONE]` or with an error event, a wrong answer. The goal is none. Admin calls
  with an unexpected answer are counted apart (`admin failed`). Each lost request is one line
  of `lost.jsonl`, with when it was sent.

After the traffic: the gauges must drain to zero; once the gateway has had Redis up for 5 s, each
tenant with `max_concurrent` gets that many requests at once, which must all be admitted (no
leaked slot); the adapter versions in the store
must be exactly those the tenants' records name (no leaked files, nothing left in `tmp/` or
`uploads/`); then the gateway gets SIGTERM and must exit, its engine with it.

    .venv/bin/python loadtests/soak.py                      # 30 minutes, fake engine
    .venv/bin/python loadtests/soak.py --minutes 3 --out /tmp/soak
    .venv/bin/python loadtests/soak.py --engine vllm        # after `make model`

Output in `--out` (default: a new temp dir): `samples.csv`, `soak.png` (RSS, open files, store
size over time; Redis down and the gateway without Redis shaded), `lost.jsonl`, `summary.json`,
`gateway.log`, `redis.log`. `LORAGATE_*` variables in the caller's environment reach the gateway
unless the script sets them itself. Not part of `make test`. Every process is stopped by the
PID / process group the script holds, also on Ctrl-C (SIGINT) or SIGTERM, and on error.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import enum
import hashlib
import importlib
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import numpy as np
import psutil  # type: ignore[import-untyped]  # no stubs installed
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from adapters.types import CONFIG_FILE, WEIGHTS_FILE, adapter_digest
from server.engine_servers.fake_engine import fake_tokens
from server.engines.process import free_loopback_port
from server.settings import Settings
from server.tenants import hash_api_key

# tests.adapter_factory (real PEFT adapters for SmolLM2's shapes) and tests.redis_server live
# under the repo root.
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from tests.redis_server import RedisServer


def adapter_factory() -> Any:
    """tests/adapter_factory.py (real PEFT adapters for SmolLM2's shapes), imported by name: mypy
    would otherwise check tests/ too, which `make lint` does not."""
    return importlib.import_module("tests.adapter_factory")


LORAGATE = str(Path(sys.executable).parent / "loragate")
FAKE_MODEL = "soak-model"
VLLM_MODEL = "SmolLM2-135M-Instruct"
ADMIN_KEY = "sk-soak-admin"
TENANT_KEYS = {"acme": "sk-soak-acme", "globex": "sk-soak-globex", "initech": "sk-soak-initech"}
TENANT_LIMITS: dict[str, dict[str, int]] = {
    "acme": {"max_concurrent": 5, "tokens_per_minute": 300_000},
    "globex": {"requests_per_minute": 6000, "max_concurrent": 8},
    "initech": {},
}
# Four contents (seed, target modules), rank 8: different sizes, so the store size moves.
VARIANTS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (0, ("q_proj", "v_proj")),
    (1, ("q_proj", "k_proj", "v_proj", "o_proj")),
    (2, ("q_proj", "v_proj", "o_proj")),
    (3, ("k_proj", "v_proj")),
)
STABLE = "stable"  # replaced now and then, never deleted
CHURN = ("churn-0", "churn-1", "churn-2")  # created and deleted
ADAPTER_SLOTS = 3  # fewer than the contents: adapters get evicted and reloaded
CACHEABLE_PROMPTS = 8  # each with its own max_tokens: few keys, so mostly hits
ABORT_SHARE = 0.15
STALE_SHARE = 0.05  # requests for any churn-* name, existing or not (404 expected if not)
READY_TIMEOUT_S = {"fake": 60.0, "vllm": 900.0}
PIPE_WIDTH = 120
MIB = 1 << 20


class EngineKind(enum.StrEnum):
    fake = "fake"
    vllm = "vllm"


# --- processes ---------------------------------------------------------------------------------


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class GatewayProcess:
    """`loragate serve` in its own session. Its engine runs in a session of its own (and dies
    with the gateway by PR_SET_PDEATHSIG); the engine processes seen while sampling are kept so
    that cleanup can stop their group too if the gateway did not."""

    def __init__(self, env: dict[str, str], log: Path, port: int, metrics_port: int) -> None:
        self.env = env
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.proc: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None
        self.engines: dict[int, psutil.Process] = {}  # pid -> process (psutil checks reuse)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [LORAGATE, "serve"], env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.process = psutil.Process(self.proc.pid)

    def wait_ready(self, timeout_s: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"loragate serve exited with {self.proc.returncode}; end of {self.log}:\n"
                    + self.log.read_text(errors="replace")[-3000:]
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.descendants()
                    return
            time.sleep(0.3)
        raise SystemExit(f"{self.url} not ready after {timeout_s:.0f} s; see {self.log}")

    def descendants(self) -> list[psutil.Process]:
        if self.process is None:
            return []
        try:
            children: list[psutil.Process] = self.process.children(recursive=True)
        except psutil.Error:
            return []
        for child in children:
            self.engines.setdefault(child.pid, child)
        return children

    def stop(self, timeout_s: float = 45) -> tuple[int | None, float, int]:
        """SIGTERM, as an operator would; (exit code, None if it had to be killed; seconds to
        exit; engine processes still there 5 s later), then SIGKILL to whatever is left."""
        proc = self.proc
        if proc is None:
            return None, 0.0, 0
        started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - started
        deadline = time.monotonic() + 5
        while self.engines_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        engines_left = len(self.engines_alive())
        self.kill_all()
        return code, seconds, engines_left

    def engines_alive(self) -> list[int]:
        return [pid for pid, p in self.engines.items() if _alive(p)]

    def kill_all(self) -> None:
        """SIGKILL to the gateway's group and to every engine group it started, if still there."""
        if self.proc is not None:
            if self.proc.poll() is None:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        for p in self.engines.values():
            if _alive(p):
                with contextlib.suppress(psutil.Error):
                    _signal_group(os.getpgid(p.pid), signal.SIGKILL)


def _alive(p: psutil.Process) -> bool:
    try:
        alive: bool = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
    return alive


# --- adapters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    config: bytes
    weights: bytes

    @property
    def digest(self) -> str:
        return adapter_digest(
            hashlib.sha256(self.config).hexdigest(), hashlib.sha256(self.weights).hexdigest()
        )


def make_adapters(out: str) -> None:
    """In a child process (torch is big): one PEFT adapter per entry of VARIANTS."""
    for i, (seed, targets) in enumerate(VARIANTS):
        adapter_factory().write_peft_adapter(
            Path(out) / f"v{i}", rank=8, alpha=16, targets=targets, seed=seed
        )


def load_variants(root: Path) -> list[Variant]:
    process = multiprocessing.get_context("spawn").Process(target=make_adapters, args=(str(root),))
    process.start()
    process.join(600)
    if process.exitcode != 0:
        raise SystemExit(f"making the test adapters failed (exit code {process.exitcode})")
    dirs = [root / f"v{i}" for i in range(len(VARIANTS))]
    return [Variant((d / CONFIG_FILE).read_bytes(), (d / WEIGHTS_FILE).read_bytes()) for d in dirs]


@dataclass
class Change:
    """One state of a tenant's adapter name: `digest` (None: deleted), asked for at `sent`,
    confirmed by the gateway at `done` (None: not yet, or the call failed)."""

    sent: float
    digest: str | None
    done: float | None = None


class AdapterBook:
    """What the operator did to every (tenant, name), with times, so that a request's answer can
    be checked against the versions that name had while it ran."""

    def __init__(self) -> None:
        self.history: dict[tuple[str, str], list[Change]] = {}

    def current(self, tenant: str, name: str) -> str | None:
        changes = self.history.get((tenant, name))
        return changes[-1].digest if changes else None

    def begin(self, tenant: str, name: str, digest: str | None) -> Change:
        change = Change(time.monotonic(), digest)
        self.history.setdefault((tenant, name), []).append(change)
        return change

    def usable(self, tenant: str) -> list[str]:
        """Names a request may pick now: an adapter that exists, or is being replaced (a create
        or delete under way does not count)."""
        names = []
        for (t, name), changes in self.history.items():
            last = changes[-1]
            if t != tenant or last.digest is None:
                continue
            if last.done is not None or (len(changes) > 1 and changes[-2].digest is not None):
                names.append(name)
        return sorted(names)

    def allowed(self, tenant: str, name: str, start: float, end: float) -> set[str | None]:
        """Every digest (None: deleted) the name may have had at some moment in [start, end]:
        a state counts from when it was asked for until the next one was confirmed."""
        changes = self.history.get((tenant, name), [])
        out: set[str | None] = set() if changes and changes[0].sent <= start else {None}
        for i, change in enumerate(changes):
            following = changes[i + 1] if i + 1 < len(changes) else None
            until = following.done if following is not None and following.done else math.inf
            if change.sent <= end and until >= start:
                out.add(change.digest)
        return out

    def live(self) -> dict[tuple[str, str], str]:
        return {key: c[-1].digest for key, c in self.history.items() if c[-1].digest is not None}


# --- the run's shared state --------------------------------------------------------------------


@dataclass
class Sample:
    t_s: float
    gateway_rss_mib: float
    gateway_fds: int
    gateway_tcp: int
    engine_rss_mib: float
    engine_fds: int
    engine_procs: int
    store_bytes: int
    store_files: int
    store_versions: int
    in_flight: float
    queue_depth: float
    engine_running: float
    adapters_loaded: float
    redis_up: float
    ok: int
    aborted: int
    gone: int
    limited: int
    lost: int


@dataclass
class Config:
    minutes: float
    concurrency: int
    engine: EngineKind
    out: Path
    sample_every_s: float
    admin_every_s: float
    redis_down_s: float
    request_timeout_s: float
    seed: int


@dataclass
class Run:
    cfg: Config
    gateway: GatewayProcess
    redis: RedisServer
    store: Path
    model: str
    variants: list[Variant]
    book: AdapterBook = field(default_factory=AdapterBook)
    t0: float = 0.0
    traffic_s: float = 0.0
    classes: Counter[str] = field(default_factory=Counter)
    lost_reasons: Counter[str] = field(default_factory=Counter)
    limited_codes: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    admin: Counter[str] = field(default_factory=Counter)
    admin_failed: Counter[str] = field(default_factory=Counter)
    lost_times: list[float] = field(default_factory=list)  # when each lost request was sent
    redis_events: list[dict[str, Any]] = field(default_factory=list)
    # (t_s, value) each time the gateway's loragate_redis_up changed (polled every 0.5 s)
    redis_up_changes: list[tuple[float, float]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False

    def now(self) -> float:
        return time.monotonic() - self.t0

    def lost(self, reason: str, detail: dict[str, Any]) -> None:
        self.classes["lost"] += 1
        self.lost_reasons[reason] += 1
        self.lost_times.append(detail.get("start_s", self.now()))
        self.note(reason, detail)

    def note(self, reason: str, detail: dict[str, Any]) -> None:
        """One line in lost.jsonl (rare: a blocking append is fine)."""
        record = {"t_s": round(self.now(), 3), "reason": reason, **detail}
        with (self.cfg.out / "lost.jsonl").open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")


# --- traffic -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int
    text: str = ""
    code: str | None = None
    message: str = ""
    cache: str = ""
    done: bool = False
    aborted: bool = False
    error_event: str | None = None


def _error_of(body: bytes) -> tuple[str | None, str]:
    try:
        error = json.loads(body)["error"]
        return error.get("code"), str(error.get("message", ""))[:300]
    except (ValueError, KeyError, TypeError):
        return None, body[:300].decode(errors="replace")


async def send_plain(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> Outcome:
    r = await client.post(path, json=body, headers=headers)
    if r.status_code != 200:
        code, message = _error_of(r.content)
        return Outcome(r.status_code, code=code, message=message)
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return Outcome(200, text=text or "", cache=r.headers.get("x-loragate-cache", ""), done=True)


async def send_stream(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    abort_after: int | None,
    progress: dict[str, Any],
) -> Outcome:
    """One streamed request; `progress` says how far it got (for a request that fails)."""
    async with client.stream("POST", path, json=body, headers=headers) as r:
        progress |= {"status": r.status_code, "cache": r.headers.get("x-loragate-cache")}
        if r.status_code != 200:
            code, message = _error_of(await r.aread())
            return Outcome(r.status_code, code=code, message=message)
        out = Outcome(200, cache=r.headers.get("x-loragate-cache", ""))
        parts: list[str] = []
        events = 0
        async for line in r.aiter_lines():
            progress["events"] = progress.get("events", 0) + 1
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                out.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                out.error_event = json.dumps(event["error"])[:300]
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                parts.append(delta.get("content") or choice.get("text") or "")
            events += 1
            if abort_after is not None and events >= abort_after and not out.done:
                out.aborted = True
                break  # leaving the block closes the connection mid-stream
        out.text = "".join(parts)
        return out


def answer_ok(text: str, body: dict[str, Any], allowed: set[str | None] | None) -> bool:
    """The fake engine's answer: the prompt echoed, for an adapter behind a `[<digest[:8]>]`
    tag of one of the `allowed` versions (None: the base model)."""
    tokens = fake_tokens(body)
    if allowed is None:
        return text == "".join(tokens)
    return any(
        text == "".join([f"[{d[:8]}]", *tokens][: len(tokens)]) for d in allowed if d is not None
    )


def request_body(rng: random.Random, model: str, chat: bool, stream: bool) -> dict[str, Any]:
    cacheable = rng.random() < 0.5
    if cacheable:
        i = rng.randrange(CACHEABLE_PROMPTS)
        prompt = f"soak prompt {i}: say something about item {i} and its neighbours"
        body: dict[str, Any] = {"model": model, "max_tokens": 8 + 2 * i, "temperature": 0}
    else:
        words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "omega")) for _ in range(8))
        prompt = f"{words} {uuid.uuid4().hex[:12]}"
        body = {"model": model, "max_tokens": rng.randint(8, 24), "temperature": 0.8}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    return body


async def one_request(run: Run, client: httpx.AsyncClient, rng: random.Random) -> None:
    tenant = rng.choice(list(TENANT_KEYS))
    names = run.book.usable(tenant)
    adapter = rng.choice(names) if names and rng.random() < 0.6 else None
    if rng.random() < STALE_SHARE:  # a client with an old list: the name may be deleted
        adapter = rng.choice(CHURN)
    chat = rng.random() < 0.6
    stream = rng.random() < 0.5
    abort_after = rng.randint(1, 3) if stream and rng.random() < ABORT_SHARE else None
    body = request_body(rng, adapter or run.model, chat, stream)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}
    kind = f"{'chat' if chat else 'completions'}/{'stream' if stream else 'plain'}"
    run.kinds[f"{kind}/{'adapter' if adapter else 'base'}"] += 1
    detail: dict[str, Any] = {
        "tenant": tenant, "model": body["model"], "route": path, "stream": stream,
        "abort_after": abort_after, "cacheable": body["temperature"] == 0,
        "max_tokens": body["max_tokens"], "start_s": round(run.now(), 3),
    }  # fmt: skip
    progress: dict[str, Any] = {}  # a stream's status and events so far
    start = time.monotonic()
    try:
        # httpx's own timeout first (it closes the connection cleanly); this one bounds a
        # stream that trickles, which no single read timeout catches.
        async with asyncio.timeout(run.cfg.request_timeout_s + 5):
            if stream:
                out = await send_stream(client, path, body, headers, abort_after, progress)
            else:
                out = await send_plain(client, path, body, headers)
    except (TimeoutError, httpx.TimeoutException) as e:
        run.lost("timeout", detail | progress | {"error": type(e).__name__})
        return
    except httpx.HTTPError as e:
        run.lost(f"transport:{type(e).__name__}", detail | progress | {"error": str(e)[:300]})
        return
    except (ValueError, KeyError, IndexError, TypeError) as e:
        run.lost("malformed_response", detail | {"error": repr(e)[:300]})
        return
    end = time.monotonic()
    detail |= {"status": out.status, "code": out.code, "message": out.message,
               "elapsed_s": round(end - start, 3)}  # fmt: skip
    allowed = run.book.allowed(tenant, adapter, start, end) if adapter else None
    if out.status == 200:
        run.cache[out.cache or "none"] += 1
        if out.error_event is not None:
            run.lost("stream_error_event", detail | {"error": out.error_event})
        elif out.aborted:
            run.classes["aborted"] += 1
        elif not out.done:
            run.lost("stream_without_done", detail | {"text": out.text[:200]})
        elif run.cfg.engine is EngineKind.fake and not answer_ok(out.text, body, allowed):
            versions = sorted(d[:8] if d else "deleted" for d in allowed or set())
            reason = "served_deleted_adapter" if allowed == {None} else "wrong_answer"
            run.lost(reason, detail | {"text": out.text[:200], "allowed": versions})
        else:
            run.classes["ok"] += 1
    elif out.status == 404 and out.code == "model_not_found" and allowed and None in allowed:
        run.classes["gone"] += 1
    elif out.status == 429 and out.code in TENANT_LIMITS[tenant]:
        run.classes["limited"] += 1
        run.limited_codes[f"{tenant}/{out.code}"] += 1
        await asyncio.sleep(rng.uniform(0.1, 0.4))  # back off a little, as a client would
    else:
        reason = f"http_{out.status}:{out.code}"
        if out.status == 404 and adapter:
            reason += " (adapter not deleted)"
        run.lost(reason, detail)


async def client_loop(run: Run, client: httpx.AsyncClient, seed: int, stop_at: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < stop_at:
        await one_request(run, client, rng)


# --- the operator ------------------------------------------------------------------------------


async def admin_put(
    run: Run, client: httpx.AsyncClient, tenant: str, name: str, variant: Variant, replace: bool
) -> httpx.Response:
    files = {
        "adapter_config": (CONFIG_FILE, variant.config, "application/json"),
        "adapter_model": (WEIGHTS_FILE, variant.weights, "application/octet-stream"),
    }
    params = {"replace": "true"} if replace else {}
    url = f"/admin/v1/tenants/{tenant}/adapters/{name}"
    return await client.put(url, files=files, params=params)


async def admin_op(run: Run, client: httpx.AsyncClient, rng: random.Random, tenant: str) -> None:
    book = run.book
    present = [n for n in (STABLE, *CHURN) if book.current(tenant, n) is not None]
    absent = [n for n in CHURN if book.current(tenant, n) is None]
    ops = ["create"] * 3 * bool(absent) + ["replace", "delete", "unchanged", "conflict", "list"]
    ops += ["replace"] * 2 + ["delete"] * 2 * bool(set(present) & set(CHURN))
    op = rng.choice(ops)
    if op == "delete" and not set(present) & set(CHURN):
        op = "replace"
    label = op
    try:
        if op == "create":
            name = rng.choice(absent)
            variant = rng.choice(run.variants)
            sent = time.monotonic()
            r = await admin_put(run, client, tenant, name, variant, replace=False)
            ok = r.status_code == 201 and r.headers.get("x-loragate-result") == "created"
            if ok:  # visible to requests only once created
                book.history.setdefault((tenant, name), []).append(
                    Change(sent, variant.digest, time.monotonic())
                )
        elif op in ("replace", "unchanged", "conflict"):
            name = rng.choice(present)
            current = book.current(tenant, name)
            same = [v for v in run.variants if v.digest == current]
            others = [v for v in run.variants if v.digest != current]
            if op == "replace":
                variant = rng.choice(others)
                change = book.begin(tenant, name, variant.digest)
                r = await admin_put(run, client, tenant, name, variant, replace=True)
                ok = r.status_code == 201 and r.headers.get("x-loragate-result") == "replaced"
                if ok:
                    change.done = time.monotonic()
            elif op == "unchanged":
                r = await admin_put(run, client, tenant, name, same[0], replace=False)
                ok = r.status_code == 200 and r.headers.get("x-loragate-result") == "unchanged"
            else:
                r = await admin_put(run, client, tenant, name, rng.choice(others), replace=False)
                ok = r.status_code == 409
            if ok and op != "conflict":
                ok = r.json()["digest"] == book.current(tenant, name)
        elif op == "delete":
            name = rng.choice([n for n in present if n in CHURN])
            change = book.begin(tenant, name, None)
            r = await client.delete(f"/admin/v1/tenants/{tenant}/adapters/{name}")
            ok = r.status_code == 200
            if ok:
                change.done = time.monotonic()
        else:
            r = await client.get(f"/admin/v1/tenants/{tenant}/adapters")
            listed = {a["name"]: a["digest"] for a in r.json()["data"]} if r.is_success else {}
            expected = {n: d for (t, n), d in book.live().items() if t == tenant}
            ok = r.status_code == 200 and listed == expected
            if r.status_code == 200 and not ok:
                label = "list_mismatch"
    except httpx.HTTPError as e:
        run.admin_failed[f"{op}:{type(e).__name__}"] += 1
        await resync(run, client, tenant)
        return
    if ok:
        run.admin[op] += 1
    else:
        run.admin_failed[f"{label}:{r.status_code}"] += 1
        run.note("admin", {"op": op, "tenant": tenant, "status": r.status_code,
                           "body": r.text[:300]})  # fmt: skip
        await resync(run, client, tenant)


async def resync(run: Run, client: httpx.AsyncClient, tenant: str) -> None:
    """After an unexpected admin answer: take the gateway's word for what the tenant has."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        r = await client.get(f"/admin/v1/tenants/{tenant}/adapters")
        listed = {a["name"]: a["digest"] for a in r.json()["data"]}
        now = time.monotonic()
        for name in (STABLE, *CHURN):
            if run.book.current(tenant, name) != listed.get(name):
                run.book.history.setdefault((tenant, name), []).append(
                    Change(now, listed.get(name), now)
                )


async def operator_loop(run: Run, client: httpx.AsyncClient, stop_at: float) -> None:
    rng = random.Random(run.cfg.seed + 1000)
    while time.monotonic() < stop_at:
        await asyncio.sleep(run.cfg.admin_every_s * rng.uniform(0.5, 1.5))
        if time.monotonic() < stop_at:
            await admin_op(run, client, rng, rng.choice(list(TENANT_KEYS)))


async def initial_adapters(run: Run, client: httpx.AsyncClient) -> None:
    for i, tenant in enumerate(TENANT_KEYS):
        for name, variant in ((STABLE, run.variants[i % 4]), (CHURN[0], run.variants[(i + 1) % 4])):
            sent = time.monotonic()
            r = await admin_put(run, client, tenant, name, variant, replace=True)
            if r.status_code not in (200, 201) or r.json()["digest"] != variant.digest:
                raise SystemExit(f"initial upload {tenant}/{name}: {r.status_code} {r.text[:500]}")
            run.book.history[(tenant, name)] = [Change(sent, variant.digest, time.monotonic())]


# --- Redis restarts ----------------------------------------------------------------------------


async def redis_chaos(run: Run, stop_at: float) -> None:
    for i, (fraction, sig) in enumerate(((1 / 3, signal.SIGKILL), (2 / 3, signal.SIGTERM))):
        at = run.t0 + run.traffic_s * fraction
        if at >= stop_at:
            return
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        event: dict[str, Any] = {"n": i + 1, "signal": sig.name, "stopped_s": run.now()}
        await asyncio.to_thread(run.redis.stop, sig)
        await asyncio.sleep(run.cfg.redis_down_s)
        await asyncio.to_thread(run.redis.start)
        event["started_s"] = run.now()
        run.redis_events.append(event)


# --- the gateway's view of Redis ---------------------------------------------------------------

REDIS_UP = re.compile(r"^loragate_redis_up (\S+)$", re.MULTILINE)


async def redis_up(client: httpx.AsyncClient, url: str) -> float:
    try:
        found = REDIS_UP.search((await client.get(url)).text)
    except httpx.HTTPError:
        return math.nan
    return float(found.group(1)) if found else math.nan


async def redis_watch(run: Run, client: httpx.AsyncClient, done: asyncio.Event) -> None:
    """Every change of the gateway's loragate_redis_up (its circuit breaker), to 0.5 s."""
    last = math.nan
    while not done.is_set():
        up = await redis_up(client, run.gateway.metrics_url)
        if not math.isnan(up) and up != last:
            run.redis_up_changes.append((run.now(), up))
            last = up
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.5)


async def wait_redis_stable(
    run: Run, client: httpx.AsyncClient, stable_s: float = 5, timeout_s: float = 60
) -> float | None:
    """Seconds until the gateway has had Redis up for `stable_s` in a row (None: not within
    `timeout_s`). Run once the traffic is over, before the limit probe."""
    started = since = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await redis_up(client, run.gateway.metrics_url) != 1:
            since = time.monotonic()
        elif time.monotonic() - since >= stable_s:
            return since - started
        await asyncio.sleep(0.5)
    return None


def without_redis(run: Run, end_s: float) -> list[tuple[float, float]]:
    """The periods (start, end) the gateway served without Redis (redis_up 0)."""
    periods, down_since = [], None
    for t, up in run.redis_up_changes:
        if up == 0 and down_since is None:
            down_since = t
        elif up == 1 and down_since is not None:
            periods.append((down_since, t))
            down_since = None
    if down_since is not None:
        periods.append((down_since, end_s))
    return periods


def redis_analysis(run: Run, end_s: float) -> dict[str, Any]:
    """How the gateway's breaker followed the real outages: time without Redis, breaker
    openings while Redis was up, and how long after each restart it was back for good (until
    the next stop, or the end)."""
    periods = without_redis(run, end_s)
    outages = [(e["stopped_s"], e["started_s"]) for e in run.redis_events]

    def during_outage(t: float) -> bool:
        return any(a <= t <= b + 0.5 for a, b in outages)  # 0.5: the watcher's resolution

    recoveries: list[float | None] = []
    for i, (_, back) in enumerate(outages):
        until = outages[i + 1][0] if i + 1 < len(outages) else end_s
        last_down_end = max((b for a, b in periods if a < until and b > back - 0.5), default=back)
        recoveries.append(None if last_down_end >= until else max(0.0, last_down_end - back))
    return {
        "without_redis_s": sum(b - a for a, b in periods),
        "breaker_opens": len(periods),
        "opens_while_redis_up": sum(1 for a, _ in periods if not during_outage(a)),
        "recovery_s": recoveries,
    }


# --- sampling ----------------------------------------------------------------------------------


def store_usage(store: Path) -> tuple[int, int, int]:
    """(bytes, files, adapter versions in blobs/) under the store directory."""
    size = files = 0
    for dirpath, _, filenames in os.walk(store):
        for name in filenames:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, name)).st_size
                files += 1
    blobs = store / "blobs"
    versions = sum(1 for p in blobs.iterdir() if p.is_dir()) if blobs.is_dir() else 0
    return size, files, versions


def metric_sum(text: str, sample: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def process_stats(run: Run) -> dict[str, float]:
    """RSS (MiB), fds and TCP connections of the gateway; RSS and fds summed over its
    descendants (the engine and its workers); the store's usage."""
    stats: dict[str, float] = dict.fromkeys(
        ("gateway_rss_mib", "gateway_fds", "gateway_tcp", "engine_rss_mib", "engine_fds"), math.nan
    )
    gateway = run.gateway.process
    if gateway is not None:
        with contextlib.suppress(psutil.Error):
            with gateway.oneshot():
                stats["gateway_rss_mib"] = gateway.memory_info().rss / MIB
                stats["gateway_fds"] = gateway.num_fds()
            stats["gateway_tcp"] = len(gateway.net_connections(kind="tcp"))
    children = run.gateway.descendants()
    rss = fds = 0.0
    for child in children:
        with contextlib.suppress(psutil.Error):
            rss += child.memory_info().rss / MIB
            fds += child.num_fds()
    if children:
        stats["engine_rss_mib"], stats["engine_fds"] = rss, fds
    stats["engine_procs"] = len(children)
    size, files, versions = store_usage(run.store)
    stats |= {"store_bytes": size, "store_files": files, "store_versions": versions}
    return stats


async def gauges(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    names = {
        "in_flight": "loragate_requests_in_flight",
        "queue_depth": "loragate_engine_queue_depth",
        "engine_running": "loragate_engine_requests_running",
        "adapters_loaded": "loragate_adapters_loaded",
        "redis_up": "loragate_redis_up",
    }
    try:
        text = (await client.get(url)).text
    except httpx.HTTPError:
        return dict.fromkeys(names, math.nan)
    return {key: metric_sum(text, name) for key, name in names.items()}


async def take_sample(run: Run, client: httpx.AsyncClient) -> Sample:
    stats = await asyncio.to_thread(process_stats, run)
    g = await gauges(client, run.gateway.metrics_url)
    counts = {k: run.classes[k] for k in ("ok", "aborted", "gone", "limited", "lost")}
    sample = Sample(
        t_s=round(run.now(), 2),
        gateway_rss_mib=stats["gateway_rss_mib"],
        gateway_fds=_int(stats["gateway_fds"]),
        gateway_tcp=_int(stats["gateway_tcp"]),
        engine_rss_mib=stats["engine_rss_mib"],
        engine_fds=_int(stats["engine_fds"]),
        engine_procs=int(stats["engine_procs"]),
        store_bytes=int(stats["store_bytes"]),
        store_files=int(stats["store_files"]),
        store_versions=int(stats["store_versions"]),
        in_flight=g["in_flight"],
        queue_depth=g["queue_depth"],
        engine_running=g["engine_running"],
        adapters_loaded=g["adapters_loaded"],
        redis_up=g["redis_up"],
        **counts,
    )
    run.samples.append(sample)
    return sample


def _int(value: float) -> int:
    return -1 if math.isnan(value) else int(value)


async def sampler(run: Run, client: httpx.AsyncClient, done: asyncio.Event) -> None:
    progress = Console(stderr=True)
    last_log = -math.inf
    while not done.is_set():
        s = await take_sample(run, client)
        if s.t_s - last_log >= 30:
            last_log = s.t_s
            progress.log(
                f"{s.t_s / 60:5.1f} min: ok {s.ok} aborted {s.aborted} gone {s.gone} "
                f"limited {s.limited} [bold]lost {s.lost}[/]; gateway {s.gateway_rss_mib:.0f} MiB "
                f"{s.gateway_fds} fds, engine {s.engine_rss_mib:.0f} MiB, store "
                f"{s.store_bytes / MIB:.1f} MiB ({s.store_versions} versions), redis_up "
                f"{s.redis_up:.0f}"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), run.cfg.sample_every_s)


# --- after the traffic -------------------------------------------------------------------------


async def drain(run: Run, client: httpx.AsyncClient, timeout_s: float = 20) -> dict[str, float]:
    """Wait for the gateway's in-flight gauges to reach zero; their last values."""
    deadline = time.monotonic() + timeout_s
    while True:
        g = await gauges(client, run.gateway.metrics_url)
        busy = g["in_flight"] + g["queue_depth"] + g["engine_running"]
        if busy == 0 or time.monotonic() > deadline:
            return g
        await asyncio.sleep(0.5)


async def slot_probe(run: Run, client: httpx.AsyncClient) -> dict[str, str]:
    """Each tenant with max_concurrent gets that many requests at once: a leaked concurrency
    slot would turn some into 429."""
    result = {}
    for tenant, limits in TENANT_LIMITS.items():
        limit = limits.get("max_concurrent")
        if limit is None:
            continue
        headers = {"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}
        bodies = [
            {"model": run.model, "prompt": f"probe {uuid.uuid4().hex}", "max_tokens": 16,
             "temperature": 0.8}
            for _ in range(limit)
        ]  # fmt: skip
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=b, headers=headers) for b in bodies),
            return_exceptions=True,
        )
        statuses = Counter(
            str(r.status_code) if isinstance(r, httpx.Response) else type(r).__name__
            for r in responses
        )
        result[tenant] = ", ".join(f"{n}x {s}" for s, n in sorted(statuses.items()))
    return result


def store_check(run: Run) -> dict[str, Any]:
    """The versions on disk against those the records name; leftovers in tmp/ and uploads/."""
    blobs = run.store / "blobs"
    on_disk = {p.name for p in blobs.iterdir() if p.is_dir()} if blobs.is_dir() else set()
    referenced = set(run.book.live().values())
    leftovers = [
        str(p.relative_to(run.store))
        for sub in ("tmp", "uploads")
        if (run.store / sub).is_dir()
        for p in (run.store / sub).iterdir()
    ]
    return {
        "versions_on_disk": len(on_disk),
        "versions_referenced": len(referenced),
        "unreferenced_on_disk": sorted(d[:12] for d in on_disk - referenced),
        "referenced_missing": sorted(d[:12] for d in referenced - on_disk),
        "leftovers": leftovers[:20],
    }


async def final_counters(run: Run, client: httpx.AsyncClient) -> dict[str, Any]:
    try:
        text = (await client.get(run.gateway.metrics_url)).text
    except httpx.HTTPError:
        return {}
    statuses: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "loragate_requests_total" and s.labels["route"].startswith("/v1/"):
                statuses[s.labels["status"]] += int(s.value)
    return {
        "gateway_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "gateway_499": statuses["499"],
        "gateway_statuses": dict(sorted(statuses.items())),
        "redis_errors": metric_sum(text, "loragate_redis_errors_total"),
        "limit_local_fallbacks": metric_sum(text, "loragate_limit_local_fallbacks_total"),
        "adapter_loads_ok": metric_sum(text, "loragate_adapter_loads_total", result="ok"),
        "adapter_loads": metric_sum(text, "loragate_adapter_loads_total"),
        "adapter_unloads": metric_sum(text, "loragate_adapter_unloads_total"),
        "engine_restarts": metric_sum(text, "loragate_engine_restarts_total"),
    }


# --- the run -----------------------------------------------------------------------------------


async def soak(run: Run) -> None:
    cfg = run.cfg
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10)
    # Idle connections are dropped before the gateway's 5 s keep-alive timeout closes them, so
    # no request is sent on a connection the server is closing (not the gateway's fault).
    limits = httpx.Limits(
        max_connections=cfg.concurrency * 2, max_keepalive_connections=cfg.concurrency,
        keepalive_expiry=2,
    )  # fmt: skip
    admin_headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with (
        httpx.AsyncClient(base_url=run.gateway.url, timeout=timeout, limits=limits) as traffic,
        httpx.AsyncClient(
            base_url=run.gateway.url, timeout=60, headers=admin_headers,
            limits=httpx.Limits(keepalive_expiry=2),
        ) as admin,
        httpx.AsyncClient(timeout=10, limits=httpx.Limits(keepalive_expiry=2)) as scrape,
    ):  # fmt: skip
        await initial_adapters(run, admin)
        run.t0 = time.monotonic()
        stop_at = run.t0 + run.traffic_s
        done = asyncio.Event()
        sampling = asyncio.create_task(sampler(run, scrape, done))
        watching = asyncio.create_task(redis_watch(run, scrape, done))
        try:
            chaos = asyncio.create_task(redis_chaos(run, stop_at))
            await asyncio.gather(
                *(client_loop(run, traffic, cfg.seed + i, stop_at) for i in range(cfg.concurrency)),
                operator_loop(run, admin, stop_at),
            )
            run.final["traffic_end_s"] = run.now()
            await chaos  # both restarts are over by 2/3 of the run plus the down time
            run.final["drained"] = await drain(run, scrape)
            run.final["redis_stable_after_s"] = await wait_redis_stable(run, scrape)
        finally:
            done.set()
            await sampling
            await watching
        await take_sample(run, scrape)
        run.final["redis"] = redis_analysis(run, run.now())
        run.final["slot_probe"] = await slot_probe(run, traffic)
        run.final["store"] = await asyncio.to_thread(store_check, run)
        run.final["counters"] = await final_counters(run, scrape)


# --- report ------------------------------------------------------------------------------------


def write_csv(samples: list[Sample], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(Sample)])
        for s in samples:
            writer.writerow([f"{v:.3f}" if isinstance(v, float) else v for v in asdict(s).values()])


def slope_per_hour(samples: list[Sample], attr: str) -> float:
    """Least-squares slope (per hour) of `attr` over the second half of the run."""
    if not samples:
        return math.nan
    half = samples[-1].t_s / 2
    points = [(s.t_s, getattr(s, attr)) for s in samples if s.t_s >= half]
    points = [(t, v) for t, v in points if not math.isnan(v)]
    if len(points) < 3:
        return math.nan
    t, v = np.array(points).T
    return float(np.polyfit(t, v, 1)[0]) * 3600


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = run.samples
    t = [x.t_s / 60 for x in s]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9.5), sharex=True, constrained_layout=True)
    rss, fds, store = axes
    rss.plot(t, [x.gateway_rss_mib for x in s], label="gateway")
    rss.plot(t, [x.engine_rss_mib for x in s], label=f"engine ({run.cfg.engine.value}), summed")
    rss.set_ylabel("RSS (MiB)")
    fds.plot(t, [x.gateway_fds for x in s], label="gateway fds")
    fds.plot(t, [x.engine_fds for x in s], label="engine fds")
    fds.plot(t, [x.gateway_tcp for x in s], label="gateway TCP connections", linestyle="--")
    fds.set_ylabel("open files")
    store.step(t, [x.store_bytes / MIB for x in s], where="post", label="store size",
               color="tab:green")  # fmt: skip
    store.set_ylabel("store (MiB)")
    store.set_xlabel("minutes")
    versions = store.twinx()
    versions.step(t, [x.store_versions for x in s], where="post", color="tab:gray", alpha=0.6,
                  label="adapter versions on disk (right)")  # fmt: skip
    versions.set_ylabel("versions")
    versions.set_ylim(0, max((x.store_versions for x in s), default=1) + 1)
    versions.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, where in ((rss, "center right"), (fds, "upper right")):
        ax.legend(loc=where, fontsize="small")
    h1, l1 = store.get_legend_handles_labels()
    h2, l2 = versions.get_legend_handles_labels()
    store.legend(h1 + h2, l1 + l2, loc="lower right", fontsize="small")
    end_s = s[-1].t_s if s else 0.0
    traffic_end = run.final.get("traffic_end_s")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        for a, b in without_redis(run, end_s):
            ax.axvspan(a / 60, b / 60, color="tab:orange", alpha=0.2, linewidth=0)
        for e in run.redis_events:
            ax.axvspan(e["stopped_s"] / 60, e["started_s"] / 60, color="tab:red", alpha=0.3,
                       linewidth=0)  # fmt: skip
            ax.axvline(e["stopped_s"] / 60, color="tab:red", linestyle=":", linewidth=1)
        if traffic_end is not None:
            ax.axvline(traffic_end / 60, color="black", linestyle="--", linewidth=0.8)
    if run.lost_times:
        top = rss.get_ylim()[1]
        rss.plot([x / 60 for x in run.lost_times], [top * 0.97] * len(run.lost_times), "|",
                 color="tab:red", markersize=12, markeredgewidth=2)  # fmt: skip
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    marks = [
        Patch(color="tab:red", alpha=0.3, label="redis-server down (dotted: stopped)"),
        Patch(color="tab:orange", alpha=0.2, label="gateway serving without Redis (redis_up 0)"),
        Line2D([], [], color="black", linestyle="--", linewidth=0.8, label="last request ends"),
        Line2D([], [], color="tab:red", marker="|", linestyle="", markersize=12,
               markeredgewidth=2, label="a lost request, when sent"),
    ]  # fmt: skip
    fig.legend(handles=marks, loc="outside lower center", ncols=4, fontsize="small")
    lost = run.classes["lost"]
    fig.suptitle(
        f"loragate soak: {run.cfg.minutes:g} min of traffic, concurrency {run.cfg.concurrency}, "
        f"{run.cfg.engine.value} engine; {sum(run.classes.values())} requests, {lost} lost; "
        f"gateway RSS {slope_per_hour(s, 'gateway_rss_mib'):+.1f} MiB/h (2nd half)"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(samples: list[Sample], attr: str, scale: float = 1.0) -> tuple[float, ...]:
    values = [getattr(x, attr) / scale for x in samples]
    values = [v for v in values if not (math.isnan(v) or v < 0)]
    if not values:
        return (math.nan,) * 4
    return values[0], min(values), max(values), values[-1]


def _joined(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _flag(value: str, bad: bool) -> str:
    return f"[{'red' if bad else 'green'}]{value}[/]"


def report(run: Run) -> Table:
    s = run.samples
    total = sum(run.classes.values())
    table = Table(title=f"loragate soak ({run.cfg.engine.value} engine)")
    for column in ("what", "value", "notes"):
        table.add_column(column, justify="right" if column == "value" else "left")
    traffic_s = run.final.get("traffic_end_s", run.traffic_s)
    note = f"concurrency {run.cfg.concurrency}; the last request ended at {traffic_s / 60:.1f} min"
    table.add_row(
        "traffic", f"{run.traffic_s / 60:g} min", note + ", INTERRUPTED" * run.interrupted
    )
    table.add_row("requests", str(total), f"{total / max(traffic_s, 1):.1f}/s")
    notes = {
        "ok": "200, well formed" + (", answer checked" * (run.cfg.engine is EngineKind.fake)),
        "aborted": "streams cut by the client on purpose",
        "gone": "404 for an adapter deleted meanwhile",
        "limited": _joined(run.limited_codes),
    }
    for cls, text in notes.items():
        table.add_row(f"  {cls}", str(run.classes[cls]), text)
    lost = run.classes["lost"]
    reasons = "; ".join(f"{k} {v}" for k, v in run.lost_reasons.most_common())
    table.add_row("  [bold]LOST[/]", _flag(str(lost), lost > 0), reasons)
    table.add_row("cache (x-loragate-cache)", "", _joined(run.cache))
    table.add_row("admin calls ok", str(sum(run.admin.values())), _joined(run.admin))
    failed = sum(run.admin_failed.values())
    table.add_row("admin calls failed", _flag(str(failed), failed > 0), _joined(run.admin_failed))
    table.add_section()
    table.add_row("[bold]series[/]", "[bold]start / min / max / end[/]", "[bold]slope, 2nd half[/]")
    rows = [
        ("gateway RSS (MiB)", "gateway_rss_mib", 1.0, "{:.1f}", " MiB/h"),
        ("engine RSS (MiB)", "engine_rss_mib", 1.0, "{:.1f}", " MiB/h"),
        ("gateway open files", "gateway_fds", 1.0, "{:.0f}", " /h"),
        ("engine open files", "engine_fds", 1.0, "{:.0f}", " /h"),
        ("gateway TCP connections", "gateway_tcp", 1.0, "{:.0f}", ""),
        ("store size (MiB)", "store_bytes", MIB, "{:.2f}", ""),
        ("store adapter versions", "store_versions", 1.0, "{:.0f}", ""),
    ]
    for label, attr, scale, fmt, unit in rows:
        values = " / ".join(fmt.format(v) for v in _series(s, attr, scale))
        slope = f"{slope_per_hour(s, attr):+.1f}{unit}" if unit else ""
        table.add_row(label, values, slope)
    table.add_section()
    events = ", ".join(
        f"{e['signal']} at {e['stopped_s'] / 60:.1f} min, "
        f"back {e['started_s'] - e['stopped_s']:.1f} s later"
        for e in run.redis_events
    )
    table.add_row("Redis restarts", str(len(run.redis_events)), events)
    r = run.final.get("redis")
    if r:
        back = ", ".join("not yet" if x is None else f"{x:.1f} s" for x in r["recovery_s"])
        table.add_row("gateway on Redis again after each restart", back or "-",
                      "until its breaker stayed closed (redis_up 1)")  # fmt: skip
        spurious = r["opens_while_redis_up"]
        table.add_row("breaker opened / while Redis was up",
                      _flag(f"{r['breaker_opens']} / {spurious}", spurious > 0),
                      f"{r['without_redis_s']:.1f} s without Redis in all")  # fmt: skip
    stable = run.final.get("redis_stable_after_s", math.nan)
    if stable is None or not math.isnan(stable):
        text = "not within 60 s" if stable is None else f"{stable:.1f} s"
        table.add_row("after the traffic: Redis up 5 s in a row", text, "waited before the probe")
    c = run.final.get("counters") or {}
    if c:
        five = c["gateway_5xx"]
        table.add_row("gateway's 5xx on /v1/*", _flag(f"{five:.0f}", five > 0),
                      f"its metrics; 499 (the client left before the response ended) "
                      f"{c['gateway_499']:.0f}")  # fmt: skip
        table.add_row("Redis errors / local limit checks",
                      f"{c['redis_errors']:.0f} / {c['limit_local_fallbacks']:.0f}",
                      "the gateway's counters")  # fmt: skip
        loads = f"{c['adapter_loads']:.0f} / {c['adapter_unloads']:.0f}"
        extra = f"ok loads {c['adapter_loads_ok']:.0f}; engine restarts {c['engine_restarts']:.0f}"
        table.add_row("adapter loads / unloads", loads, extra)
    drained = run.final.get("drained")
    if drained:
        busy = drained["in_flight"] + drained["queue_depth"] + drained["engine_running"]
        table.add_row("gauges after the traffic", _flag(f"{busy:.0f}", busy != 0),
                      "in flight + queued + running (must be 0)")  # fmt: skip
    probe = run.final.get("slot_probe")
    if probe:
        table.add_row("max_concurrent probe", "", "; ".join(f"{t}: {v}" for t, v in probe.items()))
    st = run.final.get("store")
    if st:
        stray = st["unreferenced_on_disk"] + st["referenced_missing"] + st["leftovers"]
        value = _flag(f"{st['versions_on_disk']} / {st['versions_referenced']}", bool(stray))
        text = "versions on disk / named by records"
        table.add_row("store vs records", value, text + (f"; stray: {stray}" if stray else ""))
    down = run.final.get("shutdown")
    if down:
        clean = down["code"] in (0, -signal.SIGTERM) and not down["engines_left"]
        table.add_row("gateway shutdown (SIGTERM)", _flag(f"exit {down['code']}", not clean),
                      f"{down['seconds']:.1f} s; engine processes left "
                      f"{down['engines_left']}")  # fmt: skip
    return table


# --- main --------------------------------------------------------------------------------------


def write_tenants(path: Path) -> None:
    tenants: dict[str, Any] = {}
    for name, key in TENANT_KEYS.items():
        tenants[name] = {"api_key_sha256": [hash_api_key(key)]}
        if TENANT_LIMITS[name]:
            tenants[name]["limits"] = TENANT_LIMITS[name]
    config = {"admin": {"api_key_sha256": [hash_api_key(ADMIN_KEY)]}, "tenants": tenants}
    path.write_text(yaml.safe_dump(config))


def gateway_env(
    cfg: Config, work: Path, redis: RedisServer, port: int, metrics_port: int, ttft: float,
    token: float,
) -> tuple[dict[str, str], str]:  # fmt: skip
    """The gateway's environment and the base model's name."""
    env = {
        "LORAGATE_PORT": str(port),
        "LORAGATE_METRICS__PORT": str(metrics_port),
        "LORAGATE_TENANTS_FILE": str(work / "tenants.yaml"),
        "LORAGATE_CACHE_DIR": str(work / "cache"),
        "LORAGATE_STORE_DIR": str(work / "store"),
        "LORAGATE_REDIS_URL": redis.url,
        "LORAGATE_MAX_LOADED_ADAPTERS": str(ADAPTER_SLOTS),
        "LORAGATE_ENGINE__MAX_LORAS": str(ADAPTER_SLOTS),
        "LORAGATE_LOG_LEVEL": "info",
    }
    if cfg.engine is EngineKind.fake:
        model_dir = work / "model"
        model_dir.mkdir(exist_ok=True)
        # The base model's shapes, which uploads are validated against (as tests/api does).
        (model_dir / "config.json").write_text(json.dumps(adapter_factory().SMOLLM2_CONFIG))
        extra = ["--ttft-ms", str(ttft), "--token-ms", str(token)]
        env |= {
            "LORAGATE_ENGINE__KIND": "fake",
            "LORAGATE_ENGINE__EXTRA_ARGS": json.dumps(extra),
            "LORAGATE_MODEL__NAME": FAKE_MODEL,
            "LORAGATE_MODEL__PATH": str(model_dir),
        }
        return {**os.environ, **env}, FAKE_MODEL
    model_path = Settings().model_path  # the caller's settings: where `make model` put it
    if not (model_path / "config.json").is_file():
        raise SystemExit(f"no model at {model_path}: run `make model` first")
    env |= {
        "LORAGATE_ENGINE__KIND": "vllm",
        "LORAGATE_MODEL__NAME": VLLM_MODEL,
        "LORAGATE_MODEL__PATH": str(model_path),
    }
    return {**os.environ, **env}, VLLM_MODEL


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(
    minutes: Annotated[float, typer.Option(min=0.5, help="Traffic duration.")] = 30,
    concurrency: Annotated[int, typer.Option(min=1, help="Clients sending at once.")] = 8,
    engine: Annotated[EngineKind, typer.Option(help="fake: loragate's fake engine.")] = (
        EngineKind.fake
    ),
    out: Annotated[
        Path | None, typer.Option(help="Directory for the CSV, PNG and logs (default: a temp dir).")
    ] = None,
    sample_every: Annotated[float, typer.Option(min=0.5, help="Seconds between samples.")] = 5,
    admin_every: Annotated[float, typer.Option(min=0.2, help="Mean s between admin calls.")] = 3,
    redis_down_s: Annotated[float, typer.Option(min=0, help="Seconds Redis stays down.")] = 5,
    ttft_ms: Annotated[float, typer.Option(min=0, help="Fake engine: time to first token.")] = 40,
    token_ms: Annotated[float, typer.Option(min=0, help="Fake engine: time per token.")] = 8,
    request_timeout_s: Annotated[
        float | None, typer.Option(help="A request taking longer is lost (default 60, vllm 300).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the traffic and operator choices.")] = 1,
    keep_work: Annotated[bool, typer.Option(help="Keep the work dir (store, cache).")] = False,
) -> None:  # fmt: skip
    """Soak the gateway: mixed traffic, adapter churn, two Redis restarts; resources over time
    and every request accounted (see the module docstring)."""
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = out or Path(tempfile.gettempdir()) / f"loragate-soak-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lost.jsonl").write_text("")
    cfg = Config(
        minutes=minutes, concurrency=concurrency, engine=engine, out=out_dir,
        sample_every_s=sample_every, admin_every_s=admin_every, redis_down_s=redis_down_s,
        request_timeout_s=request_timeout_s or (60 if engine is EngineKind.fake else 300),
        seed=seed,
    )  # fmt: skip
    console.print(f"[bold]command:[/] {shlex.join(['python', *sys.argv])}", highlight=False)
    console.print(f"[bold]timestamp:[/] {datetime.now(UTC).isoformat(timespec='seconds')}")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # cleanup runs on SIGTERM as on Ctrl-C
    work = Path(tempfile.mkdtemp(prefix="loragate-soak-work-"))
    redis = RedisServer(work)
    gateway: GatewayProcess | None = None
    run: Run | None = None
    try:
        console.print(f"making {len(VARIANTS)} PEFT adapters (work dir {work}) ...")
        variants = load_variants(work / "adapters")
        write_tenants(work / "tenants.yaml")
        redis.start()
        port, metrics_port = free_loopback_port(), free_loopback_port()
        env, model = gateway_env(cfg, work, redis, port, metrics_port, ttft_ms, token_ms)
        gateway = GatewayProcess(env, out_dir / "gateway.log", port, metrics_port)
        console.print(
            f"starting redis :{redis.port} and loragate serve :{port} ({engine.value}) ..."
        )
        gateway.start()
        gateway.wait_ready(READY_TIMEOUT_S[engine.value])
        run = Run(cfg, gateway, redis, work / "store", model, variants)
        run.traffic_s = minutes * 60
        try:
            asyncio.run(soak(run))
        except KeyboardInterrupt:
            run.interrupted = True
            run.final.setdefault("traffic_end_s", run.now())
            console.print("[red]interrupted: stopping, reporting what was measured[/]")
        code, seconds, engines_left = gateway.stop()
        run.final["shutdown"] = {"code": code, "seconds": seconds, "engines_left": engines_left}
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
    finally:
        if gateway is not None:
            gateway.kill_all()
        redis.stop(signal.SIGKILL)
        if (work / "redis.log").exists():
            shutil.copyfile(work / "redis.log", out_dir / "redis.log")
        if keep_work:
            console.print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if run is None or not run.samples:
        raise SystemExit(1)
    write_csv(run.samples, out_dir / "samples.csv")
    plot(run, out_dir / "soak.png")
    summary = {
        "classes": dict(run.classes), "lost_reasons": dict(run.lost_reasons),
        "cache": dict(run.cache), "kinds": dict(run.kinds), "admin": dict(run.admin),
        "admin_failed": dict(run.admin_failed), "redis_events": run.redis_events,
        "final": run.final, "config": {k: str(v) for k, v in asdict(cfg).items()},
        "rss_slope_mib_per_h": {
            "gateway": slope_per_hour(run.samples, "gateway_rss_mib"),
            "engine": slope_per_hour(run.samples, "engine_rss_mib"),
        },
    }  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(report(run))
    console.print(f"samples: {out_dir / 'samples.csv'}\nplot:    {out_dir / 'soak.png'}")
    if run.classes["lost"]:
        console.print(f"lost requests: {out_dir / 'lost.jsonl'}")


if __name__ == "__main__":
    typer.run(main)
