"""Prompts that cannot fit the model's context are refused by the gateway, before the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.api.conftest import MODEL, Gateway
from tests.api.test_errors import assert_envelope
from tests.api.test_openai_routes import chat_body


# Autouse runs first, so the tokenizer is in place before the gateway fixture starts the app.
@pytest.fixture(autouse=True)
def word_tokenizer(tmp_path: Path) -> None:
    # One token per whitespace-separated word: counts in these tests are exact.
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "model").mkdir(exist_ok=True)
    tokenizer.save(str(tmp_path / "model" / "tokenizer.json"))


def test_prompt_plus_max_tokens_over_context_is_400(gateway: Gateway) -> None:
    prompt = " ".join(["w"] * 2000)
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(prompt, max_tokens=100), headers=gateway.headers()
    )
    error = assert_envelope(response, 400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert gateway.engine_calls == 0


def test_prompt_that_fits_is_served(gateway: Gateway) -> None:
    prompt = " ".join(["w"] * 1900)
    response = gateway.client.post(
        "/v1/chat/completions", json=chat_body(prompt, max_tokens=100), headers=gateway.headers()
    )
    assert response.status_code == 200


def test_each_completion_prompt_is_checked(gateway: Gateway) -> None:
    body = {"model": MODEL, "prompt": ["short", " ".join(["w"] * 2040)], "max_tokens": 16}
    response = gateway.client.post("/v1/completions", json=body, headers=gateway.headers())
    assert_envelope(response, 400, "prompt")
