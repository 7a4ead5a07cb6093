"""The refusal corpus against the running server: each bad upload gets a 4xx OpenAI envelope
that names the problem, and leaves nothing in the store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.types import CONFIG_FILE, WEIGHTS_FILE
from tests.adapter_factory import (
    copy_adapter,
    corrupt_header_longer_than_file,
    edit_tensors,
    lora_name,
    read_tensors,
    update_config,
    write_peft_adapter,
    write_pickled_bin,
    zeros,
)
from tests.e2e.conftest import ServeProcess

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(tmp_path_factory.mktemp("good") / "a", seed=7)


def store_files(serve: ServeProcess) -> set[str]:
    store = serve.store_dir
    return {
        str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.name != ".lock"
    } - {"registry/.generation"}


def pickled(d: Path, marker: Path) -> None:
    (d / WEIGHTS_FILE).unlink()
    write_pickled_bin(d / "adapter_model.bin", marker)


def wrong_shape(d: Path) -> None:
    name = lora_name(0, "q_proj", "A")
    edit_tensors(d, {name: zeros((8, 100))})


def no_matching_module(d: Path) -> None:
    tensors = read_tensors(d / WEIGHTS_FILE)
    renamed = {n.replace("self_attn", "cross_attn"): t for n, t in tensors.items()}
    edit_tensors(d, {**{n: None for n in tensors}, **renamed})


def oversized(d: Path) -> None:
    with (d / WEIGHTS_FILE).open("ab") as f:
        f.truncate(300 << 20)  # over the 256 MiB upload limit, sparse on disk


CASES: dict[str, tuple[Callable[[Path], None], int, str | None]] = {
    "header longer than file": (
        lambda d: corrupt_header_longer_than_file(d / WEIGHTS_FILE) and None,
        400,
        "bad_safetensors",
    ),
    "wrong shapes": (wrong_shape, 400, "bad_shape"),
    "rank over the cap": (lambda d: update_config(d, r=64) and None, 400, "rank_over_limit"),
    "names matching no module": (no_matching_module, 400, None),
    "DoRA config, no magnitudes": (
        lambda d: update_config(d, use_dora=True) and None,
        400,
        "incomplete_pair",
    ),
    "missing weights file": (lambda d: (d / WEIGHTS_FILE).unlink(), 400, "missing_file"),
    "missing config file": (lambda d: (d / CONFIG_FILE).unlink(), 400, "missing_file"),
    "oversized weights": (oversized, 413, None),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_adapter_is_refused_and_leaves_nothing(
    vllm_gateway: ServeProcess, good: Path, tmp_path: Path, case: str
) -> None:
    mutate, status, code = CASES[case]
    bad = copy_adapter(good, tmp_path / "bad")
    mutate(bad)
    before = store_files(vllm_gateway)
    response = vllm_gateway.admin_put("acme", "bad-one", bad)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    assert store_files(vllm_gateway) == before


def test_pickled_weights_are_refused_and_never_unpickled(
    vllm_gateway: ServeProcess, good: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "UNPICKLED"
    bad = copy_adapter(good, tmp_path / "bad")
    pickled(bad, marker)
    before = store_files(vllm_gateway)
    response = vllm_gateway.admin_put("acme", "bad-one", bad)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "pickle_refused"
    assert not marker.exists()
    assert store_files(vllm_gateway) == before


@pytest.mark.parametrize(
    "name", ["../escape", "..", "%2e%2e", "a/b", "UPPER", "a" * 64, "semi;colon", "-lead", "%00"]
)
def test_odd_adapter_names_are_refused(vllm_gateway: ServeProcess, good: Path, name: str) -> None:
    before = store_files(vllm_gateway)
    response = vllm_gateway.admin_put("acme", name, good)
    assert 400 <= response.status_code < 500
    assert store_files(vllm_gateway) == before
    assert not any(".." in p or "escape" in p for p in store_files(vllm_gateway))


def test_store_dir_exists(vllm_gateway: ServeProcess) -> None:
    assert vllm_gateway.store_dir.is_dir() and os.access(vllm_gateway.store_dir, os.R_OK)
