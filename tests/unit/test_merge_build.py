"""Building a merged model on a tiny Llama: the merge is PEFT's (same logits as the unmerged
adapter), and whatever goes wrong (a broken adapter, a pickle, a timeout) leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapters.types import CONFIG_FILE, WEIGHTS_FILE
from server.merging.build import (
    MERGED_MANIFEST,
    MergeError,
    build_merged,
    merge_key,
    verify_merged_dir,
)

DIGEST = "ab" * 32
REVISION = "tiny-llama@1"
TOKENS = [[1, 7, 42, 99, 200, 255, 3]]


@pytest.fixture(scope="module")
def merged(models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base, adapter = models
    out = tmp_path_factory.mktemp("merged") / "model"
    build_merged(base, adapter, out, adapter_digest=DIGEST, base_revision=REVISION)
    return out


def logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_the_merged_model_computes_what_the_adapter_does(
    models: tuple[Path, Path], merged: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = models
    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    expected_base = logits(plain)
    unmerged = PeftModel.from_pretrained(plain, str(adapter))
    expected = logits(unmerged)
    # The adapter does move the output: equal logits below are the delta, not its absence.
    assert not torch.allclose(expected, expected_base, atol=1e-3)

    model = AutoModelForCausalLM.from_pretrained(str(merged), use_safetensors=True)
    assert model.dtype == torch.float32
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=0)


def test_the_merged_dir_holds_the_model_and_the_base_s_small_files(
    models: tuple[Path, Path], merged: Path
) -> None:
    base, _ = models
    assert leftovers(merged.parent) == ["model"]  # the staging dir was renamed, not copied
    names = leftovers(merged)
    assert "model.safetensors" in names and "config.json" in names
    assert "tokenizer_config.json" in names and "loragate-manifest.json" not in names
    assert (merged / "tokenizer_config.json").read_bytes() == (
        base / "tokenizer_config.json"
    ).read_bytes()
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"

    manifest = verify_merged_dir(merged)
    assert manifest == json.loads((merged / MERGED_MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["scheme"] == "none"
    assert (manifest["adapter_digest"], manifest["base_revision"]) == (DIGEST, REVISION)
    assert sorted(manifest["files"]) == [n for n in names if n != MERGED_MANIFEST]


def test_verify_merged_dir_refuses_a_flipped_byte_or_a_stray_file(
    merged: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(merged, tmp_path / "copy"))
    verify_merged_dir(copy)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(MergeError, match=r"model\.safetensors"):
        verify_merged_dir(copy)

    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    verify_merged_dir(copy)
    (copy / "extra.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(MergeError, match="exactly"):
        verify_merged_dir(copy)
    (copy / "extra.bin").unlink()
    (copy / "config.json").unlink()
    with pytest.raises(MergeError):
        verify_merged_dir(copy)
    (copy / MERGED_MANIFEST).unlink()
    with pytest.raises(MergeError):
        verify_merged_dir(copy)


def test_a_truncated_adapter_fails_and_leaves_nothing(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = models
    broken = Path(shutil.copytree(adapter, tmp_path / "adapter"))
    weights = broken / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "model"
    with pytest.raises(MergeError) as info:
        build_merged(base, broken, out, adapter_digest=DIGEST, base_revision=REVISION)
    message = str(info.value)
    assert message.startswith("merge failed:") and "\n" not in message
    assert str(tmp_path) not in message  # the paths given are named by their role only
    assert leftovers(tmp_path / "out") == []


def test_an_adapter_only_in_pickle_form_is_never_unpickled(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = models
    pickled = tmp_path / "adapter"
    pickled.mkdir()
    shutil.copyfile(adapter / CONFIG_FILE, pickled / CONFIG_FILE)
    canary = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(canary), "w"))

    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match=WEIGHTS_FILE):
        build_merged(
            base, pickled, tmp_path / "out" / "model", adapter_digest=DIGEST,
            base_revision=REVISION,
        )  # fmt: skip
    assert not canary.exists()
    assert leftovers(tmp_path / "out") == []


def test_a_merge_past_its_time_is_killed_and_leaves_nothing(
    models: tuple[Path, Path], tmp_path: Path
) -> None:
    base, adapter = models
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match=r"the merge took longer than 0\.5 s"):
        build_merged(
            base, adapter, tmp_path / "out" / "model", adapter_digest=DIGEST,
            base_revision=REVISION, timeout_s=0.5,
        )  # fmt: skip
    assert leftovers(tmp_path / "out") == []


def test_an_existing_out_dir_is_refused_before_anything_runs(
    models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    base, adapter = models
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine").write_text("kept")

    def no_worker(*args: object, **kwargs: object) -> None:
        raise AssertionError("the worker ran")

    monkeypatch.setattr(subprocess, "Popen", no_worker)
    with pytest.raises(FileExistsError):
        build_merged(base, adapter, out, adapter_digest=DIGEST, base_revision=REVISION)
    assert leftovers(tmp_path) == ["model"] and (out / "mine").read_text() == "kept"


def test_merge_key_labels_and_separates_its_fields() -> None:
    key = merge_key(DIGEST, REVISION, "none")
    assert len(key) == 64 and key == merge_key(DIGEST, REVISION, "none")
    assert key != merge_key(DIGEST, REVISION, "int8")
    assert merge_key("a", "bc", "none") != merge_key("ab", "c", "none")
    assert merge_key(DIGEST, "", "none") != merge_key(DIGEST, "none", "")
    assert os.path.basename(key) == key
