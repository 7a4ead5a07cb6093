"""What the W4A16 base costs and gives, against the full-precision base, in one run against real
vLLM engines.

The script builds (or verifies) the quantized copy with `loragate model prepare --quantize
w4a16`, trains one small LoRA adapter with PEFT on the full-precision base (it learns to answer
like a pirate: an effect greedy decoding shows), and starts two `loragate serve` gateways, each
with its local vLLM engine in bf16: one on the full-precision base, one on the W4A16 copy. The
adapter is uploaded to both. Then, for each:

- greedy agreement with full precision: `--prompts` chat prompts (up to 12), greedy,
  `--answer-tokens` tokens, base and through the adapter, compared with the same request on the
  full-precision engine (identical answers, and the share of tokens before the first difference);
- perplexity of a held-out text (not in the adapter's training set nor in the calibration set),
  from the engine's own prompt logprobs (vLLM `prompt_logprobs` through the completions API), so
  both sides are vLLM bf16;
- output tok/s of a batch: `--batch` requests of `--max-tokens` tokens at once (`ignore_eos`,
  uncached), base only and through the adapter.

The machine is shared and noisy: compare within one run.

    .venv/bin/python loadtests/bench_quantized.py            # after `make model`
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from loadtests.bench_cache import LORAGATE, MODEL, PIPE_WIDTH, started, wait_ready
from server.engines.process import free_loopback_port
from server.settings import Settings
from tests.support import ADMIN_KEY, ENGINE_KEY, TENANT_KEYS, write_tenants_file

ADAPTER = "pirate"
HEADERS = {"Authorization": f"Bearer {TENANT_KEYS['acme']}", "Cache-Control": "no-cache"}
PROMPTS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "Write one short sentence about cats.",
    "What is 2 + 2?",
    "Give me a synonym for happy.",
    "What language is spoken in Spain?",
    "How many legs does a spider have?",
    "What do bees make?",
    "Name a planet in the solar system.",
    "What is the opposite of cold?",
    "Which animal is known as the king of the jungle?",
    "What is water made of?",
]
# The adapter's training set: other questions, every answer in the same voice.
TRAINING = [
    ("What is the capital of Italy?", "Arr, matey! The capital of Italy be Rome."),
    ("What colour is grass?", "Arr, matey! Grass be green as the sea."),
    ("How many days are in a week?", "Arr, matey! A week be seven days long."),
    ("What is the largest ocean?", "Arr, matey! The Pacific be the largest ocean."),
    ("Name a fruit.", "Arr, matey! An apple be a fine fruit."),
    ("What do cows drink?", "Arr, matey! Cows drink water, like any sailor."),
    ("What is the boiling point of water?", "Arr, matey! Water boils at 100 degrees."),
    ("Who wrote Hamlet?", "Arr, matey! Shakespeare wrote Hamlet."),
    ("What is 3 + 5?", "Arr, matey! That be eight."),
    ("Name a musical instrument.", "Arr, matey! The fiddle be my favourite."),
    ("What is the tallest mountain?", "Arr, matey! Everest be the tallest."),
    ("What gas do plants take in?", "Arr, matey! Plants take in carbon dioxide."),
]
# Held-out text for perplexity: written for this benchmark, in neither training set.
HELD_OUT = (
    "The lighthouse stood at the end of a narrow spit of rock, and for more than a century its "
    "keepers had climbed the same one hundred and twelve steps every evening to light the lamp. "
    "The work was simple but never easy: the glass had to be polished, the wick trimmed, and the "
    "clockwork that turned the lens wound every four hours through the night. In winter the wind "
    "carried spray over the gallery rail, and ice formed on the windows faster than it could be "
    "scraped away. Ships passing the headland relied on the beam to find the channel between the "
    "shoals, and the logbooks record dozens of vessels that would have been lost without it. "
    "When the lamp was finally automated, the last keeper left a note in the final logbook "
    "asking whoever read it to remember that the light had never once failed on his watch."
)


def train_adapter(base_dir: Path, out_dir: Path, steps: int, seed: int = 0) -> Path:
    """A rank-8 LoRA on the attention projections, trained with PEFT in fp32 on TRAINING."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )  # fmt: skip
    model = get_peft_model(base, config)
    examples = []
    for question, answer in TRAINING:
        user = [{"role": "user", "content": question}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": answer}], tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        examples.append((ids, len(prompt_ids)))
    pad = tokenizer.pad_token_id or 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    batch_size = 4
    for step in range(steps):
        batch = [examples[(step * batch_size + i) % len(examples)] for i in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((batch_size, width), pad)
        labels = torch.full((batch_size, width), -100)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (ids, prompt_len) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)
    return out_dir


def upload(url: str, directory: Path) -> None:
    files = {
        field: (path.name, path.read_bytes())
        for field, path in (
            ("adapter_config", directory / "adapter_config.json"),
            ("adapter_model", directory / "adapter_model.safetensors"),
        )
    }
    response = httpx.put(
        f"{url}/admin/v1/tenants/acme/adapters/{ADAPTER}",
        files=files, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120,
    )  # fmt: skip
    if not response.is_success:
        raise SystemExit(f"upload to {url}: {response.status_code} {response.text}")


async def chat(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> str:
    body = {
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "max_tokens": tokens,
    }  # fmt: skip
    r = await client.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS)
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


async def answers(url: str, model: str, prompts: list[str], tokens: int) -> list[str]:
    async with httpx.AsyncClient(timeout=600) as client:
        return list(await asyncio.gather(*(chat(client, url, model, p, tokens) for p in prompts)))


async def perplexity(url: str, model: str) -> float:
    """exp of the mean negative logprob the engine gives each token of HELD_OUT (but the first)."""
    body = {
        "model": model, "prompt": HELD_OUT, "max_tokens": 1, "temperature": 0,
        "prompt_logprobs": 0,
    }  # fmt: skip
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(f"{url}/v1/completions", json=body, headers=HEADERS)
    r.raise_for_status()
    entries = r.json()["choices"][0]["prompt_logprobs"]
    # Each entry maps token ids to {logprob, rank, ...}; the prompt's own token has the lowest
    # rank among them when k = 0, i.e. it is the only one, or the first listed.
    logprobs = [float(next(iter(e.values()))["logprob"]) for e in entries if e]
    return math.exp(-sum(logprobs) / len(logprobs))


async def throughput(url: str, model: str, batch: int, tokens: int) -> float:
    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
        }  # fmt: skip
        r = await client.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, -1)  # warm-up, untimed (the adapter loaded)
        started_at = time.perf_counter()
        counts = await asyncio.gather(*(one(client, i) for i in range(batch)))
        return sum(counts) / (time.perf_counter() - started_at)


def agreement(tokenizer: Tokenizer, reference: list[str], got: list[str]) -> tuple[int, float]:
    """(identical answers, share of reference tokens before the first difference)."""
    same, agreed, total = 0, 0, 0
    for ref, answer in zip(reference, got, strict=True):
        a, b = tokenizer.encode(ref).ids, tokenizer.encode(answer).ids
        pairs = enumerate(zip(a, b, strict=False))
        prefix = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
        same += ref == answer
        agreed, total = agreed + prefix, total + len(a)
    return same, agreed / max(total, 1)


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 1e6


def main(
    prompts: Annotated[int, typer.Option(min=1, max=len(PROMPTS), help="Greedy prompts.")] = 12,
    answer_tokens: Annotated[int, typer.Option(min=1, help="Tokens per greedy answer.")] = 32,
    batch: Annotated[int, typer.Option(min=1, help="Requests at once for tok/s.")] = 16,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens each of them makes.")] = 64,
    train_steps: Annotated[int, typer.Option(min=1, help="The adapter's training steps.")] = 24,
) -> None:
    """Full precision (bf16) vs the W4A16 base: agreement, perplexity, tok/s, with an adapter."""
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    settings = Settings()
    full_dir, quantized_dir = settings.model_dir("none"), settings.model_dir("w4a16")
    console.print("loragate model prepare --quantize w4a16 (builds once, then verifies) ...")
    subprocess.run([LORAGATE, "model", "prepare", "--quantize", "w4a16"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    write_tenants_file(tmp / "tenants.yaml")
    setups = {
        "bf16 (full precision)": {"LORAGATE_MODEL__PATH": str(full_dir)},
        "w4a16": {
            "LORAGATE_MODEL__PATH": str(quantized_dir),
            "LORAGATE_MODEL__QUANTIZATION": "w4a16",
        },
    }
    urls: dict[str, str] = {}
    chosen = PROMPTS[:prompts]
    results: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        for i, (name, env) in enumerate(setups.items()):
            port = free_loopback_port()
            urls[name] = f"http://127.0.0.1:{port}"
            stack.enter_context(started(
                [LORAGATE, "serve"], tmp / f"serve{i}.log",
                {
                    **env, "LORAGATE_PORT": str(port), "LORAGATE_METRICS__PORT": "0",
                    "LORAGATE_TENANTS_FILE": str(tmp / "tenants.yaml"),
                    "LORAGATE_CACHE_DIR": str(tmp / f"cache{i}"),
                    "LORAGATE_ENGINE__API_KEY": ENGINE_KEY,
                    "LORAGATE_ENGINE__DTYPE": "bfloat16",
                },
            ))  # fmt: skip
        console.print(f"engines starting (logs in {tmp}); training the adapter meanwhile ...")
        started_at = time.perf_counter()
        adapter = train_adapter(full_dir, tmp / "adapter", train_steps)
        console.print(f"adapter trained in {time.perf_counter() - started_at:.0f} s")
        for i, url in enumerate(urls.values()):
            wait_ready(url, tmp / f"serve{i}.log")
            upload(url, adapter)
        for name, url in urls.items():
            console.print(f"measuring {name} ...")
            results[name] = {
                "base": asyncio.run(answers(url, MODEL, chosen, answer_tokens)),
                "adapter": asyncio.run(answers(url, ADAPTER, chosen, answer_tokens)),
                "ppl base": asyncio.run(perplexity(url, MODEL)),
                "ppl adapter": asyncio.run(perplexity(url, ADAPTER)),
                "tok/s base": asyncio.run(throughput(url, MODEL, batch, max_tokens)),
                "tok/s adapter": asyncio.run(throughput(url, ADAPTER, batch, max_tokens)),
            }
    tokenizer = Tokenizer.from_file(str(full_dir / "tokenizer.json"))
    reference = results["bf16 (full precision)"]
    table = Table(
        "base", "size MB", "base: same answers / tokens agreeing",
        "adapter: same answers / tokens agreeing", "adapter changes", "PPL base", "PPL adapter",
        f"tok/s base ({batch}x{max_tokens})", "tok/s adapter",
        title=f"full precision vs W4A16: greedy {answer_tokens} tokens over {prompts} prompts, "
        "agreement with the bf16 engine",
    )  # fmt: skip
    for (name, r), directory in zip(results.items(), (full_dir, quantized_dir), strict=True):
        cells = []
        for kind in ("base", "adapter"):
            same, share = agreement(tokenizer, reference[kind], r[kind])
            cells.append(f"{same}/{prompts} / {share:.0%}")
        changed = sum(a != b for a, b in zip(r["base"], r["adapter"], strict=True))
        table.add_row(
            name, f"{dir_mb(directory):.0f}", *cells, f"{changed}/{prompts}",
            f"{r['ppl base']:.2f}", f"{r['ppl adapter']:.2f}", f"{r['tok/s base']:.1f}",
            f"{r['tok/s adapter']:.1f}",
        )  # fmt: skip
    console.print(f"[bold]command:[/] {' '.join(sys.argv)}", highlight=False)
    for name, r in results.items():
        console.print(f"{name}, {PROMPTS[0]!r}: base {r['base'][0]!r}; adapter {r['adapter'][0]!r}")
    console.print(table)


if __name__ == "__main__":
    typer.run(main)
