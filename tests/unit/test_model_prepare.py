"""The default model's checks (building it for real is exercised by `make test`'s set-up and the
end-to-end tier, which serves it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.model_prepare import (
    MANIFEST,
    ModelPrepareError,
    file_sha256,
    prepare_default_model,
    verify_model_dir,
)


def fake_model_dir(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (path / "model.safetensors").write_bytes(b"weights")
    files = {n: file_sha256(path / n) for n in ("config.json", "model.safetensors")}
    (path / MANIFEST).write_text(json.dumps({"version": 1, "files": files}))
    return path


def test_verified_folder_is_reused_not_rebuilt(tmp_path: Path) -> None:
    target = fake_model_dir(tmp_path / "m")
    prepared = prepare_default_model(target)
    assert not prepared.built
    assert prepared.weights_sha256 == file_sha256(target / "model.safetensors")


def test_corrupted_weights_fail_verification(tmp_path: Path) -> None:
    target = fake_model_dir(tmp_path / "m")
    (target / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ModelPrepareError, match="checksum"):
        verify_model_dir(target)


def test_folder_without_manifest_is_not_trusted(tmp_path: Path) -> None:
    target = fake_model_dir(tmp_path / "m")
    (target / MANIFEST).unlink()
    with pytest.raises(ModelPrepareError, match="manifest"):
        verify_model_dir(target)
