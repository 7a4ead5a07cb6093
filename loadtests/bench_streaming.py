"""Compare streaming chat-completion latency and throughput of OpenAI-style targets.

The same streaming `POST /v1/chat/completions` load is driven against every `--target`
in one run, level by level: for each concurrency level, each target in turn gets
`--warmup` unmeasured requests, then `--requests-per-level` measured ones with exactly
that many in flight. Targets are interleaved per level (level 1: A then B, level 8: A
then B, ...) so that they see similar machine conditions.

Per (target, level) it reports requests ok / failed, p50 and p95 time to first token
(from just before the request is sent to the first chunk with a non-empty
`delta.content`), p50 total latency, and output tokens/s (output tokens of the measured
phase over its wall time; from the final `usage` chunk, else counted content chunks).
A second table compares every other target with the FIRST one: ratios are
`<label>/<first label>`, deltas `<label> - <first label>`.

Typical use: the engine directly first and the gateway second, so that the ratios read
gateway/direct. With `make serve` running (the gateway on 127.0.0.1:8000; the engine on
the private loopback port that `loragate serve` prints in its log, which
`LORAGATE_ENGINE__PORT` can pin):

    .venv/bin/python loadtests/bench_streaming.py \\
        --target direct=http://127.0.0.1:<engine port> \\
        --target gateway=http://127.0.0.1:8000@<dev API key> \\
        --model SmolLM2-135M-Instruct --concurrency 1,8,32

Only standard OpenAI fields are sent (the gateway refuses unknown ones such as vLLM's
`ignore_eos`), so outputs may stop before `--max-tokens`: tokens are counted, not
assumed. Prompts are seeded pseudo-random common words, about `--prompt-tokens` tokens
each, the same list for every target and level. By default each prompt also starts
with a short tag unique to the run, target, level and request, so that the engine's
prefix cache cannot favour whichever target runs second against the same engine
(`--no-cache-bust` sends the bare prompts).

The machine is shared and noisy: absolute numbers mean little; only the ratios between
targets measured within one run are meaningful.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

REQUEST_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 10.0
ERROR_BODY_CHARS = 200
_COMMON_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now "
    "find "
)
WORDS = _COMMON_WORDS.split()


@dataclass(frozen=True)
class Target:
    label: str
    url: str
    api_key: str | None = None


@dataclass(frozen=True)
class RequestResult:
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class LevelResult:
    target: str
    concurrency: int
    ok: int
    errors: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    latency_p50_ms: float | None
    output_tokens: int
    wall_s: float
    out_tok_per_s: float
    first_error: str | None


@dataclass(frozen=True)
class RatioRow:
    concurrency: int
    target: str
    reference: str
    ttft_p50_delta_ms: float | None
    ttft_p50_ratio: float | None
    throughput_ratio: float | None


@dataclass(frozen=True)
class BenchConfig:
    model: str
    levels: list[int]
    requests_per_level: int
    max_tokens: int
    warmup: int


def parse_target(spec: str) -> Target:
    """`label=URL` with an optional `@API_KEY` suffix (the URL must not contain `@`)."""
    label, sep, rest = spec.partition("=")
    if not sep or not label.strip() or not rest:
        raise typer.BadParameter(f"expected label=URL[@API_KEY], got {spec!r}")
    url, at, key = rest.partition("@")
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"target {label!r}: URL must start with http:// or https://")
    if at and not key:
        raise typer.BadParameter(f"target {label!r}: empty API key after '@'")
    return Target(label=label.strip(), url=url.rstrip("/"), api_key=key or None)


def parse_levels(spec: str) -> list[int]:
    try:
        levels = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"--concurrency must be integers like 1,8,32: {exc}") from exc
    if not levels or any(level < 1 for level in levels):
        raise typer.BadParameter("--concurrency needs at least one level, each >= 1")
    return levels


def make_prompts(count: int, prompt_tokens: int, seed: int) -> list[str]:
    """Deterministic prompts of `prompt_tokens` common words (about a token each)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=prompt_tokens)) for _ in range(count)]


def tagged(prompts: list[str], tag: str | None) -> list[str]:
    """Prefix each prompt with a unique tag: no request shares a cached prefix."""
    if tag is None:
        return prompts
    return [f"[{tag}-{i}] {prompt}" for i, prompt in enumerate(prompts)]


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def make_client(target: Target, max_concurrency: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    return httpx.AsyncClient(
        base_url=target.url,
        headers=headers,
        limits=httpx.Limits(
            max_connections=max_concurrency, max_keepalive_connections=max_concurrency
        ),
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
    )


async def read_stream(response: httpx.Response, start: float) -> RequestResult:
    """Consume an SSE chat-completion stream; `start` is when the request was sent."""
    ttft: float | None = None
    content_chunks = 0
    usage_tokens: int | None = None
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :].strip()
        if data == "[DONE]":
            tokens = usage_tokens if usage_tokens is not None else content_chunks
            return RequestResult(True, time.perf_counter() - start, ttft, tokens)
        chunk = json.loads(data)
        if "error" in chunk:
            error = f"stream error: {json.dumps(chunk['error'])[:ERROR_BODY_CHARS]}"
            return RequestResult(False, time.perf_counter() - start, ttft, error=error)
        if chunk.get("usage"):
            usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
        for choice in chunk.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                content_chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    error = "stream ended without data: [DONE]"
    return RequestResult(False, time.perf_counter() - start, ttft, error=error)


async def one_request(client: httpx.AsyncClient, body: dict[str, Any]) -> RequestResult:
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {text[:ERROR_BODY_CHARS]}"
                return RequestResult(False, time.perf_counter() - start, error=error)
            return await read_stream(response, start)
    except Exception as exc:  # counted, never fatal: the run goes on
        error = f"{type(exc).__name__}: {exc}"[:ERROR_BODY_CHARS]
        return RequestResult(False, time.perf_counter() - start, error=error)


async def run_batch(
    client: httpx.AsyncClient, bodies: list[dict[str, Any]], concurrency: int
) -> tuple[list[RequestResult], float]:
    """Send `bodies`, exactly `concurrency` in flight; return results and wall time."""
    pending: Iterator[dict[str, Any]] = iter(bodies)
    results: list[RequestResult] = []

    async def worker() -> None:
        for body in pending:  # shared iterator: each body is taken by one worker
            results.append(await one_request(client, body))

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, len(bodies))):
            group.create_task(worker())
    return results, time.perf_counter() - start


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


def summarize(
    label: str, concurrency: int, results: list[RequestResult], wall_s: float
) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.output_tokens for r in ok)
    return LevelResult(
        target=label,
        concurrency=concurrency,
        ok=len(ok),
        errors=len(results) - len(ok),
        ttft_p50_ms=percentile_ms(ttfts, 50),
        ttft_p95_ms=percentile_ms(ttfts, 95),
        latency_p50_ms=percentile_ms([r.latency_s for r in ok], 50),
        output_tokens=tokens,
        wall_s=wall_s,
        out_tok_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        first_error=next((r.error for r in results if r.error), None),
    )


async def run_level(
    client: httpx.AsyncClient,
    label: str,
    concurrency: int,
    prompts: tuple[list[str], list[str]],
    config: BenchConfig,
) -> LevelResult:
    """Warm up (unmeasured), then run the measured phase for one (target, level)."""
    warmup, measured = (
        [chat_body(config.model, text, config.max_tokens) for text in batch] for batch in prompts
    )
    if warmup:
        await run_batch(client, warmup, concurrency)
    results, wall_s = await run_batch(client, measured, concurrency)
    return summarize(label, concurrency, results, wall_s)


def requests_for(concurrency: int, requests_per_level: int) -> int:
    return requests_per_level or max(8, 4 * concurrency)


async def run_all(
    targets: list[Target],
    config: BenchConfig,
    base_prompts: list[str],
    run_tag: str | None,
) -> list[LevelResult]:
    progress = Console(stderr=True)
    clients = [make_client(t, max(config.levels)) for t in targets]
    results: list[LevelResult] = []
    try:
        for concurrency in config.levels:
            count = requests_for(concurrency, config.requests_per_level)
            pairs = zip(targets, clients, strict=True)
            for index, (target, client) in enumerate(pairs):
                tag = f"{run_tag}-t{index}-c{concurrency}" if run_tag else None
                warmup = tagged(base_prompts[: config.warmup], tag and f"{tag}-w")
                measured = tagged(base_prompts[config.warmup : config.warmup + count], tag)
                level = await run_level(
                    client, target.label, concurrency, (warmup, measured), config
                )
                progress.log(
                    f"c={concurrency} {target.label}: {level.ok} ok, "
                    f"{level.errors} err, {level.output_tokens} tokens "
                    f"in {level.wall_s:.2f} s"
                )
                results.append(level)
    finally:
        for client in clients:
            await client.aclose()
    return results


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def ratio_rows(results: list[LevelResult], first: str) -> list[RatioRow]:
    refs = {r.concurrency: r for r in results if r.target == first}
    rows = []
    for r in results:
        ref = refs.get(r.concurrency)
        if r.target == first or ref is None:
            continue
        delta = None
        if r.ttft_p50_ms is not None and ref.ttft_p50_ms is not None:
            delta = r.ttft_p50_ms - ref.ttft_p50_ms
        rows.append(
            RatioRow(
                concurrency=r.concurrency,
                target=r.target,
                reference=first,
                ttft_p50_delta_ms=delta,
                ttft_p50_ratio=ratio(r.ttft_p50_ms, ref.ttft_p50_ms),
                throughput_ratio=ratio(r.out_tok_per_s, ref.out_tok_per_s),
            )
        )
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(results: list[LevelResult]) -> Table:
    table = Table(title="Streaming chat completions")
    headers = ["concurrency", "target", "ok", "err", "TTFT p50 ms", "TTFT p95 ms"]
    for header in [*headers, "latency p50 ms", "out tok/s"]:
        table.add_column(header, justify="left" if header == "target" else "right")
    for r in results:
        table.add_row(
            str(r.concurrency),
            r.target,
            str(r.ok),
            str(r.errors),
            fmt(r.ttft_p50_ms),
            fmt(r.ttft_p95_ms),
            fmt(r.latency_p50_ms),
            fmt(r.out_tok_per_s),
        )
    return table


def ratios_table(rows: list[RatioRow], first: str) -> Table:
    table = Table(title=f"Compared with the first target ({first})")
    headers = ["concurrency", "target", f"TTFT p50 delta ms (target - {first})"]
    for header in [*headers, "TTFT p50 ratio", f"throughput ratio (target/{first})"]:
        table.add_column(header, justify="left" if header == "target" else "right")
    for row in rows:
        table.add_row(
            str(row.concurrency),
            row.target,
            fmt(row.ttft_p50_delta_ms),
            fmt(row.ttft_p50_ratio, 3),
            fmt(row.throughput_ratio, 3),
        )
    return table


def redacted_command(targets: list[Target]) -> str:
    command = shlex.join(["python", *sys.argv])
    for target in targets:
        if target.api_key:
            command = command.replace(target.api_key, "***")
    return command


def report(console: Console, results: list[LevelResult], rows: list[RatioRow], first: str) -> None:
    console.print(results_table(results))
    if rows:
        console.print(ratios_table(rows, first))
    for r in results:
        if r.first_error:
            where = f"c={r.concurrency} {r.target}"
            console.print(f"[yellow]{where}: first error:[/] {escape(r.first_error)}")


def write_json(
    path: Path,
    header: dict[str, Any],
    config: dict[str, Any],
    targets: list[Target],
    results: list[LevelResult],
    rows: list[RatioRow],
) -> None:
    payload = {
        **header,
        "config": config,
        "targets": [{"label": t.label, "url": t.url} for t in targets],  # keys left out
        "results": [asdict(r) for r in results],
        "ratios": [asdict(row) for row in rows],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")


def main(
    target: Annotated[
        list[str],
        typer.Option(
            help="label=URL, or label=URL@API_KEY; repeat for each target (two or "
            "more). The key is sent as 'Authorization: Bearer'. The FIRST target is "
            "the reference: ratios are <label>/<first label>, deltas <label> - "
            "<first label> (e.g. direct first, then gateway, for gateway/direct).",
        ),
    ],
    model: Annotated[str, typer.Option(help="Model name sent in every request.")] = (
        "SmolLM2-135M-Instruct"
    ),
    concurrency: Annotated[
        str, typer.Option(help="Comma-separated concurrency levels, e.g. 1,8,32.")
    ] = "1,8,32",
    requests_per_level: Annotated[
        int,
        typer.Option(
            min=0,
            help="Measured requests per (target, level); 0 = 4*concurrency, min 8.",
        ),
    ] = 0,
    prompt_tokens: Annotated[
        int, typer.Option(min=1, help="Approximate prompt length in tokens (words).")
    ] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of each request.")] = 32,
    warmup: Annotated[
        int, typer.Option(min=0, help="Unmeasured requests per (target, level) first.")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the prompt generator.")] = 0,
    cache_bust: Annotated[
        bool,
        typer.Option(
            help="Start each prompt with a tag unique to the run, target, level and "
            "request, so that the engine's prefix cache cannot favour a target.",
        ),
    ] = True,
    json_out: Annotated[
        Path | None, typer.Option(help="Also write every number to this JSON file.")
    ] = None,
) -> None:
    """Drive the same streaming chat-completions load at every target; compare."""
    targets = [parse_target(spec) for spec in target]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise typer.BadParameter(f"target labels must be unique: {labels}")
    levels = parse_levels(concurrency)
    config = BenchConfig(model, levels, requests_per_level, max_tokens, warmup)
    most = max(requests_for(level, requests_per_level) for level in levels)
    prompts = make_prompts(warmup + most, prompt_tokens, seed)
    run_tag = secrets.token_hex(3) if cache_bust else None

    console = Console()
    command = redacted_command(targets)
    timestamp = datetime.now(UTC).isoformat(timespec="seconds")
    console.print(f"[bold]command:[/] {escape(command)}", highlight=False)
    console.print(f"[bold]timestamp:[/] {timestamp}  [bold]run tag:[/] {run_tag or '-'}")
    results = asyncio.run(run_all(targets, config, prompts, run_tag))
    rows = ratio_rows(results, targets[0].label)
    report(console, results, rows, targets[0].label)
    if json_out is not None:
        header = {"command": command, "timestamp": timestamp, "run_tag": run_tag}
        extra = {"prompt_tokens": prompt_tokens, "seed": seed}
        config_json = {**asdict(config), **extra}
        write_json(json_out, header, config_json, targets, results, rows)
        console.print(f"wrote {json_out}", highlight=False)


if __name__ == "__main__":
    typer.run(main)
