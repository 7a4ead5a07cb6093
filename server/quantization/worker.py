"""The quantizer itself, run by path with the quantize venv's Python (`server.quantization.build`
starts it): llmcompressor's one-shot GPTQ over the full-precision model, saved compressed.

It imports only the standard library and what the quantize venv holds (torch, transformers,
datasets, llmcompressor), never loragate: loragate's own venv cannot hold llmcompressor's pins,
and the quantize venv does not hold loragate. Calibration text is generated here from fixed word
lists, seeded: no dataset hub is needed, and the same source gives the same calibration set.

It writes the model into --out and a JSON report (the recipe, the versions, the time) into
--result; on failure, one line `quantize failed: <reason>` on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

# The recipes, as plain data: the manifest records them as they were applied.
RECIPES: dict[str, dict[str, Any]] = {
    "w4a16": {
        "modifier": "GPTQModifier",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                # int4 weights, symmetric, one scale per 64 inputs; the preset W4A16's group of
                # 128 does not divide SmolLM2's hidden size (576). Activations stay bf16.
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 64,
                },
            }
        },
    },
}
# Copied beside the weights when the source has them: vLLM reads the chat template and the
# generation defaults from the model dir.
COPIED_FILES = ("generation_config.json", "chat_template.jinja")
VERSIONS_OF = ("llmcompressor", "compressed-tensors", "transformers", "torch")

TOPICS = [
    "the history of Rome", "photosynthesis", "how a CPU cache works", "the French Revolution",
    "baking sourdough bread", "the water cycle", "Python list comprehensions", "black holes",
    "the stock market", "vaccines", "climate change", "the rules of chess", "jazz music",
    "machine learning", "the human heart", "volcanoes", "the Roman alphabet", "electric cars",
    "the Great Wall of China", "prime numbers", "the Moon landing", "coffee", "honeybees",
    "the Internet", "Shakespeare", "gravity", "the Amazon rainforest", "SQL joins",
]  # fmt: skip
ASKS = [
    "Explain {t} in simple terms.", "Write a short paragraph about {t}.",
    "What are three interesting facts about {t}?", "Summarize {t} for a ten-year-old.",
    "Give me a step-by-step overview of {t}.", "Why is {t} important?",
]  # fmt: skip
FACTS = [
    "Paris is the capital of France.", "Water boils at 100 degrees Celsius at sea level.",
    "The Earth orbits the Sun once every 365 days.", "Berlin is the capital of Germany.",
    "Light travels at about 300,000 kilometers per second.", "Tokyo is the capital of Japan.",
    "A triangle has three sides.", "def add(a, b):\n    return a + b",
    "SELECT name FROM users WHERE age > 30;", "The mitochondria produce energy in cells.",
]  # fmt: skip
FAILED = "quantize failed:"


def stage(message: str) -> None:
    """One line for the status display of `loragate model prepare`."""
    sys.stdout.write(f"stage: {message}\n")
    sys.stdout.flush()


def calibration_texts(tokenizer: Any, count: int, seed: int) -> list[str]:
    """`count` chat-templated question/answer pairs, the same ones for the same seed."""
    rnd = random.Random(seed)
    texts = []
    for _ in range(count):
        topic = rnd.choice(TOPICS)
        answer = " ".join(rnd.sample(FACTS, 4)) + f" In short, {topic} is worth studying."
        messages = [
            {"role": "user", "content": rnd.choice(ASKS).format(t=topic)},
            {"role": "assistant", "content": answer},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return texts


def quantize(args: argparse.Namespace) -> dict[str, Any]:
    # Imported by name: these exist only in the quantize venv, and loragate's own checks (its
    # type checker, its test that the gateway imports only declared packages) read this file.
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    datasets = importlib.import_module("datasets")
    llmcompressor = importlib.import_module("llmcompressor")
    modifiers = importlib.import_module("llmcompressor.modifiers.quantization")

    started = time.monotonic()
    recipe = RECIPES[args.scheme]
    torch.manual_seed(args.seed)
    stage(f"loading {args.source.name}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.source)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.source, dtype=torch.bfloat16, use_safetensors=True
    )
    texts = calibration_texts(tokenizer, args.samples, args.seed)
    encoded = tokenizer(texts, truncation=True, max_length=args.seqlen, padding=False)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    )
    stage(f"GPTQ {args.scheme}, {args.samples} calibration samples (minutes)")
    modifier = getattr(modifiers, recipe["modifier"])(
        ignore=recipe["ignore"], config_groups=recipe["config_groups"]
    )
    llmcompressor.oneshot(
        model=model, dataset=dataset, recipe=modifier,
        max_seq_length=args.seqlen, num_calibration_samples=args.samples,
    )  # fmt: skip
    stage("saving the compressed weights")
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    for name in COPIED_FILES:
        if (args.source / name).is_file() and not (args.out / name).exists():
            shutil.copyfile(args.source / name, args.out / name)
    return {
        "scheme": args.scheme,
        "recipe": {
            **recipe,
            "calibration": {
                "samples": args.samples, "max_seq_length": args.seqlen, "seed": args.seed,
                "text": "generated chat samples (server/quantization/worker.py)",
            },
        },
        "versions": {name: importlib.metadata.version(name) for name in VERSIONS_OF},
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, required=True, help="the full-precision HF dir")
    parser.add_argument("--out", type=Path, required=True, help="an empty dir for the result")
    parser.add_argument("--result", type=Path, required=True, help="where the JSON report goes")
    parser.add_argument("--scheme", choices=sorted(RECIPES), required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # Nothing is fetched from a hub: a missing file fails the build instead.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[name] = "1"
    try:
        report = quantize(args)
    except Exception as e:
        sys.stderr.write(f"{FAILED} {type(e).__name__}: {str(e)[:600]}\n")
        raise
    args.result.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
