"""What the per-request hot path costs as a deployment grows: authentication against many
tenants, and reading an adapter's registry record, before and after issue #9.

`before` is the code #9 replaced, reimplemented below (`baseline_authenticate`, `baseline_get`)
so that it stays measurable after the change is committed: every stored key digest compared
with `hmac.compare_digest`, no early exit; the record file read and parsed on a worker thread
for every adapter request. `after` is the code in the tree: a dict lookup by digest; the record
served from memory after one `stat` on the event loop (`LocalAdapterRegistry.peek`).

1. `authenticate`, µs per call, with 3 / 10,000 / 100,000 tenants, for a tenant's key (the last
   in the file) and an unknown key.
2. The record lookup, µs each, one at a time and 32 at once on one event loop: `before` (read
   and parse on a worker thread), `after` (`peek`, the thread only on a miss), and the parts:
   the thread hop alone, the read and parse alone, the stat alone; and the harness alone (a
   coroutine that does nothing; "32 at once" runs each lookup as a task), to subtract.
3. The gateway at concurrency 32 in front of the fake engine
   (`server/engine_servers/fake_engine.py`, zero latency), each in its own process, with 3 and
   with 10,000 tenants, `before` (the gateway process with the two functions swapped back in)
   and `after`: requests/s and latency for the
   base model and for an adapter, and the same load sent to the engine directly as the
   reference. `overhead p50` is the gateway's p50 minus the engine's; `server CPU ms/req` is
   the CPU time (all threads) of the process the requests went to, per request, warm-up
   included: the least noisy column here, since the client shares the machine's cores.

    .venv/bin/python loadtests/bench_hot_path.py             # about a minute

The result cache is off (every request reaches the engine) and there are no tenant limits.
The machine is shared and noisy: compare rows within one run, not with other runs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
import yaml
from rich.console import Console
from rich.table import Table

from adapters.registry import TENANT_NAME, LocalAdapterRegistry
from adapters.store import DIGEST
from adapters.types import ADAPTER_NAME, AdapterRecord
from server.engines.process import free_loopback_port
from server.tenants import MAX_KEY_CHARS, Principal, TenantDirectory, TenantsFile, hash_api_key

MODEL = "bench-model"
TENANT, ADAPTER = "acme", "support-bot"
API_KEY = "sk-bench-acme"
CONCURRENCY = 32
READY_TIMEOUT_S = 60


# --- before: the code #9 replaced -------------------------------------------------------------


def baseline_authenticate(directory: TenantDirectory, key: str) -> Principal | None:
    """The loop `TenantDirectory.authenticate` ran before #9: every digest compared."""
    if not key or len(key) > MAX_KEY_CHARS:
        return None
    presented = hashlib.sha256(key.encode()).digest()
    found: Principal | None = None
    for digest, principal in directory._keys.items():  # no early exit: constant work per key
        if hmac.compare_digest(presented, digest):
            found = principal
    return found


def baseline_get(registry: LocalAdapterRegistry, tenant: str, name: str) -> AdapterRecord | None:
    """`LocalAdapterRegistry.get` before #9: the record file read and parsed on every call."""
    if TENANT_NAME.fullmatch(tenant) is None or ADAPTER_NAME.fullmatch(name) is None:
        return None
    path = registry._root / tenant / f"{name}.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        record = AdapterRecord.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError):
        return None
    if (record.tenant, record.name) != (tenant, name) or not DIGEST.fullmatch(record.digest):
        return None
    return record


def install_baseline() -> None:
    """Put the code #9 replaced back into this process (the gateway child of `before` runs)."""
    TenantDirectory.authenticate = baseline_authenticate  # type: ignore[method-assign,assignment]
    LocalAdapterRegistry.peek = lambda self, tenant, name: None  # type: ignore[method-assign]
    LocalAdapterRegistry.get = baseline_get  # type: ignore[method-assign,assignment]


# --- set-up --------------------------------------------------------------------------------


def tenants_config(count: int) -> dict[str, Any]:
    """`acme` (key API_KEY) last, after count - 1 other tenants, and an admin."""
    tenants: dict[str, Any] = {
        f"tenant-{i}": {"api_key_sha256": [hash_api_key(f"sk-bench-{i}")]} for i in range(count - 1)
    }
    tenants[TENANT] = {"api_key_sha256": [hash_api_key(API_KEY)]}
    return {"admin": {"api_key_sha256": [hash_api_key("sk-bench-admin")]}, "tenants": tenants}


def bench_record() -> AdapterRecord:
    return AdapterRecord(
        tenant=TENANT,
        name=ADAPTER,
        digest=hashlib.sha256(b"bench adapter").hexdigest(),
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        size_bytes=1234,
        created_at="2025-01-01T00:00:00Z",
    )


def prepare_store(store: Path) -> None:
    """The adapter's record, and an (empty) blob dir, which is all the fake engine needs."""
    record = bench_record()
    LocalAdapterRegistry(store).put(record, replace=True)
    (store / "blobs" / record.digest).mkdir(parents=True, exist_ok=True)


# --- 1 and 2: micro-benchmarks ---------------------------------------------------------------


def per_call_us(call: Callable[[], object], min_s: float = 0.3) -> float:
    """µs per call, the loop run in doubling batches until a batch takes `min_s`."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            call()
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / n * 1e6
        n *= 2


def auth_table(counts: list[int]) -> Table:
    table = Table(title="authenticate, µs per call")
    for header in ["tenants", "code", "tenant key", "unknown key"]:
        table.add_column(header, justify="left" if header == "code" else "right")
    for count in counts:
        directory = TenantDirectory(TenantsFile.model_validate(tenants_config(count)))
        codes: dict[str, Callable[[str], Principal | None]] = {
            "before (loop)": functools.partial(baseline_authenticate, directory),
            "after (dict)": directory.authenticate,
        }
        for label, auth in codes.items():
            assert auth(API_KEY) == Principal(directory.tenant(TENANT))
            assert auth("sk-nobody") is None
            known = per_call_us(functools.partial(auth, API_KEY))
            unknown = per_call_us(functools.partial(auth, "sk-nobody"))
            table.add_row(f"{count:,}", label, f"{known:.2f}", f"{unknown:.2f}")
    return table


async def lookup_us(lookup: Callable[[], Awaitable[object]], together: int, rounds: int) -> float:
    """µs per lookup with `together` of them awaited at once (as tasks), `rounds` times."""
    start = time.perf_counter()
    for _ in range(rounds):
        if together == 1:
            await lookup()
        else:
            await asyncio.gather(*(lookup() for _ in range(together)))
    return (time.perf_counter() - start) / (together * rounds) * 1e6


async def lookup_rows(store: Path, rounds: int) -> list[tuple[str, float, float]]:
    registry = LocalAdapterRegistry(store)
    path = str(store / "registry" / TENANT / f"{ADAPTER}.json")

    async def before() -> object:
        return await asyncio.to_thread(baseline_get, registry, TENANT, ADAPTER)

    async def after() -> object:  # what GenerationService._resolve does
        record = registry.peek(TENANT, ADAPTER)
        if record is None:
            record = await asyncio.to_thread(registry.get, TENANT, ADAPTER)
        return record

    async def hop() -> object:
        return await asyncio.to_thread(lambda: None)

    async def read_parse() -> object:
        return baseline_get(registry, TENANT, ADAPTER)

    async def stat() -> object:
        return os.stat(path)

    async def nothing() -> object:
        return None

    assert await before() == await after() == bench_record()
    cases = [
        ("before: read + parse on a thread", before),
        ("after: peek (one stat), thread on a miss", after),
        ("part: thread hop alone", hop),
        ("part: read + parse, no thread", read_parse),
        ("part: stat alone", stat),
        ("the harness alone (subtract it)", nothing),
    ]
    rows = []
    for label, lookup in cases:
        one = await lookup_us(lookup, 1, rounds * CONCURRENCY)
        rows.append((label, one, await lookup_us(lookup, CONCURRENCY, rounds)))
    return rows


def lookup_table(rows: list[tuple[str, float, float]]) -> Table:
    table = Table(title="adapter record lookup, µs each (one event loop)")
    for header in ["lookup", "one at a time", f"{CONCURRENCY} at once"]:
        table.add_column(header, justify="left" if header == "lookup" else "right")
    for label, one, together in rows:
        table.add_row(label, f"{one:.2f}", f"{together:.2f}")
    return table


# --- 3: the gateway --------------------------------------------------------------------------


def serve_engine(port: int) -> None:
    import uvicorn

    from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app

    app = create_fake_engine_app(FakeEngineKnobs(model=MODEL, max_model_len=2048))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def serve_gateway(port: int, engine_url: str, work: str, tenants_file: str, variant: str) -> None:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    if variant == "before":
        install_baseline()
    model_dir = Path(work) / "model"
    model_dir.mkdir(exist_ok=True)
    settings = Settings(
        tenants_file=Path(tenants_file),
        cache_dir=Path(work) / "cache",
        store_dir=Path(work) / "store",
        model={"name": MODEL, "path": model_dir, "max_model_len": 2048},
        engine={"url": engine_url},
        cache={"enabled": False},
    )
    app = create_app(settings)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, http="h11")


def start(target: Callable[..., None], *args: object) -> BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def stop(process: BaseProcess) -> None:
    process.terminate()  # this script's own child, by its handle
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(10)


def wait_ready(url: str, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url}{path} not ready after {READY_TIMEOUT_S} s")


@dataclass(frozen=True)
class LoadResult:
    tenants: int
    code: str
    target: str
    ok: int
    errors: int
    req_per_s: float
    p50_ms: float
    p95_ms: float
    cpu_ms_per_req: float  # of the process the requests went to


def cpu_s(pid: int) -> float:
    """User plus system CPU time of process `pid`, all threads (Linux: /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, model: str, warmup: int, count: int) -> tuple[list[float], int, float]:
    """`count` chat requests, CONCURRENCY in flight, after `warmup` unmeasured ones: latencies
    (s) of the ok ones, the error count, the wall time."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:

        async def run(n: int) -> tuple[list[float], int]:
            remaining = iter(range(n))
            latencies: list[float] = []
            errors = 0

            async def worker() -> None:
                nonlocal errors
                for _ in remaining:
                    started = time.perf_counter()
                    response = await c.post("/v1/chat/completions", json=body)
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return latencies, errors

        await run(warmup)
        started = time.perf_counter()
        latencies, errors = await run(count)
        return latencies, errors, time.perf_counter() - started


def measure(
    label: tuple[int, str, str], server: BaseProcess, url: str, model: str, count: int
) -> LoadResult:
    assert server.pid is not None
    warmup = max(CONCURRENCY * 2, count // 10)
    cpu_before = cpu_s(server.pid)
    latencies, errors, wall = asyncio.run(drive(url, model, warmup, count))
    cpu_per_req = (cpu_s(server.pid) - cpu_before) / (warmup + count)
    return LoadResult(
        *label,
        ok=len(latencies),
        errors=errors,
        req_per_s=len(latencies) / wall,
        p50_ms=float(np.percentile(latencies, 50)) * 1000 if latencies else float("nan"),
        p95_ms=float(np.percentile(latencies, 95)) * 1000 if latencies else float("nan"),
        cpu_ms_per_req=cpu_per_req * 1000,
    )


def measure_logged(
    label: tuple[int, str, str],
    server: BaseProcess,
    url: str,
    model: str,
    count: int,
    progress: Console,
) -> LoadResult:
    result = measure(label, server, url, model, count)
    tenants, code, target = label
    progress.log(
        f"{tenants} tenants, {code}, {target}: {result.ok} ok, {result.errors} err, "
        f"{result.req_per_s:.0f} req/s"
    )
    return result


def gateway_runs(
    work: Path, counts: list[int], requests: int, progress: Console
) -> list[LoadResult]:
    """Per tenant count: one fake engine, measured directly, then a `before` and an `after`
    gateway in front of it, each measured for the base model and for the adapter."""
    results = []
    for count in counts:
        tenants_file = work / f"tenants-{count}.yaml"
        tenants_file.write_text(yaml.safe_dump(tenants_config(count)))
        engine_port = free_loopback_port()
        engine_url = f"http://127.0.0.1:{engine_port}"
        engine = start(serve_engine, engine_port)
        try:
            wait_ready(engine_url, "/health")
            direct = (count, "-", "engine directly")
            results.append(measure_logged(direct, engine, engine_url, MODEL, requests, progress))
            for code in ("before", "after"):
                port = free_loopback_port()
                url = f"http://127.0.0.1:{port}"
                args = (port, engine_url, str(work), str(tenants_file), code)
                gateway = start(serve_gateway, *args)
                try:
                    wait_ready(url, "/readyz")
                    for target, model in (("gateway: base", MODEL), ("gateway: adapter", ADAPTER)):
                        label = (count, code, target)
                        result = measure_logged(label, gateway, url, model, requests, progress)
                        results.append(result)
                finally:
                    stop(gateway)
        finally:
            stop(engine)
    return results


def load_table(results: list[LoadResult]) -> Table:
    table = Table(
        title=f"chat completions at concurrency {CONCURRENCY}, fake engine (zero latency)"
    )
    headers = ["tenants", "code", "target", "ok", "err", "req/s", "p50 ms", "p95 ms"]
    for header in [*headers, "overhead p50 ms", "server CPU ms/req"]:
        table.add_column(header, justify="left" if header in ("code", "target") else "right")
    direct = {r.tenants: r for r in results if r.target == "engine directly"}
    for r in results:
        reference = direct.get(r.tenants)
        overhead = "-"
        if reference is not None and r is not reference:
            overhead = f"{r.p50_ms - reference.p50_ms:.2f}"
        table.add_row(
            f"{r.tenants:,}", r.code, r.target, str(r.ok), str(r.errors),
            f"{r.req_per_s:.0f}", f"{r.p50_ms:.2f}", f"{r.p95_ms:.2f}", overhead,
            f"{r.cpu_ms_per_req:.3f}",
        )  # fmt: skip
    return table


def main(
    requests: Annotated[
        int, typer.Option(min=CONCURRENCY, help="Measured requests per gateway row.")
    ] = 1000,
    lookup_rounds: Annotated[
        int, typer.Option(min=1, help="Batches of 32 lookups per record-lookup row.")
    ] = 300,
    skip_gateway: Annotated[bool, typer.Option(help="Only the micro-benchmarks.")] = False,
) -> None:
    """Time authentication, the record lookup and the gateway, before and after #9."""
    console = Console(width=140)  # the tables' width, also when piped to a file
    console.print(f"[bold]command:[/] {shlex.join(['python', *sys.argv])}", highlight=False)
    console.print(f"[bold]timestamp:[/] {datetime.now(UTC).isoformat(timespec='seconds')}")
    console.print(auth_table([3, 10_000, 100_000]))
    with tempfile.TemporaryDirectory(prefix="bench-hot-path-") as tmp:
        work = Path(tmp)
        prepare_store(work / "store")
        console.print(lookup_table(asyncio.run(lookup_rows(work / "store", lookup_rounds))))
        if not skip_gateway:
            progress = Console(stderr=True)
            console.print(load_table(gateway_runs(work, [3, 10_000], requests, progress)))


if __name__ == "__main__":
    typer.run(main)
