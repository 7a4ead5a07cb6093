"""The quantized base: where it lives, how it is named in cache keys, which engine dtype can run
it, and how `model prepare --quantize` builds it (with a fake quantizer here: the real one runs
in the e2e tier, tests/e2e/test_quantized_base.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from adapters.types import BaseModelSpec
from server.adapter_setup import load_base_spec
from server.cache.policy import base_revision
from server.cli import app
from server.engines.dtype import QuantizedDtypeError, check_quantized_dtype, resolve_dtype
from server.model_prepare import MANIFEST, file_sha256
from server.quantization import QuantizeError
from server.quantization import build as build_module
from server.quantization import venv as venv_module
from server.quantization.build import (
    prepare_quantized_model,
    verify_quantized_dir,
)
from server.quantization.process import run_bounded
from server.settings import Settings
from tests.adapter_factory import SMOLLM2_CONFIG, base_spec

BF16 = frozenset({"avx512f", "avx512_bf16"})
NO_BF16 = frozenset({"avx512f", "avx2"})
# A small Llama: the fake quantizer writes headers for every projection of it.
SMALL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "vocab_size": 64,
}
# What llmcompressor 0.14 adds to config.json for W4A16 (from a real build of the default model).
W4A16_QUANTIZATION_CONFIG: dict[str, Any] = {
    "config_groups": {
        "group_0": {
            "format": "pack-quantized",
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": "static",
                "block_structure": None,
                "dynamic": False,
                "group_size": 64,
                "num_bits": 4,
                "observer": "memoryless_minmax",
                "observer_kwargs": {},
                "scale_dtype": None,
                "strategy": "group",
                "symmetric": True,
                "type": "int",
                "zp_dtype": None,
            },
        }
    },
    "format": "pack-quantized",
    "global_compression_ratio": None,
    "ignore": ["lm_head"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
    "sparsity_config": {},
    "transform_config": {},
    "version": "0.19.0",
}

FAKE_WORKER = r'''
"""A stand-in for server/quantization/worker.py: FAKE_MODE says how it behaves."""
import argparse, json, os, struct, subprocess, sys, time
from pathlib import Path

p = argparse.ArgumentParser()
for a in ("--source", "--out", "--result", "--scheme"):
    p.add_argument(a, required=True)
args = p.parse_args()
mode = os.environ.get("FAKE_MODE", "ok")
out, source = Path(args.out), Path(args.source)
config = json.loads((source / "config.json").read_text())
(out / "config.json").write_text("{}")  # half a model, before anything can fail
print("stage: loading", flush=True)
if mode == "fail":
    sys.stderr.write("quantize failed: RuntimeError: out of cheese\n")
    sys.exit(3)
if mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(os.environ["FAKE_PIDS"]).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(600)
config["quantization_config"] = json.loads(os.environ["FAKE_QCONFIG"])
(out / "config.json").write_text(json.dumps(config))
hidden, heads = config["hidden_size"], config["num_attention_heads"]
kv, hd, inter = config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]
shapes = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
          "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
          "down_proj": (inter, hidden)}
header = {"__metadata__": {"format": "pt"}}
for layer in range(config["num_hidden_layers"]):
    for proj, (fan_in, fan_out) in shapes.items():
        parent = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
        prefix = f"model.layers.{layer}.{parent}.{proj}"
        if mode == "unquantized":
            header[f"{prefix}.weight"] = {"dtype": "BF16", "shape": [fan_out, fan_in],
                                          "data_offsets": [0, 0]}
            continue
        header[f"{prefix}.weight_packed"] = {"dtype": "I32", "shape": [fan_out, fan_in // 8],
                                             "data_offsets": [0, 0]}
        header[f"{prefix}.weight_scale"] = {"dtype": "BF16", "shape": [fan_out, fan_in // 64],
                                            "data_offsets": [0, 0]}
raw = json.dumps(header).encode()
(out / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
os.chmod(out / "model.safetensors", 0o600)
(out / "tokenizer.json").write_text("{}")
(out / "tokenizer_config.json").write_text("{}")
Path(args.result).write_text(json.dumps({"scheme": args.scheme, "recipe": {"modifier": "fake"},
                                         "versions": {}, "seconds": 0.1}))
print("stage: saved", flush=True)
'''


# --- settings: where each form of the base lives ------------------------------------------------


def settings(tmp_path: Path, **model: Any) -> Settings:
    return Settings(tenants_file=tmp_path / "t.yaml", cache_dir=tmp_path, model=model)


def test_the_quantized_base_lives_beside_the_full_precision_one(tmp_path: Path) -> None:
    models = tmp_path / "models"
    plain = settings(tmp_path)
    assert plain.model.quantization == "none"
    assert plain.model_path == models / "SmolLM2-135M-Instruct"
    assert plain.model_dir("w4a16") == models / "SmolLM2-135M-Instruct-w4a16"
    quantized = settings(tmp_path, quantization="w4a16")
    assert quantized.model_path == models / "SmolLM2-135M-Instruct-w4a16"
    assert quantized.model_dir("none") == models / "SmolLM2-135M-Instruct"


def test_an_explicit_path_names_the_form_the_settings_say_is_served(tmp_path: Path) -> None:
    # Full precision at a path of its own: its quantized copy is built beside it.
    own = settings(tmp_path, path=tmp_path / "mine" / "base")
    assert own.model_path == tmp_path / "mine" / "base"
    assert own.model_dir("w4a16") == tmp_path / "mine" / "base-w4a16"
    # A quantized dir at a path of its own: the full-precision model stays where prepare puts it.
    served = settings(tmp_path, path=tmp_path / "q", quantization="w4a16")
    assert served.model_path == tmp_path / "q"
    assert served.model_dir("none") == tmp_path / "models" / "SmolLM2-135M-Instruct"


def test_the_quantize_settings_have_their_defaults(tmp_path: Path) -> None:
    model = settings(tmp_path).model
    assert model.quantize_python is None
    assert model.quantize_timeout_s == 1800
    with pytest.raises(ValidationError):
        settings(tmp_path, quantization="w8a8")  # measured, not shipped


# --- the engine dtype --------------------------------------------------------------------------


def test_auto_is_bfloat16_for_a_quantized_base_on_a_bf16_cpu() -> None:
    assert resolve_dtype("auto", quantization="w4a16", cpu_build=True, flags=BF16) == "bfloat16"
    assert resolve_dtype("bfloat16", quantization="w4a16", cpu_build=True, flags=BF16) == (
        "bfloat16"
    )


@pytest.mark.parametrize(
    ("dtype", "cpu_build", "flags", "reason"),
    [
        ("float32", True, BF16, "need 16-bit activations"),
        ("float32", False, BF16, "need 16-bit activations"),
        ("float16", True, BF16, "take bfloat16 only"),
        ("auto", True, NO_BF16, "no AVX512-BF16 or AMX"),
        ("bfloat16", True, NO_BF16, "no AVX512-BF16 or AMX"),
    ],
)
def test_a_dtype_or_cpu_that_cannot_run_4_bit_weights_is_refused_naming_the_setting(
    dtype: str, cpu_build: bool, flags: frozenset[str], reason: str
) -> None:
    with pytest.raises(QuantizedDtypeError, match=reason) as caught:
        resolve_dtype(dtype, quantization="w4a16", cpu_build=cpu_build, flags=flags)
    assert f"LORAGATE_ENGINE__DTYPE={dtype}" in str(caught.value)
    assert "LORAGATE_MODEL__QUANTIZATION=w4a16" in str(caught.value)


def test_full_precision_and_gpu_builds_keep_their_choices() -> None:
    for dtype in ("auto", "float32", "bfloat16", "float16"):
        check_quantized_dtype(dtype, "none", cpu_build=True, flags=NO_BF16)
    assert resolve_dtype("auto", quantization="w4a16", cpu_build=False) == "auto"
    assert resolve_dtype("float16", quantization="w4a16", cpu_build=False) == "float16"
    assert resolve_dtype("auto", cpu_build=True, flags=NO_BF16) == "float32"


def test_settings_refuse_float32_for_a_local_quantized_engine_before_anything_starts(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValidationError, match="LORAGATE_ENGINE__DTYPE=float32"):
        Settings(
            tenants_file=tmp_path / "t.yaml", model={"quantization": "w4a16"},
            engine={"dtype": "float32"},
        )  # fmt: skip
    # A gateway in front of engines run elsewhere starts no engine: its dtype is not used.
    Settings(
        tenants_file=tmp_path / "t.yaml", model={"quantization": "w4a16"},
        engine={"dtype": "float32", "urls": ["http://10.0.0.1:8100"]},
    )  # fmt: skip


def test_serve_with_float32_and_w4a16_exits_with_one_message(tmp_path: Path) -> None:
    env = {"LORAGATE_MODEL__QUANTIZATION": "w4a16", "LORAGATE_ENGINE__DTYPE": "float32"}
    result = CliRunner().invoke(app, ["serve"], env=env)
    assert result.exit_code == 2
    assert "LORAGATE_ENGINE__DTYPE=float32" in result.output


# --- cache keys and adapter shapes -------------------------------------------------------------


def write_manifest(directory: Path, files: dict[str, str], **extra: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST).write_text(json.dumps({"version": 1, "files": files, **extra}))


def test_base_revision_names_the_quantization_and_never_equals_full_precision(
    tmp_path: Path,
) -> None:
    plain, quantized = settings(tmp_path), settings(tmp_path, quantization="w4a16")
    write_manifest(plain.model_path, {"model.safetensors": "a" * 64})
    write_manifest(quantized.model_path, {"model.safetensors": "b" * 64}, scheme="w4a16")
    full, four = base_revision(plain), base_revision(quantized)
    assert full.startswith("SmolLM2-135M-Instruct@")
    assert four.startswith("SmolLM2-135M-Instruct-w4a16@")
    assert full.split("@")[1] != four.split("@")[1]
    # An operator's revision names the weights; the quantization still keeps the keys apart.
    assert base_revision(settings(tmp_path, revision="r1")) == "SmolLM2-135M-Instruct@r1"
    assert base_revision(settings(tmp_path, revision="r1", quantization="w4a16")) == (
        "SmolLM2-135M-Instruct-w4a16@r1"
    )


def test_base_revision_warns_when_the_manifest_disagrees_with_the_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    quantized = settings(tmp_path, path=tmp_path / "full", quantization="w4a16")
    write_manifest(tmp_path / "full", {"model.safetensors": "a" * 64})  # no scheme: full
    with caplog.at_level(logging.WARNING, logger="server.cache.policy"):
        assert base_revision(quantized).startswith("SmolLM2-135M-Instruct-w4a16@")
    assert "says the weights are none" in caplog.text


def test_a_quantized_config_gives_the_full_precision_shapes(tmp_path: Path) -> None:
    quantized_config = {
        **SMOLLM2_CONFIG, "quantization_config": W4A16_QUANTIZATION_CONFIG, "dtype": "bfloat16",
    }  # fmt: skip
    assert BaseModelSpec.from_hf_config(quantized_config) == base_spec()
    served = settings(tmp_path, quantization="w4a16")
    served.model_path.mkdir(parents=True)
    (served.model_path / "config.json").write_text(json.dumps(quantized_config))
    assert load_base_spec(served) == base_spec()


# --- building: a fake quantizer ----------------------------------------------------------------


@pytest.fixture
def fake_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    monkeypatch.setattr(build_module, "WORKER", worker)
    monkeypatch.setenv("FAKE_QCONFIG", json.dumps(W4A16_QUANTIZATION_CONFIG))
    monkeypatch.setenv("FAKE_MODE", "ok")
    return worker


def source_model(models: Path) -> Path:
    source = models / "Small"
    source.mkdir(parents=True)
    (source / "config.json").write_text(json.dumps(SMALL_CONFIG))
    (source / "model.safetensors").write_bytes(b"full precision")
    return source


def quantize(tmp_path: Path, source: Path, **kwargs: Any) -> build_module.QuantizedModel:
    args: dict[str, Any] = {
        "cache_dir": tmp_path, "quantize_python": Path(sys.executable), "timeout_s": 60,
        "log_path": tmp_path / "logs" / "quantize.log",
    } | kwargs  # fmt: skip
    return prepare_quantized_model(
        source, "f" * 64, source.with_name("Small-w4a16"), "w4a16", **args
    )


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name not in ("Small", "Small-w4a16"))


def test_a_build_is_verified_renamed_into_place_and_then_reused(
    tmp_path: Path, fake_worker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = source_model(tmp_path / "models")
    seen: list[str] = []
    built = quantize(tmp_path, source, progress=seen.append)
    assert built.built and built.path == source.with_name("Small-w4a16")
    assert any("stage" not in s and "loading" in s for s in seen)  # the worker's own lines
    manifest = verify_quantized_dir(built.path, "w4a16", "f" * 64)
    assert manifest["source"]["weights_sha256"] == "f" * 64
    assert manifest["recipe"] == {"modifier": "fake"}
    assert manifest["weights_sha256"] == file_sha256(built.path / "model.safetensors")
    assert set(manifest["files"]) == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    }  # fmt: skip
    assert (built.path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert leftovers(tmp_path / "models") == []

    monkeypatch.setenv("FAKE_MODE", "fail")  # a second run must not call the quantizer at all
    again = quantize(tmp_path, source)
    assert not again.built and again.weights_sha256 == built.weights_sha256


@pytest.mark.parametrize("mode", ["fail", "unquantized"])
def test_a_failing_or_wrong_quantizer_leaves_nothing_at_the_target(
    tmp_path: Path, fake_worker: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("FAKE_MODE", mode)
    source = source_model(tmp_path / "models")
    expected = "out of cheese" if mode == "fail" else "left unquantized"
    with pytest.raises(QuantizeError, match=expected):
        quantize(tmp_path, source)
    assert not source.with_name("Small-w4a16").exists()
    assert leftovers(tmp_path / "models") == []
    assert "quantize failed" in (tmp_path / "logs" / "quantize.log").read_text() or (
        mode == "unquantized"
    )


def test_a_quantizer_past_its_time_is_killed_with_its_children(
    tmp_path: Path, fake_worker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pids_file = tmp_path / "pids"
    monkeypatch.setenv("FAKE_MODE", "sleep")
    monkeypatch.setenv("FAKE_PIDS", str(pids_file))
    source = source_model(tmp_path / "models")
    with pytest.raises(QuantizeError, match="took longer than 3 s"):
        quantize(tmp_path, source, timeout_s=3)
    assert not source.with_name("Small-w4a16").exists()
    assert leftovers(tmp_path / "models") == []
    for pid in map(int, pids_file.read_text().split()):
        assert not _alive(pid), f"process {pid} of the quantizer survived"


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie is dead too: reaped by its parent (or init) a moment later.
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z":
            return False
        time.sleep(0.1)
    return True


def test_a_stale_target_is_rebuilt_and_a_tampered_one_is_not_trusted(
    tmp_path: Path, fake_worker: Path
) -> None:
    source = source_model(tmp_path / "models")
    built = quantize(tmp_path, source)
    (built.path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(QuantizeError, match="checksum"):
        verify_quantized_dir(built.path, "w4a16")
    with pytest.raises(QuantizeError, match="other weights"):
        verify_quantized_dir(built.path, "w4a16", "0" * 64)
    rebuilt = quantize(tmp_path, source)
    assert rebuilt.built
    verify_quantized_dir(rebuilt.path, "w4a16", "f" * 64)
    assert leftovers(tmp_path / "models") == []


def test_a_dir_without_manifest_or_of_another_scheme_is_not_trusted(tmp_path: Path) -> None:
    directory = tmp_path / "q"
    directory.mkdir()
    with pytest.raises(QuantizeError, match="no readable"):
        verify_quantized_dir(directory, "w4a16")
    write_manifest(directory, {}, scheme="w8a8")
    with pytest.raises(QuantizeError, match="scheme 'w8a8'"):
        verify_quantized_dir(directory, "w4a16")


def test_the_cli_prepares_both_forms_and_says_so(
    tmp_path: Path, fake_worker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A verified full-precision model already there, so `model prepare` reuses it.
    full = tmp_path / "models" / "SmolLM2-135M-Instruct"
    full.mkdir(parents=True)
    (full / "config.json").write_text(json.dumps(SMALL_CONFIG))
    (full / "model.safetensors").write_bytes(b"weights")
    files = {n: file_sha256(full / n) for n in ("config.json", "model.safetensors")}
    (full / MANIFEST).write_text(json.dumps({"version": 1, "files": files}))
    env = {"LORAGATE_CACHE_DIR": str(tmp_path), "LORAGATE_MODEL__QUANTIZE_PYTHON": sys.executable}
    runner = CliRunner()
    first = runner.invoke(app, ["model", "prepare", "--quantize", "w4a16"], env=env)
    assert first.exit_code == 0, first.output
    assert "SmolLM2-135M-Instruct-w4a16: built in" in first.output
    assert "LORAGATE_MODEL__QUANTIZATION=w4a16" in first.output
    second = runner.invoke(app, ["model", "prepare", "--quantize", "w4a16"], env=env)
    assert "SmolLM2-135M-Instruct-w4a16: already there, verified" in second.output

    # The setting alone makes plain `model prepare` build what `serve` would serve.
    env["LORAGATE_MODEL__QUANTIZATION"] = "w4a16"
    monkeypatch.setenv("FAKE_MODE", "fail")
    (full.with_name("SmolLM2-135M-Instruct-w4a16") / "tokenizer.json").write_text("changed")
    failed = runner.invoke(app, ["model", "prepare"], env=env)
    assert failed.exit_code == 1
    assert "model prepare --quantize w4a16 failed" in failed.output
    plain = runner.invoke(app, ["model", "prepare", "--quantize", "none"], env=env)
    assert plain.exit_code == 0 and "w4a16" not in plain.output


# --- the quantize venv and its subprocesses ----------------------------------------------------


def fake_venv_python(venv: Path, exit_code: int) -> Path:
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    script = f"#!/bin/sh\necho \"fake pip: $*\"\necho 'ERROR: no wheels' >&2\nexit {exit_code}\n"
    python.write_text(script)
    python.chmod(0o755)
    return python


def test_a_failing_pip_install_is_a_clear_error_and_leaves_the_venv_unstamped(
    tmp_path: Path,
) -> None:
    fake_venv_python(tmp_path / venv_module.VENV_DIR, 1)
    log = tmp_path / "logs" / "venv.log"
    with pytest.raises(QuantizeError, match="exited with code 1") as caught:
        venv_module.ensure_quantize_python(None, tmp_path, log_path=log, timeout_s=30)
    assert str(log) in str(caught.value) and "ERROR: no wheels" in str(caught.value)
    assert "fake pip: -m pip install" in log.read_text()
    assert not venv_module.venv_is_ready(tmp_path / venv_module.VENV_DIR)


def test_a_venv_is_stamped_once_pip_succeeds_and_then_reused(tmp_path: Path) -> None:
    python = fake_venv_python(tmp_path / venv_module.VENV_DIR, 0)
    log = tmp_path / "venv.log"
    made = venv_module.ensure_quantize_python(None, tmp_path, log_path=log, timeout_s=30)
    assert made == (python, True)
    assert f"-r {venv_module.REQUIREMENTS}" in log.read_text()
    reused = venv_module.ensure_quantize_python(None, tmp_path, log_path=log, timeout_s=30)
    assert reused == (python, False)


def test_a_configured_python_is_used_as_it_is(tmp_path: Path) -> None:
    log = tmp_path / "venv.log"
    assert venv_module.ensure_quantize_python(
        Path(sys.executable), tmp_path, log_path=log, timeout_s=30
    ) == (Path(sys.executable), False)
    with pytest.raises(QuantizeError, match="QUANTIZE_PYTHON"):
        venv_module.ensure_quantize_python(tmp_path / "nope", tmp_path, log_path=log, timeout_s=30)
    assert not (tmp_path / venv_module.VENV_DIR).exists()


def test_the_requirements_pin_the_measured_quantizer() -> None:
    pins = [
        line for line in venv_module.REQUIREMENTS.read_text().splitlines()
        if line and not line.startswith("#")
    ]  # fmt: skip
    assert "torch==2.13.0" in pins and "llmcompressor==0.14.0.1" in pins
    assert all("==" in pin for pin in pins)


def test_run_bounded_logs_everything_and_reports_lines(tmp_path: Path) -> None:
    lines: list[str] = []
    script = "import sys; sys.stdout.write('a\\rb\\n\\x1b[1mc\\x1b[0m\\n'); sys.stdout.flush()"
    run_bounded(
        [sys.executable, "-c", script], log_path=tmp_path / "log", timeout_s=30, what="x",
        on_line=lines.append,
    )  # fmt: skip
    assert lines == ["a", "b", "c"]
    assert b"a\rb" in (tmp_path / "log").read_bytes()


def test_the_worker_needs_nothing_from_loragate() -> None:
    # Run by path in another venv: it may import only the stdlib and the quantize venv's own.
    source = build_module.WORKER.read_text()
    assert "from server" not in source and "import server" not in source
    assert "from adapters" not in source and "import adapters" not in source
