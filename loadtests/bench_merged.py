"""What merging a hot adapter wins back, measured in one run against real vLLM engines.

The script starts what it measures, on free loopback ports, sharing a file store: two base
engines (`loragate engine`, adapters hot-swapped) and, once the hot adapter is merged
(`adapters merge`, through a set-up gateway), a merged engine (`loragate engine --merged`).
Then, for each set-up, a gateway in front of two engines and the same workload through it:

- `base only`: every request names the base model (the ceiling: no LoRA at all);
- `all hot-swap`: requests over 8 adapters, Zipf-distributed (s = `--zipf-s`; the hottest takes
  about half), on the two base engines;
- `hot merged`: the same requests, on one base engine and the hot adapter's merged engine.

Every request streams `--max-tokens` tokens (`ignore_eos`, uncached), `--concurrency` at once.
Output tok/s is completion tokens over the wall time; TTFT is the client's, to the first
content chunk. The ratio is to `base only`. Two engines in each set-up, so the hardware is
the same; the machine is shared and noisy: compare ratios within one run.

    .venv/bin/python loadtests/bench_merged.py            # after `make model`
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from server.engines.process import free_loopback_port
from server.settings import Settings

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from loadtests.bench_cache import LORAGATE, MODEL, PIPE_WIDTH, started, wait_ready
from tests.adapter_factory import write_peft_adapter
from tests.support import ADMIN_KEY, ENGINE_KEY, TENANT_KEYS, write_tenants_file

ADAPTERS = 8
HOT = "adapter-0"
ENGINE_READY_S = 600


def wait_healthy(url: str, log: Path) -> None:
    deadline = time.monotonic() + ENGINE_READY_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not healthy after {ENGINE_READY_S} s; see {log}")


def admin(url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    response = httpx.request(
        method, f"{url}/admin/v1/tenants/acme/adapters/{path}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=900, **kwargs,
    )  # fmt: skip
    if not response.is_success:
        raise SystemExit(f"{method} {path}: {response.status_code} {response.text}")
    return response


def workload(requests: int, zipf_s: float, seed: int) -> list[str]:
    """The adapter each request names: Zipf over ADAPTERS, adapter-0 the hottest."""
    weights = np.arange(1, ADAPTERS + 1, dtype=float) ** -zipf_s
    rng = np.random.default_rng(seed)
    picks = rng.choice(ADAPTERS, size=requests, p=weights / weights.sum())
    return [f"adapter-{i}" for i in picks]


async def one(
    client: httpx.AsyncClient, url: str, model: str, i: int, max_tokens: int
) -> tuple[float, int]:
    """(time to the first content chunk, completion tokens) of one streamed request."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    headers = {"Authorization": f"Bearer {TENANT_KEYS['acme']}", "Cache-Control": "no-cache"}
    started_at = time.perf_counter()
    ttft, tokens = float("nan"), 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            choices = event.get("choices") or []
            if ttft != ttft and choices and choices[0].get("delta", {}).get("content"):
                ttft = time.perf_counter() - started_at
            if event.get("usage"):
                tokens = int(event["usage"]["completion_tokens"])
    return ttft, tokens


async def run_phase(
    url: str, models: list[str], concurrency: int, max_tokens: int, progress: Progress, name: str
) -> dict[str, float]:
    task = progress.add_task(name, total=len(models))
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        # Warm-up, untimed: every adapter loaded once where it will be served.
        for model in dict.fromkeys(models):
            await one(client, url, model, -1, 1)

        async def limited(i: int, model: str) -> tuple[float, int]:
            async with gate:
                result = await one(client, url, model, i, max_tokens)
            progress.advance(task)
            return result

        started_at = time.perf_counter()
        results = await asyncio.gather(*(limited(i, m) for i, m in enumerate(models)))
        wall = time.perf_counter() - started_at
    ttfts = [t for t, _ in results]
    return {
        "requests": len(results),
        "tok_s": sum(n for _, n in results) / wall,
        "ttft_p50": float(np.nanpercentile(ttfts, 50)),
        "ttft_p95": float(np.nanpercentile(ttfts, 95)),
    }


def table(rows: dict[str, dict[str, float]]) -> Table:
    out = Table("set-up", "requests", "output tok/s", "TTFT p50 ms", "TTFT p95 ms", "vs base only")
    ceiling = rows["base only"]["tok_s"]
    for name, r in rows.items():
        out.add_row(
            name, f"{r['requests']:.0f}", f"{r['tok_s']:.1f}", f"{r['ttft_p50'] * 1000:,.0f}",
            f"{r['ttft_p95'] * 1000:,.0f}", f"{r['tok_s'] / ceiling:.0%}",
        )  # fmt: skip
    return out


def main(
    requests: Annotated[int, typer.Option(min=8, help="Requests per set-up.")] = 96,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests at once.")] = 16,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens each request streams.")] = 48,
    zipf_s: Annotated[float, typer.Option(help="Zipf exponent over the 8 adapters.")] = 1.5,
    seed: Annotated[int, typer.Option(help="The workload's seed.")] = 0,
) -> None:
    """Output throughput and TTFT for base only, all hot-swap and the hot adapter merged."""
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    tmp = Path(tempfile.mkdtemp(prefix="bench-merged-"))
    write_tenants_file(tmp / "tenants.yaml")
    common = {
        "LORAGATE_TENANTS_FILE": str(tmp / "tenants.yaml"),
        "LORAGATE_MODEL__PATH": str(Settings().model_path),
        "LORAGATE_ENGINE__API_KEY": ENGINE_KEY,
        "LORAGATE_STORE_URL": (tmp / "store").resolve().as_uri(),
        "LORAGATE_METRICS__PORT": "0",
    }
    ports = {name: free_loopback_port() for name in ("base1", "base2", "merged")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}

    def engine(name: str, *args: str) -> Any:
        argv = [LORAGATE, "engine", "--port", str(ports[name]), *args]
        env = {**common, "LORAGATE_CACHE_DIR": str(tmp / name)}
        return started(argv, tmp / f"{name}.log", env)

    def gateway(name: str, engines: list[str]) -> tuple[Any, str]:
        port = free_loopback_port()
        argv = [LORAGATE, "serve", *(a for e in engines for a in ("--engine-url", urls[e]))]
        env = {**common, "LORAGATE_PORT": str(port), "LORAGATE_CACHE_DIR": str(tmp / name)}
        return started(argv, tmp / f"{name}.log", env), f"http://127.0.0.1:{port}"

    console.print(f"starting the engines (logs in {tmp}) ...")
    rows: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        stack.enter_context(engine("base1"))
        stack.enter_context(engine("base2"))
        dirs = [write_peft_adapter(tmp / f"a{i}", seed=i) for i in range(ADAPTERS)]
        for name in ("base1", "base2"):
            wait_healthy(urls[name], tmp / f"{name}.log")
        setup, setup_url = gateway("setup", ["base1"])
        with setup:
            wait_ready(setup_url, tmp / "setup.log")
            for i, directory in enumerate(dirs):
                files = {
                    field: (path.name, path.read_bytes())
                    for field, path in (
                        ("adapter_config", directory / "adapter_config.json"),
                        ("adapter_model", directory / "adapter_model.safetensors"),
                    )
                }
                admin(setup_url, "PUT", f"adapter-{i}", files=files)
            console.print(f"merging {HOT} ...")
            admin(setup_url, "POST", f"{HOT}/merge")
        stack.enter_context(engine("merged", "--merged", f"acme/{HOT}"))
        wait_healthy(urls["merged"], tmp / "merged.log")

        models = workload(requests, zipf_s, seed)
        hot_share = models.count(HOT) / len(models)
        phases = {
            "base only": (["base1", "base2"], [MODEL] * requests),
            "all hot-swap": (["base1", "base2"], models),
            "hot merged": (["base1", "merged"], models),
        }
        with Progress(console=console, transient=True) as progress:
            for name, (engines, phase_models) in phases.items():
                context, url = gateway(name.replace(" ", "-"), engines)
                with context:
                    wait_ready(url, tmp / f"{name}.log")
                    rows[name] = asyncio.run(
                        run_phase(url, phase_models, concurrency, max_tokens, progress, name)
                    )
    console.print(f"[bold]command:[/] {' '.join(sys.argv)}", highlight=False)
    console.print(f"{HOT} takes {hot_share:.0%} of the adapter requests")
    console.print(table(rows))


if __name__ == "__main__":
    typer.run(main)
