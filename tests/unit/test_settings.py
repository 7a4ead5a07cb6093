from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engines.process import vllm_argv
from server.settings import Settings


def test_env_overrides_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAGATE_ENGINE__MAX_LORA_RANK", "32")
    monkeypatch.setenv("LORAGATE_PORT", "9001")
    settings = Settings()
    assert settings.engine.max_lora_rank == 32 and settings.port == 9001


def test_model_path_defaults_under_the_cache_dir(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path)
    assert settings.model_path == tmp_path / "models" / "SmolLM2-135M-Instruct"


def test_max_tokens_must_fit_the_context() -> None:
    with pytest.raises(ValidationError, match="max_model_len"):
        Settings(model={"max_model_len": 512}, limits={"max_tokens": 1024})


def test_default_max_tokens_within_max() -> None:
    with pytest.raises(ValidationError, match="default_max_tokens"):
        Settings(limits={"max_tokens": 100, "default_max_tokens": 200})


def test_unknown_setting_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        Settings(enigne={"url": "http://x"})  # type: ignore[call-arg]


def test_vllm_argv_enables_lora_on_loopback(tmp_path: Path) -> None:
    argv = vllm_argv(Settings(cache_dir=tmp_path), 8123)
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "8123"
    assert "--enable-lora" in argv
    assert argv[argv.index("--max-lora-rank") + 1] == "16"
