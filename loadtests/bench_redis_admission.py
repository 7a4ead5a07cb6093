"""What a request costs in Redis round trips, before and after issue #9 put its admission-side
checks in one script.

A tenant with all three limits (requests and tokens per minute, concurrent requests) sends
cacheable chat requests (temperature 0) through one gateway with Redis, at concurrency 32, in
front of the fake engine (zero latency; `server/engine_servers/fake_engine.py`), each in its
own process, and a redis-server this script starts:

- `miss`: every prompt new: rate, cache read, coalescing claim, slot and tokens before the
  engine; the result stored, the claim dropped, unused tokens given back, the slot released after.
- `hit`: one prompt over and over: rate and cache read.

`before` is the gateway with `TenantLimiter.admit` swapped back to the checks one at a time
(`baseline_admit` below: exactly the calls the code before #9 made, each its own round trip);
`after` is the code in the tree. Round trips are the gateway's own count of successful Redis
calls (`loragate_redis_call_seconds_count`, by operation); `gateway CPU ms/req` is the CPU time
of the gateway process per request, the least noisy column on a shared machine.

    .venv/bin/python loadtests/bench_redis_admission.py          # about a minute

The machine is shared and noisy: compare rows within one run, not with other runs.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
import yaml
from rich.console import Console
from rich.table import Table

from server.engines.process import free_loopback_port
from server.limits.backends import CacheProbe
from server.limits.tenant_limits import Admitted, TenantLimiter
from server.tenants import Tenant, hash_api_key

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark, as a module
sys.path.append(str(HERE.parent))  # tests.redis_server

from bench_hot_path import MODEL, cpu_s, serve_engine, start, stop, wait_ready  # noqa: E402

from tests.redis_server import RedisServer  # noqa: E402

API_KEY = "sk-bench-acme"
CONCURRENCY = 32
LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000, "max_concurrent": 64}


async def baseline_admit(
    self: TenantLimiter, tenant: Tenant, tokens: int, probe: CacheProbe | None
) -> Admitted:
    """`admit` as the code before #9 did it: count the request now (one round trip); the cache
    then reads and claims, and `reserve` takes the slot and the tokens, each on its own."""
    await self.check_request(tenant)
    return Admitted(None, None)


def serve_gateway(
    port: int, metrics_port: int, engine_url: str, redis_url: str, work: str, variant: str
) -> None:
    import uvicorn

    from server.app import create_app
    from server.metrics_server import start_metrics_listener
    from server.settings import MetricsSettings, Settings

    if variant == "before":
        TenantLimiter.admit = baseline_admit  # type: ignore[method-assign]
    model_dir = Path(work) / "model"
    model_dir.mkdir(exist_ok=True)
    tenants = Path(work) / "tenants.yaml"
    settings = Settings(
        tenants_file=tenants,
        cache_dir=Path(work) / "cache",
        store_dir=Path(work) / "store",
        model={"name": MODEL, "path": model_dir, "max_model_len": 2048},
        engine={"url": engine_url},
        redis_url=redis_url,
    )
    app = create_app(settings)
    start_metrics_listener(app.state.metrics.registry, MetricsSettings(port=metrics_port))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, http="h11")


def write_tenants(path: Path) -> None:
    config = {
        "admin": {"api_key_sha256": [hash_api_key("sk-bench-admin")]},
        "tenants": {"acme": {"api_key_sha256": [hash_api_key(API_KEY)], "limits": LIMITS}},
    }
    path.write_text(yaml.safe_dump(config))


def round_trips(metrics_url: str) -> Counter[str]:
    """Successful Redis calls so far, by operation, from the gateway's own metrics."""
    counts: Counter[str] = Counter()
    for line in httpx.get(metrics_url, timeout=5).text.splitlines():
        if line.startswith("loragate_redis_call_seconds_count{"):
            op = line.split('op="', 1)[1].split('"', 1)[0]
            counts[op] += int(float(line.rsplit(" ", 1)[1]))
    return counts


@dataclass(frozen=True)
class Result:
    code: str
    path: str
    ok: int
    trips_per_req: float
    ops: str
    req_per_s: float
    p50_ms: float
    cpu_ms_per_req: float


async def drive(url: str, path: str, count: int) -> tuple[list[float], int, float]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    run_id = uuid.uuid4().hex  # new prompts each run: a miss is a miss

    def body(i: int) -> dict[str, Any]:
        prompt = "the same prompt" if path == "hit" else f"prompt {run_id} {i}"
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 4,
            "temperature": 0,
        }

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:
        if path == "hit":
            assert (await c.post("/v1/chat/completions", json=body(0))).status_code == 200
        remaining = iter(range(count))
        latencies: list[float] = []
        errors = 0

        async def worker() -> None:
            nonlocal errors
            for i in remaining:
                started = time.perf_counter()
                response = await c.post("/v1/chat/completions", json=body(i))
                want = "hit" if path == "hit" else "miss"
                if response.status_code == 200 and response.headers["x-loragate-cache"] == want:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return latencies, errors, time.perf_counter() - started


def merged(rounds: list[Result]) -> Result:
    """The rounds of one code and path as one row: sums and means."""
    first = rounds[0]
    return Result(
        first.code,
        first.path,
        sum(r.ok for r in rounds),
        trips_per_req=float(np.mean([r.trips_per_req for r in rounds])),
        ops=first.ops,
        req_per_s=float(np.mean([r.req_per_s for r in rounds])),
        p50_ms=float(np.mean([r.p50_ms for r in rounds])),
        cpu_ms_per_req=float(np.mean([r.cpu_ms_per_req for r in rounds])),
    )


def measure(
    code: str, path: str, server: BaseProcess, url: str, metrics_url: str, count: int
) -> Result:
    pid = server.pid
    assert pid is not None
    asyncio.run(drive(url, path, CONCURRENCY * 2))  # warm-up
    trips_before, cpu_before = round_trips(metrics_url), cpu_s(pid)
    latencies, errors, wall = asyncio.run(drive(url, path, count))
    cpu = cpu_s(pid) - cpu_before
    trips = round_trips(metrics_url) - trips_before
    if errors:
        raise SystemExit(f"{code} {path}: {errors} requests failed or were not a {path}")
    per_op = " ".join(f"{op}:{n / count:.0f}" for op, n in sorted(trips.items()) if n >= count / 2)
    return Result(
        code,
        path,
        len(latencies),
        trips_per_req=sum(trips.values()) / count,
        ops=per_op,
        req_per_s=len(latencies) / wall,
        p50_ms=float(np.percentile(latencies, 50)) * 1000,
        cpu_ms_per_req=cpu / count * 1000,
    )


def table(results: list[Result]) -> Table:
    t = Table(title=f"cacheable chat requests, 3 tenant limits, Redis, concurrency {CONCURRENCY}")
    for header in ["path", "code", "ok", "Redis round trips/req", "by op (per request)",
                   "req/s", "p50 ms", "gateway CPU ms/req"]:  # fmt: skip
        t.add_column(
            header, justify="left" if header in ("path", "code", "by op (per request)") else "right"
        )
    for r in results:
        t.add_row(
            r.path, r.code, str(r.ok), f"{r.trips_per_req:.2f}", r.ops,
            f"{r.req_per_s:.0f}", f"{r.p50_ms:.1f}", f"{r.cpu_ms_per_req:.2f}",
        )  # fmt: skip
    return t


def main(
    requests: Annotated[int, typer.Option(help="Measured requests per row.")] = 2000,
) -> None:
    console = Console(width=160)
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        work = Path(tmp)
        write_tenants(work / "tenants.yaml")
        redis = RedisServer(work)
        redis.start()
        engine_port = free_loopback_port()
        engine_url = f"http://127.0.0.1:{engine_port}"
        engine = start(serve_engine, engine_port)
        gateways: dict[str, tuple[BaseProcess, str, str]] = {}
        results: list[Result] = []
        try:
            wait_ready(engine_url, "/health")
            for code in ("before", "after"):  # both up at once, measured in turn
                port, metrics_port = free_loopback_port(), free_loopback_port()
                url = f"http://127.0.0.1:{port}"
                metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
                args = (port, metrics_port, engine_url, redis.url, str(work), code)
                gateways[code] = (start(serve_gateway, *args), url, metrics_url)
                wait_ready(url, "/readyz")
            # ABBA, so a machine that gets busier or quieter over the run favours neither.
            for path in ("miss", "hit"):
                rounds = [
                    measure(code, path, *gateways[code], requests // 2)
                    for code in ("before", "after", "after", "before")
                ]
                for code in ("before", "after"):
                    result = merged([r for r in rounds if r.code == code])
                    console.log(f"{code} {path}: {result.req_per_s:.0f} req/s")
                    results.append(result)
        finally:
            for gateway, _, _ in gateways.values():
                stop(gateway)
            stop(engine)
            redis.stop()
    results.sort(key=lambda r: (r.path != "miss", r.code != "before"))
    console.print(table(results))


if __name__ == "__main__":
    typer.run(main)
