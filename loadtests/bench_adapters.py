"""What serving tenants' LoRA adapters costs, against one running gateway, in one run.

1. Mix throughput. The same streaming `POST /v1/chat/completions` load (`--requests`
   requests, `--concurrency` in flight, `--max-tokens`, prompts of about
   `--prompt-tokens` words) is run back to back for four scenarios:

   - `base`: every request to the base model;
   - `1-adapter`: every request to one adapter;
   - `8-uniform`: 8 adapters, one drawn uniformly at random per request;
   - `8-zipf`: 8 adapters, adapter k drawn with weight 1/k^1.1 (a few popular ones).

   Per scenario: requests ok / failed, p50 and p95 time to first token, output tokens/s,
   their ratios to `base`, and how many adapter loads / unloads the gateway did meanwhile
   (`loragate_adapter_{loads,unloads}_total{result="ok"}` from the gateway's metrics
   listener, `--metrics-url`, before and after). The scenarios run in that order without a
   reset, so an adapter scenario starts with whatever the previous one left loaded
   (`--warmup` base-model requests run once, unmeasured, before the first scenario).

2. Cold path, one request in flight, `max_tokens` 8, each case `--repeats` times
   (median reported), the cases interleaved per repeat:

   - `base model`: a base-model request, the reference;
   - `loaded adapter`: the same adapter requested twice; the second's TTFT;
   - `evicted adapter`: adapter X, then `--max-loaded` + 1 other adapters so that the
     least-recently-used eviction unloads X, then X again; its TTFT;
   - `upload -> first token`: a fresh adapter uploaded
     (`PUT /admin/v1/tenants/<tenant>/adapters/<name>`, timed), then its first request.

   The `loads` column counts the adapter loads seen during the measured requests: 0 for
   `loaded`, one per repeat for `evicted` and `upload`, else the case did not measure
   what it says (for `evicted`: `--max-loaded` is below the server's cap).

Every adapter is a real PEFT adapter for the default model (`tests/adapter_factory.py`),
written to a temporary directory and named `bench-<run tag>-<i>` (the tag is random per
run). Their seeds are drawn from `--seed` and the run tag: deleting an adapter does not
unload it from the engine, so an adapter with the same bytes (digest) as one a previous
run left loaded would skip its load. All are uploaded before measuring (untimed, except
the fresh ones of the upload case), and every adapter the run created is deleted at the
end, even after an error or Ctrl-C.

Against `make serve` (the dev tenants file has the default keys); `--max-loaded` must be
the server's `LORAGATE_MAX_LOADED_ADAPTERS`:

    LORAGATE_MAX_LOADED_ADAPTERS=4 make serve     # in one shell
    .venv/bin/python loadtests/bench_adapters.py --max-loaded 4

The machines are shared and noisy: absolute numbers mean little; only ratios measured
within one run (to `base`, or between the cold-path cases) are meaningful.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

HERE = Path(__file__).resolve().parent
# bench_streaming is a script beside this one; tests.adapter_factory lives under the repo root.
for _path in (HERE, HERE.parent):
    if str(_path) not in sys.path:
        sys.path.append(str(_path))

import bench_streaming as bench  # noqa: E402

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
MIX_ADAPTERS = 8
ZIPF_S = 1.1
COLD_MAX_TOKENS = 8
COLD_PROMPTS = 32
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METRIC = re.compile(
    r'^loragate_adapter_(loads|unloads)_total\{result="ok"\}\s+(\S+)$', re.MULTILINE
)
# Not a terminal (a log, a pipe): wide enough that the tables keep whole numbers and headers.
PIPE_WIDTH = 160
progress = Console(stderr=True, width=None if sys.stderr.isatty() else PIPE_WIDTH)


@dataclass(frozen=True)
class Options:
    url: str
    metrics_url: str
    api_key: str
    admin_key: str
    tenant: str
    model: str
    concurrency: int
    requests: int
    max_tokens: int
    prompt_tokens: int
    warmup: int
    max_loaded: int
    repeats: int
    seed: int


@dataclass(frozen=True)
class LoadCounts:
    """The gateway's successful adapter loads and unloads so far."""

    loads: int = 0
    unloads: int = 0

    def __sub__(self, other: LoadCounts) -> LoadCounts:
        return LoadCounts(self.loads - other.loads, self.unloads - other.unloads)


@dataclass(frozen=True)
class Scenario:
    name: str
    models: list[str]
    weights: list[float] | None = None

    def draw(self, count: int, rng: random.Random) -> list[str]:
        if len(self.models) == 1:
            return self.models * count
        return rng.choices(self.models, weights=self.weights, k=count)


@dataclass(frozen=True)
class ScenarioResult:
    scenario: str
    stats: bench.LevelResult
    loads: int
    unloads: int
    ttft_p50_ratio: float | None = None
    throughput_ratio: float | None = None


@dataclass(frozen=True)
class ColdSample:
    ttft_ms: float | None
    loads: int
    upload_ms: float | None = None
    total_ms: float | None = None
    error: str | None = None


@dataclass
class ColdCase:
    case: str
    samples: list[ColdSample] = field(default_factory=list)

    def median(self, attribute: str) -> float | None:
        values = [getattr(s, attribute) for s in self.samples]
        present = [v for v in values if v is not None]
        return float(np.median(present)) if present else None

    def summary(self, base_ttft_ms: float | None) -> dict[str, Any]:
        ttft = self.median("ttft_ms")
        return {
            "case": self.case,
            "ok": sum(s.error is None for s in self.samples),
            "repeats": len(self.samples),
            "upload_ms": self.median("upload_ms"),
            "ttft_ms": ttft,
            "total_ms": self.median("total_ms"),
            "loads": sum(s.loads for s in self.samples),
            "ttft_ratio_to_base": bench.ratio(ttft, base_ttft_ms),
            "first_error": next((s.error for s in self.samples if s.error), None),
        }


@dataclass(frozen=True)
class Adapter:
    name: str
    directory: Path
    seed: int

    def files(self) -> dict[str, tuple[str, bytes, str]]:
        return {
            "adapter_config": (
                CONFIG_FILE,
                (self.directory / CONFIG_FILE).read_bytes(),
                "application/json",
            ),
            "adapter_model": (
                WEIGHTS_FILE,
                (self.directory / WEIGHTS_FILE).read_bytes(),
                "application/octet-stream",
            ),
        }


class Prompts:
    """Seeded prompts, each with a tag unique to the run and the request (no shared prefix)."""

    def __init__(self, texts: list[str], tag: str) -> None:
        self._texts = texts
        self._tag = tag
        self._count = 0

    def next(self) -> str:
        text = self._texts[self._count % len(self._texts)]
        self._count += 1
        return bench.tagged([text], f"{self._tag}-{self._count}")[0]


class Gateway:
    """The tenant and admin sides of one gateway, and the adapters this run created on it."""

    def __init__(self, options: Options) -> None:
        self.tenant = options.tenant
        self.client = bench.make_client(
            bench.Target("tenant", options.url, options.api_key), options.concurrency
        )
        self.admin = httpx.AsyncClient(
            base_url=f"{options.url}/admin/v1/tenants/{options.tenant}/adapters/",
            headers={"Authorization": f"Bearer {options.admin_key}"},
            timeout=httpx.Timeout(bench.REQUEST_TIMEOUT_S, connect=bench.CONNECT_TIMEOUT_S),
        )
        self.metrics = httpx.AsyncClient(timeout=bench.CONNECT_TIMEOUT_S)
        self.metrics_url = options.metrics_url
        self.created: list[str] = []

    async def ready(self) -> None:
        response = await self.client.get("/readyz")
        if response.status_code != 200:
            raise RuntimeError(f"gateway not ready: HTTP {response.status_code} {response.text}")

    async def counts(self) -> LoadCounts:
        response = await self.metrics.get(self.metrics_url)
        response.raise_for_status()
        found = {kind: int(float(value)) for kind, value in METRIC.findall(response.text)}
        return LoadCounts(found.get("loads", 0), found.get("unloads", 0))

    async def upload(self, adapter: Adapter, files: dict[str, tuple[str, bytes, str]]) -> None:
        self.created.append(adapter.name)  # before the PUT: an interrupted upload is deleted too
        response = await self.admin.put(adapter.name, files=files)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"upload of {adapter.name}: HTTP {response.status_code}")

    async def first_token(self, model: str, prompt: str) -> bench.RequestResult:
        body = bench.chat_body(model, prompt, COLD_MAX_TOKENS)
        return await bench.one_request(self.client, body)

    async def delete_created(self) -> list[str]:
        """Delete every adapter this run created; the names that could not be deleted."""
        failed = []
        for name in self.created:
            try:
                response = await self.admin.delete(name)
                if response.status_code not in (200, 404):
                    failed.append(f"{name} (HTTP {response.status_code})")
            except httpx.HTTPError as exc:
                failed.append(f"{name} ({type(exc).__name__})")
        return failed

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.admin.aclose()
        await self.metrics.aclose()


# --- adapters ----------------------------------------------------------------------------------


def make_adapters(root: Path, tag: str, seed: int, count: int) -> list[Adapter]:
    """`count` distinct PEFT adapters, seeds drawn from `seed` and the run tag."""
    from tests.adapter_factory import write_peft_adapter  # imports torch: seconds

    seeds = random.Random(f"{seed}-{tag}").sample(range(2**31), count)
    adapters = []
    for i, adapter_seed in enumerate(seeds):
        name = f"bench-{tag}-{i}"
        write_peft_adapter(root / name, seed=adapter_seed)
        adapters.append(Adapter(name, root / name, adapter_seed))
    progress.log(f"made {count} adapters under {root}")
    return adapters


async def upload_all(gateway: Gateway, adapters: list[Adapter]) -> None:
    for adapter in adapters:
        await gateway.upload(adapter, adapter.files())
    progress.log(f"uploaded {len(adapters)} adapters")


# --- 1. mix throughput -------------------------------------------------------------------------


def scenarios(model: str, pool: list[Adapter]) -> list[Scenario]:
    names = [a.name for a in pool[:MIX_ADAPTERS]]
    zipf = [1 / k**ZIPF_S for k in range(1, len(names) + 1)]
    return [
        Scenario("base", [model]),
        Scenario("1-adapter", names[:1]),
        Scenario(f"{len(names)}-uniform", names),
        Scenario(f"{len(names)}-zipf", names, zipf),
    ]


async def run_scenario(
    gateway: Gateway, scenario: Scenario, texts: list[str], options: Options, tag: str
) -> ScenarioResult:
    rng = random.Random(f"{options.seed}-{scenario.name}")
    models = scenario.draw(len(texts), rng)
    prompts = bench.tagged(texts, f"{tag}-{scenario.name}")
    bodies = [
        bench.chat_body(m, p, options.max_tokens) for m, p in zip(models, prompts, strict=True)
    ]
    before = await gateway.counts()
    results, wall_s = await bench.run_batch(gateway.client, bodies, options.concurrency)
    delta = await gateway.counts() - before
    stats = bench.summarize(scenario.name, options.concurrency, results, wall_s)
    progress.log(
        f"{scenario.name}: {stats.ok} ok, {stats.errors} err, {stats.output_tokens} tokens "
        f"in {wall_s:.2f} s, {delta.loads} loads, {delta.unloads} unloads"
    )
    return ScenarioResult(scenario.name, stats, delta.loads, delta.unloads)


def with_ratios(results: list[ScenarioResult]) -> list[ScenarioResult]:
    base = results[0].stats
    return [
        ScenarioResult(
            r.scenario,
            r.stats,
            r.loads,
            r.unloads,
            bench.ratio(r.stats.ttft_p50_ms, base.ttft_p50_ms),
            bench.ratio(r.stats.out_tok_per_s, base.out_tok_per_s),
        )
        for r in results
    ]


async def run_mix(
    gateway: Gateway, pool: list[Adapter], options: Options, tag: str
) -> list[ScenarioResult]:
    texts = bench.make_prompts(
        options.warmup + options.requests, options.prompt_tokens, options.seed
    )
    if options.warmup:
        warmup = bench.tagged(texts[: options.warmup], f"{tag}-warmup")
        bodies = [bench.chat_body(options.model, p, options.max_tokens) for p in warmup]
        await bench.run_batch(gateway.client, bodies, options.concurrency)
    measured = texts[options.warmup :]
    results = [
        await run_scenario(gateway, scenario, measured, options, tag)
        for scenario in scenarios(options.model, pool)
    ]
    return with_ratios(results)


# --- 2. cold path ------------------------------------------------------------------------------


def sample_of(result: bench.RequestResult, loads: int, **times: float | None) -> ColdSample:
    ttft = result.ttft_s * 1000 if result.ok and result.ttft_s is not None else None
    error = result.error or (None if ttft is not None else "no content token")
    return ColdSample(ttft, loads, error=error, **times)


async def measured(gateway: Gateway, model: str, prompts: Prompts) -> ColdSample:
    """One request, with the adapter loads the gateway did meanwhile."""
    before = await gateway.counts()
    result = await gateway.first_token(model, prompts.next())
    delta = await gateway.counts() - before
    return sample_of(result, delta.loads)


async def loaded_sample(gateway: Gateway, name: str, prompts: Prompts) -> ColdSample:
    await gateway.first_token(name, prompts.next())  # loads it, if it was not loaded
    return await measured(gateway, name, prompts)


async def evicted_sample(
    gateway: Gateway, name: str, others: list[str], prompts: Prompts
) -> ColdSample:
    await gateway.first_token(name, prompts.next())
    for other in others:  # more adapters than fit: the LRU one, `name`, is unloaded
        await gateway.first_token(other, prompts.next())
    return await measured(gateway, name, prompts)


async def upload_sample(gateway: Gateway, adapter: Adapter, prompts: Prompts) -> ColdSample:
    files, prompt = adapter.files(), prompts.next()  # read before the clock starts
    before = await gateway.counts()
    start = time.perf_counter()
    try:
        await gateway.upload(adapter, files)
    except (RuntimeError, httpx.HTTPError) as exc:
        return ColdSample(None, 0, error=str(exc))
    upload_s = time.perf_counter() - start
    result = await gateway.first_token(adapter.name, prompt)
    delta = await gateway.counts() - before
    total_ms = (upload_s + result.ttft_s) * 1000 if result.ttft_s is not None else None
    return sample_of(result, delta.loads, upload_ms=upload_s * 1000, total_ms=total_ms)


async def run_cold(
    gateway: Gateway, pool: list[Adapter], fresh: list[Adapter], options: Options, tag: str
) -> list[ColdCase]:
    texts = bench.make_prompts(COLD_PROMPTS, options.prompt_tokens, options.seed + 1)
    prompts = Prompts(texts, f"{tag}-cold")
    names = [a.name for a in pool]
    cases = {
        k: ColdCase(k)
        for k in ("base model", "loaded adapter", "evicted adapter", "upload -> first token")
    }
    for repeat, adapter in enumerate(fresh):
        x = repeat % len(names)
        others = [names[(x + 1 + j) % len(names)] for j in range(options.max_loaded + 1)]
        cases["base model"].samples.append(await measured(gateway, options.model, prompts))
        cases["loaded adapter"].samples.append(await loaded_sample(gateway, names[x], prompts))
        sample = await evicted_sample(gateway, names[x], others, prompts)
        cases["evicted adapter"].samples.append(sample)
        cases["upload -> first token"].samples.append(
            await upload_sample(gateway, adapter, prompts)
        )
        progress.log(f"cold path: repeat {repeat + 1}/{len(fresh)} done")
    return list(cases.values())


# --- the run -----------------------------------------------------------------------------------


async def run(
    options: Options, pool: list[Adapter], fresh: list[Adapter], tag: str
) -> tuple[list[ScenarioResult], list[ColdCase]]:
    gateway = Gateway(options)
    try:
        await gateway.ready()
        await upload_all(gateway, pool)
        mix = await run_mix(gateway, pool, options, tag)
        cold = await run_cold(gateway, pool, fresh, options, tag)
        return mix, cold
    finally:
        failed = await gateway.delete_created()
        deleted = len(gateway.created) - len(failed)
        progress.log(f"deleted {deleted} of the {len(gateway.created)} adapters this run created")
        if failed:
            progress.log(f"[red]could not delete:[/] {', '.join(failed)}")
        await gateway.aclose()


def mix_table(results: list[ScenarioResult], concurrency: int) -> Table:
    table = Table(title=f"Adapter mix, streaming chat completions, concurrency {concurrency}")
    headers = ["scenario", "ok", "err", "TTFT p50 ms", "TTFT p95 ms", "out tok/s"]
    for header in [*headers, "TTFT p50 ratio", "throughput ratio", "loads", "unloads"]:
        table.add_column(header, justify="left" if header == "scenario" else "right")
    for r in results:
        s = r.stats
        table.add_row(
            r.scenario,
            str(s.ok),
            str(s.errors),
            bench.fmt(s.ttft_p50_ms),
            bench.fmt(s.ttft_p95_ms),
            bench.fmt(s.out_tok_per_s),
            bench.fmt(r.ttft_p50_ratio, 3),
            bench.fmt(r.throughput_ratio, 3),
            str(r.loads),
            str(r.unloads),
        )
    return table


def cold_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"Cold path, concurrency 1, max_tokens {COLD_MAX_TOKENS}, medians")
    headers = ["case", "ok", "upload ms", "TTFT ms", "total ms", "loads", "TTFT ratio to base"]
    for header in headers:
        table.add_column(header, justify="left" if header == "case" else "right")
    for row in rows:
        table.add_row(
            row["case"],
            f"{row['ok']}/{row['repeats']}",
            bench.fmt(row["upload_ms"]),
            bench.fmt(row["ttft_ms"]),
            bench.fmt(row["total_ms"]),
            str(row["loads"]),
            bench.fmt(row["ttft_ratio_to_base"], 3),
        )
    return table


def cold_rows(cases: list[ColdCase]) -> list[dict[str, Any]]:
    base = cases[0].median("ttft_ms")
    return [case.summary(base) for case in cases]


def report(
    console: Console, options: Options, mix: list[ScenarioResult], rows: list[dict[str, Any]]
) -> None:
    console.print(mix_table(mix, options.concurrency))
    console.print(cold_table(rows))
    errors = [(r.scenario, r.stats.first_error) for r in mix]
    errors += [(row["case"], row["first_error"]) for row in rows]
    for where, error in errors:
        if error:
            console.print(f"[yellow]{where}: first error:[/] {escape(error)}")
    expected = {"loaded adapter": 0, "evicted adapter": options.repeats}
    expected["upload -> first token"] = options.repeats
    for row in rows:
        if row["case"] in expected and row["loads"] != expected[row["case"]]:
            console.print(
                f"[yellow]{row['case']}: {row['loads']} adapter loads during the measured "
                f"requests, expected {expected[row['case']]}[/] (is --max-loaded the server's "
                "LORAGATE_MAX_LOADED_ADAPTERS? is something else using the gateway?)"
            )


def write_json(
    path: Path,
    header: dict[str, Any],
    mix: list[ScenarioResult],
    cold: list[ColdCase],
    rows: list[dict[str, Any]],
) -> None:
    payload = {
        **header,
        "mix": [asdict(r) for r in mix],
        "cold": rows,
        "cold_samples": {case.case: [asdict(s) for s in case.samples] for case in cold},
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


UrlOpt = Annotated[str, typer.Option(help="The gateway's base URL.")]
MetricsUrlOpt = Annotated[
    str, typer.Option(help="The gateway's metrics listener (LORAGATE_METRICS__HOST / __PORT).")
]
KeyOpt = Annotated[str, typer.Option(help="The tenant's API key.")]
AdminKeyOpt = Annotated[str, typer.Option(help="The operator's (admin) API key.")]
TenantOpt = Annotated[str, typer.Option(help="The tenant that owns --api-key.")]
ModelOpt = Annotated[str, typer.Option(help="The base model's name.")]
ConcurrencyOpt = Annotated[int, typer.Option(min=1, help="Requests in flight (mix).")]
RequestsOpt = Annotated[int, typer.Option(min=1, help="Measured requests per mix scenario.")]
MaxTokensOpt = Annotated[int, typer.Option(min=1, help="max_tokens of each mix request.")]
PromptOpt = Annotated[int, typer.Option(min=1, help="Approximate prompt length in tokens.")]
WarmupOpt = Annotated[int, typer.Option(min=0, help="Unmeasured base requests first.")]
MaxLoadedOpt = Annotated[
    int, typer.Option(min=1, help="The server's LORAGATE_MAX_LOADED_ADAPTERS (must match).")
]
RepeatsOpt = Annotated[int, typer.Option(min=1, help="Repeats of each cold-path case.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of prompts, adapter draws and adapter seeds.")]
JsonOpt = Annotated[Path | None, typer.Option(help="Also write every number to this JSON file.")]


def main(
    url: UrlOpt = "http://127.0.0.1:8000",
    metrics_url: MetricsUrlOpt = "http://127.0.0.1:9464/metrics",
    api_key: KeyOpt = "sk-dev-acme",
    admin_key: AdminKeyOpt = "sk-dev-admin",
    tenant: TenantOpt = "acme",
    model: ModelOpt = DEFAULT_MODEL,
    concurrency: ConcurrencyOpt = 8,
    requests: RequestsOpt = 48,
    max_tokens: MaxTokensOpt = 32,
    prompt_tokens: PromptOpt = 64,
    warmup: WarmupOpt = 2,
    max_loaded: MaxLoadedOpt = 8,
    repeats: RepeatsOpt = 3,
    seed: SeedOpt = 0,
    json_out: JsonOpt = None,
) -> None:
    """Adapter mix throughput and cold-path first-token latency of one loragate gateway."""
    options = Options(
        url.rstrip("/"), metrics_url, api_key, admin_key, tenant, model, concurrency, requests,
        max_tokens, prompt_tokens, warmup, max_loaded, repeats, seed,
    )  # fmt: skip
    tag = secrets.token_hex(3)
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    keys = [bench.Target("tenant", url, api_key), bench.Target("admin", url, admin_key)]
    command = bench.redacted_command(keys)
    timestamp = datetime.now(UTC).isoformat(timespec="seconds")
    console.print(f"[bold]command:[/] {escape(command)}", highlight=False)
    console.print(f"[bold]timestamp:[/] {timestamp}  [bold]run tag:[/] {tag}")
    pool_size = max(MIX_ADAPTERS, max_loaded + 2)  # X and max_loaded + 1 others to evict it
    with tempfile.TemporaryDirectory(prefix="bench-adapters-") as tmp:
        adapters = make_adapters(Path(tmp), tag, seed, pool_size + repeats)
        mix, cold = asyncio.run(run(options, adapters[:pool_size], adapters[pool_size:], tag))
    rows = cold_rows(cold)
    report(console, options, mix, rows)
    if json_out is not None:
        config = {k: v for k, v in asdict(options).items() if k not in ("api_key", "admin_key")}
        header = {"command": command, "timestamp": timestamp, "run_tag": tag, "config": config}
        write_json(json_out, header, mix, cold, rows)
        console.print(f"wrote {json_out}", highlight=False)


if __name__ == "__main__":
    typer.run(main)
