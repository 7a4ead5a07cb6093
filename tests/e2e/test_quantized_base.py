"""The W4A16 base end to end: built by `loragate model prepare --quantize w4a16` (in the normal
models dir, so a later run only verifies it; the first one also creates the quantize venv, about
5 minutes in all on 2 cores), served by `loragate serve` with a real vLLM, with a PEFT adapter
uploaded and hot-swapped onto it.

Quality is printed, not asserted: the greedy agreement of the quantized base with the
full-precision one (transformers, fp32) over a few prompts. 4-bit weights change most answers
of this small model; docs/quantization.md has the measured figures.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.model_prepare import verify_model_dir
from server.quantization.build import verify_quantized_dir
from server.settings import Settings
from tests.adapter_factory import write_peft_adapter
from tests.e2e.conftest import (
    BASE_MODEL,
    LORAGATE,
    VLLM_START_TIMEOUT_S,
    ServeProcess,
    default_model_path,
    start_serve,
)
from tests.e2e.reference import greedy_references

pytestmark = pytest.mark.e2e

PREPARE_TIMEOUT_S = 3600  # the venv (~1.5 min) and the quantizer (~4–5 min), with room
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    QUESTION,
    [{"role": "user", "content": "Name a colour of the sky."}],
    [{"role": "user", "content": "Write one short sentence about cats."}],
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Give me a synonym for happy."}],
    [{"role": "user", "content": "What language is spoken in Spain?"}],
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def quantized_model() -> Path:
    """The W4A16 copy of the default model, made (or verified) by the command users run."""
    done = subprocess.run(
        [LORAGATE, "model", "prepare", "--quantize", "w4a16"],
        capture_output=True, text=True, timeout=PREPARE_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    settings = Settings()
    path = settings.model_dir("w4a16")
    assert f"{path.name}: " in done.stderr, done.stderr
    verify_quantized_dir(path, "w4a16", verify_model_dir(settings.model_dir("none")))
    return path


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, quantized_model: Path
) -> Iterator[ServeProcess]:
    env = {
        "LORAGATE_MODEL__PATH": str(quantized_model),
        "LORAGATE_MODEL__QUANTIZATION": "w4a16",
        # auto: it must pick bfloat16 for 4-bit weights (the CPU kernels take nothing else).
        "LORAGATE_ENGINE__DTYPE": "auto",
    }
    serve = start_serve(tmp_path_factory.mktemp("quantized"), env=env)
    try:
        serve.wait_ready(VLLM_START_TIMEOUT_S)
        yield serve
    finally:
        serve.stop()


def ask(gateway: ServeProcess, messages: list[dict[str, str]], model: str = BASE_MODEL) -> str:
    answer = gateway.client(cached=False).chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )  # fmt: skip
    return answer.choices[0].message.content or ""


def test_the_engine_runs_the_quantized_dir_in_bfloat16(
    gateway: ServeProcess, quantized_model: Path
) -> None:
    argv = gateway.engine().cmdline()
    assert argv[argv.index("--model") + 1] == str(quantized_model)
    assert argv[argv.index("--dtype") + 1] == "bfloat16"


def test_the_quantized_base_knows_the_capital_of_france(gateway: ServeProcess) -> None:
    assert "Paris" in ask(gateway, QUESTION)


def test_an_adapter_uploaded_against_the_quantized_base_answers(
    gateway: ServeProcess, tmp_path: Path
) -> None:
    # Validated against the shapes of the quantized dir's config: the full-precision ones.
    directory = write_peft_adapter(tmp_path / "adapter", seed=7, scale=3.0)
    put = gateway.admin_put("acme", "quantized-lora", directory)
    assert put.status_code == 201, put.text
    response = gateway.client(cached=False).with_raw_response.chat.completions.create(
        model="quantized-lora", messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )  # fmt: skip
    assert response.http_response.status_code == 200
    assert response.parse().choices[0].message.content


def test_print_greedy_agreement_with_the_full_precision_base(
    gateway: ServeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    rows, same, agreed, total = [], 0, 0, 0
    for prompt in PROMPTS:
        [reference] = greedy_references(default_model_path(), [None], prompt, MAX_TOKENS)
        served = ask(gateway, prompt)
        ref_ids = tokenizer(reference.text, add_special_tokens=False)["input_ids"]
        got_ids = tokenizer(served, add_special_tokens=False)["input_ids"]
        prefix = next(
            (i for i, (a, b) in enumerate(zip(ref_ids, got_ids, strict=False)) if a != b),
            min(len(ref_ids), len(got_ids)),
        )
        same += served == reference.text
        agreed, total = agreed + prefix, total + len(ref_ids)
        rows.append(
            f"  {prompt[0]['content']!r}\n    fp32: {reference.text!r}\n    w4a16: {served!r}"
        )
    with capsys.disabled():
        print(  # noqa: T201 (the figures are this test's output)
            f"\nW4A16 vs full precision (transformers fp32), greedy, {MAX_TOKENS} tokens:\n"
            + "\n".join(rows)
            + f"\n  identical answers: {same}/{len(PROMPTS)}; tokens before the first "
            f"difference: {agreed}/{total} ({agreed / total:.0%})"
        )
