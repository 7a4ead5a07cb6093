"""What the result cache and coalescing save, measured in one run against the real engine.

The script starts what it measures, on free loopback ports: a `redis-server`; gateway `redis-a`
(`loragate serve` with its local vLLM engine and Redis); gateway `redis-b` (Redis, in front of
the same engine through `--engine-url`); gateway `memory` (the in-process cache, same engine).
All use the tests' tenants file (`tests/support.py`, no limits) and the prepared default model.

1. Hit latency. For `--prompts` distinct greedy chat requests (`max_tokens` `--max-tokens`,
   not streamed), on each of `redis-a` and `memory`: one request with `Cache-Control: no-cache`
   (the engine path: computed by the engine, then stored), then `--hits` identical requests
   (each must answer `x-loragate-cache: hit`). Client-side latency, p50 / p95, per path:
   `engine`, `redis hit`, `memory hit`, and the engine/hit ratio of the p50s.

2. Coalescing. `--bursts` bursts of `--burst` identical requests sent at once, each burst with a
   fresh prompt, in three set-ups: `no coalescing` (every request `no-cache, no-store`: each goes
   to the engine), `in-process` (all to `memory`), `redis, 2 gateways` (half to `redis-a`, half
   to `redis-b`). Engine requests are counted by vLLM itself (`vllm:request_success_total` on
   the engine's /metrics), so `saved` is requests minus engine calls; p50 / p95 latency and the
   wall time of a burst are the client's.

    .venv/bin/python loadtests/bench_cache.py            # after `make model`

The machine is shared and noisy: absolute numbers mean little; compare ratios within one run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from server.engines.process import free_loopback_port
from server.settings import Settings

# tests.support (the test tenants, vLLM's request count) lives under the repo root.
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from tests.support import (
    ENGINE_KEY,
    TENANT_KEYS,
    settled_vllm_requests,
    vllm_finished_requests,
    write_tenants_file,
)

LORAGATE = str(Path(sys.executable).parent / "loragate")
API_KEY = TENANT_KEYS["acme"]
MODEL = "SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 600
PIPE_WIDTH = 120


@dataclass(frozen=True)
class Gateway:
    name: str
    url: str


@contextmanager
def started(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {READY_TIMEOUT_S} s; see {log}")


def body(prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }


async def timed(
    client: httpx.AsyncClient, gateway: Gateway, payload: dict[str, Any], cache_control: str = ""
) -> tuple[float, str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if cache_control:
        headers["Cache-Control"] = cache_control
    started_at = time.perf_counter()
    r = await client.post(f"{gateway.url}/v1/chat/completions", json=payload, headers=headers)
    elapsed = time.perf_counter() - started_at
    r.raise_for_status()
    return elapsed, r.headers["x-loragate-cache"]


def pct_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


async def hit_latency(
    client: httpx.AsyncClient, gateways: list[Gateway], prompts: int, hits: int, max_tokens: int
) -> dict[str, list[float]]:
    paths: dict[str, list[float]] = {"engine": []}
    for i in range(prompts):
        for gateway in gateways:
            payload = body(f"Describe item {i} in a sentence. ({uuid.uuid4().hex[:8]})", max_tokens)
            elapsed, _ = await timed(client, gateway, payload, "no-cache")
            paths["engine"].append(elapsed)
            for _ in range(hits):
                elapsed, status = await timed(client, gateway, payload)
                if status != "hit":
                    raise SystemExit(f"expected a hit on {gateway.name}, got {status}")
                paths.setdefault(f"{gateway.name} hit", []).append(elapsed)
    return paths


async def burst_run(
    client: httpx.AsyncClient,
    targets: list[Gateway],
    size: int,
    bursts: int,
    max_tokens: int,
    cache_control: str,
    engine_url: str,
) -> dict[str, Any]:
    latencies: list[float] = []
    walls: list[float] = []
    before = vllm_finished_requests(engine_url)
    for _ in range(bursts):
        payload = body(f"Tell a fact about the number {uuid.uuid4().int % 10_000}.", max_tokens)
        started_at = time.perf_counter()
        results = await asyncio.gather(
            *(timed(client, targets[i % len(targets)], payload, cache_control) for i in range(size))
        )
        walls.append(time.perf_counter() - started_at)
        latencies += [elapsed for elapsed, _ in results]
    calls = settled_vllm_requests(engine_url, before + bursts) - before
    return {"requests": size * bursts, "engine_calls": calls, "latency": latencies, "wall": walls}


def hit_table(paths: dict[str, list[float]]) -> Table:
    table = Table(title="Cache hit vs engine path (same requests, not streamed)")
    for column in ("path", "requests", "p50 ms", "p95 ms", "engine p50 / p50"):
        table.add_column(column, justify="left" if column == "path" else "right")
    engine_p50 = pct_ms(paths["engine"], 50)
    for name, values in paths.items():
        p50 = pct_ms(values, 50)
        table.add_row(
            name, str(len(values)), f"{p50:.2f}", f"{pct_ms(values, 95):.2f}",
            f"{engine_p50 / p50:.0f}x" if name != "engine" else "1x",
        )  # fmt: skip
    return table


def burst_table(rows: dict[str, dict[str, Any]], size: int) -> Table:
    table = Table(title=f"Coalescing: bursts of {size} identical requests")
    for column in (
        "set-up", "requests", "engine calls", "saved", "p50 ms", "p95 ms", "burst wall p50 ms"
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "set-up" else "right")
    for name, row in rows.items():
        calls = row["engine_calls"]
        table.add_row(
            name, str(row["requests"]), f"{calls:.0f}", f"{row['requests'] - calls:.0f}",
            f"{pct_ms(row['latency'], 50):.0f}", f"{pct_ms(row['latency'], 95):.0f}",
            f"{pct_ms(row['wall'], 50):.0f}",
        )  # fmt: skip
    return table


async def measure(
    gateways: dict[str, Gateway], engine_url: str, opts: dict[str, int]
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await timed(client, gateways["memory"], body("warm up", 4), "no-cache")
        paths = await hit_latency(
            client, [gateways["redis"], gateways["memory"]], opts["prompts"], opts["hits"],
            opts["max_tokens"],
        )  # fmt: skip
        size, bursts, max_tokens = opts["burst"], opts["bursts"], opts["max_tokens"]
        set_ups = {
            "no coalescing": ([gateways["memory"]], "no-cache, no-store"),
            "in-process": ([gateways["memory"]], ""),
            "redis, 2 gateways": ([gateways["redis"], gateways["redis-b"]], ""),
        }
        rows = {
            name: await burst_run(client, targets, size, bursts, max_tokens, cc, engine_url)
            for name, (targets, cc) in set_ups.items()
        }
    return paths, rows


def main(
    prompts: Annotated[int, typer.Option(min=1, help="Distinct requests for hit latency.")] = 10,
    hits: Annotated[int, typer.Option(min=1, help="Hits measured per request.")] = 20,
    burst: Annotated[int, typer.Option(min=2, help="Identical requests per burst.")] = 32,
    bursts: Annotated[int, typer.Option(min=1, help="Bursts per set-up.")] = 3,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of every request.")] = 32,
) -> None:
    """Cache-hit latency (Redis, in-process) vs the engine path, and engine calls saved by
    coalescing; starts redis-server, the engine and three gateways itself."""
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (`make redis-server`)")
    model_path = Settings().model_path
    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    write_tenants_file(tmp / "tenants.yaml")
    redis_port, engine_port = free_loopback_port(), free_loopback_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    engine_url = f"http://127.0.0.1:{engine_port}"
    ports = {name: free_loopback_port() for name in ("redis", "redis-b", "memory")}
    gateways = {name: Gateway(name, f"http://127.0.0.1:{port}") for name, port in ports.items()}

    def env(name: str, **extra: str) -> dict[str, str]:
        return {
            "LORAGATE_PORT": str(ports[name]),
            "LORAGATE_METRICS__PORT": "0",  # a free one each: three gateways share this host
            "LORAGATE_TENANTS_FILE": str(tmp / "tenants.yaml"),
            "LORAGATE_CACHE_DIR": str(tmp / name),
            "LORAGATE_MODEL__PATH": str(model_path),
            "LORAGATE_ENGINE__API_KEY": ENGINE_KEY,  # the engine is shared: one key for all
            **extra,
        }

    redis_argv = [redis_bin, "--port", str(redis_port), "--save", "", "--appendonly", "no"]
    attach = [LORAGATE, "serve", "--engine-url", engine_url]
    console.print(f"starting redis, the engine and 3 gateways (logs in {tmp}) ...")
    with (
        started(redis_argv, tmp / "redis.log"),
        started(
            [LORAGATE, "serve"], tmp / "redis-a.log",
            env("redis", LORAGATE_REDIS_URL=redis_url, LORAGATE_ENGINE__PORT=str(engine_port)),
        ),
        started(attach, tmp / "redis-b.log", env("redis-b", LORAGATE_REDIS_URL=redis_url)),
        started(attach, tmp / "memory.log", env("memory")),
    ):  # fmt: skip
        for name, gateway in gateways.items():
            wait_ready(gateway.url, tmp / f"{name}.log")
        opts = {"prompts": prompts, "hits": hits, "burst": burst, "bursts": bursts,
                "max_tokens": max_tokens}  # fmt: skip
        paths, rows = asyncio.run(measure(gateways, engine_url, opts))
    console.print(f"[bold]command:[/] {' '.join(sys.argv)}", highlight=False)
    console.print(hit_table(paths))
    console.print(burst_table(rows, burst))


if __name__ == "__main__":
    typer.run(main)
