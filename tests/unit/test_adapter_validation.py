"""Adapter validation: what passes, every refusal (type, code and param), upload file names."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from adapters.errors import AdapterRejectedError, AdapterTooLargeError
from adapters.types import CONFIG_FILE, WEIGHTS_FILE, AdapterInfo, adapter_digest
from adapters.validation import ValidationLimits, check_upload_filename, validate_adapter
from tests.adapter_factory import (
    ATTENTION,
    append_trailing_bytes,
    base_spec,
    copy_adapter,
    corrupt_header_longer_than_file,
    edit_tensors,
    leave_gap_before_last_tensor,
    lora_name,
    overlap_two_tensors,
    read_header,
    read_tensors,
    update_config,
    write_peft_adapter,
    write_pickled_bin,
    write_raw,
    write_tensors,
    zeros,
)

LIMITS = ValidationLimits()
CONFIG = "adapter_config"
MODEL = "adapter_model"


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(tmp_path_factory.mktemp("peft"), rank=8, alpha=16, seed=0)


@pytest.fixture
def adapter(peft_adapter: Path, tmp_path: Path) -> Path:
    """A fresh copy of the real PEFT adapter, for a test to edit."""
    return copy_adapter(peft_adapter, tmp_path / "adapter")


def validate(adapter_dir: Path, limits: ValidationLimits = LIMITS) -> AdapterInfo:
    config = (adapter_dir / CONFIG_FILE).read_bytes()
    return validate_adapter(config, adapter_dir / WEIGHTS_FILE, base_spec(), limits)


def refused(
    adapter_dir: Path,
    code: str,
    param: str,
    error: type[AdapterRejectedError] = AdapterRejectedError,
    limits: ValidationLimits = LIMITS,
) -> str:
    with pytest.raises(AdapterRejectedError) as caught:
        validate(adapter_dir, limits)
    assert type(caught.value) is error
    assert (caught.value.code, caught.value.param) == (code, param), caught.value.message
    return caught.value.message


def weights(adapter_dir: Path) -> Path:
    return adapter_dir / WEIGHTS_FILE


# --- what passes ------------------------------------------------------------------------------


def test_peft_adapter_passes_with_its_rank_alpha_targets_and_digest(adapter: Path) -> None:
    info = validate(adapter)
    config_bytes = (adapter / CONFIG_FILE).read_bytes()
    weights_bytes = weights(adapter).read_bytes()
    assert (info.rank, info.alpha) == (8, 16.0)
    assert info.target_modules == tuple(sorted(ATTENTION))
    assert info.size_bytes == len(config_bytes) + len(weights_bytes)
    assert info.digest == adapter_digest(
        hashlib.sha256(config_bytes).hexdigest(), hashlib.sha256(weights_bytes).hexdigest()
    )


def test_same_content_built_again_has_the_same_digest(adapter: Path, tmp_path: Path) -> None:
    again = write_peft_adapter(tmp_path / "again", rank=8, alpha=16, seed=0)
    assert validate(again).digest == validate(adapter).digest


def test_changed_config_or_weights_change_the_digest(adapter: Path, tmp_path: Path) -> None:
    original = validate(adapter).digest
    other_config = copy_adapter(adapter, tmp_path / "config")
    update_config(other_config, lora_alpha=32)
    other_weights = copy_adapter(adapter, tmp_path / "weights")
    raw = bytearray(weights(other_weights).read_bytes())
    raw[-1] ^= 0x01
    weights(other_weights).write_bytes(bytes(raw))
    digests = {original, validate(other_config).digest, validate(other_weights).digest}
    assert len(digests) == 3


def test_rank_equal_to_the_engine_cap_passes(adapter: Path) -> None:
    assert validate(adapter, ValidationLimits(max_rank=8)).rank == 8


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_weights_pass(adapter: Path, dtype: str) -> None:
    tensors = {n: zeros(t.shape, dtype) for n, t in read_tensors(weights(adapter)).items()}
    write_tensors(weights(adapter), tensors)
    assert validate(adapter).rank == 8


def test_mlp_projections_pass_when_targeted(adapter: Path) -> None:
    update_config(adapter, target_modules=[*ATTENTION, "gate_proj", "down_proj"])
    edit_tensors(
        adapter,
        {
            lora_name(0, "gate_proj", "A"): zeros((8, 576)),
            lora_name(0, "gate_proj", "B"): zeros((1536, 8)),
            lora_name(29, "down_proj", "A"): zeros((8, 1536)),
            lora_name(29, "down_proj", "B"): zeros((576, 8)),
        },
    )
    assert validate(adapter).target_modules == tuple(sorted([*ATTENTION, "gate_proj", "down_proj"]))


@pytest.mark.parametrize(
    "changes",
    [
        {"use_rslora": True},
        {"task_type": "CAUSAL_LM"},
        {"init_lora_weights": "gaussian"},
        {"some_future_peft_key": {"x": 1}},
        {"lora_alpha": 8.5},
    ],
)
def test_allowed_config_variations_pass(adapter: Path, changes: dict[str, Any]) -> None:
    update_config(adapter, **changes)
    validate(adapter)


def test_config_target_without_tensors_passes_and_is_not_reported(adapter: Path) -> None:
    # PEFT lists a target even where it found no module; the tensors are the truth.
    update_config(adapter, target_modules=[*ATTENTION, "up_proj"])
    assert validate(adapter).target_modules == tuple(sorted(ATTENTION))


# --- sizes --------------------------------------------------------------------------------------


def test_oversized_config_is_refused(adapter: Path) -> None:
    limits = ValidationLimits(max_config_bytes=100)
    refused(adapter, "config_too_large", CONFIG, AdapterTooLargeError, limits)


def test_oversized_weights_are_refused(adapter: Path) -> None:
    limits = ValidationLimits(max_weights_bytes=weights(adapter).stat().st_size - 1)
    refused(adapter, "weights_too_large", MODEL, AdapterTooLargeError, limits)


def test_weights_shorter_than_a_header_length_are_refused(adapter: Path) -> None:
    weights(adapter).write_bytes(b"\x10\0\0\0\0\0\0")
    refused(adapter, "bad_safetensors", MODEL)


# --- adapter_config.json ------------------------------------------------------------------------


def test_rank_over_cap_is_refused(adapter: Path) -> None:
    update_config(adapter, r=64)
    message = refused(adapter, "rank_over_limit", CONFIG)
    assert message == "rank 64 is over the engine's max LoRA rank 16"


@pytest.mark.parametrize("rank", [0, -8, "8", 8.0, True, None])
def test_rank_that_is_not_a_positive_integer_is_refused(adapter: Path, rank: object) -> None:
    update_config(adapter, r=rank)
    refused(adapter, "bad_rank", CONFIG)


@pytest.mark.parametrize("alpha", [0, -16, "16", True, None, 10**400])
def test_alpha_that_is_not_a_positive_number_is_refused(adapter: Path, alpha: object) -> None:
    update_config(adapter, lora_alpha=alpha)
    refused(adapter, "bad_alpha", CONFIG)


@pytest.mark.parametrize("peft_type", ["LOHA", "lora", None])
def test_non_lora_peft_type_is_refused(adapter: Path, peft_type: str | None) -> None:
    update_config(adapter, peft_type=peft_type)
    refused(adapter, "not_lora", CONFIG)


def test_missing_peft_type_is_refused(adapter: Path) -> None:
    update_config(adapter, remove=["peft_type"])
    refused(adapter, "not_lora", CONFIG)


def test_dora_config_without_magnitude_vectors_is_refused(adapter: Path) -> None:
    update_config(adapter, use_dora=True)
    refused(adapter, "incomplete_pair", MODEL)


@pytest.fixture(scope="module")
def dora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(tmp_path_factory.mktemp("dora"), rank=8, seed=0, dora=True)


def test_a_dora_adapter_is_accepted_as_merge_only(dora_adapter: Path) -> None:
    info = validate(dora_adapter)
    assert info.merge_only and info.rank == 8
    assert set(info.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert not validate(write_peft_adapter(dora_adapter.parent / "plain", seed=0)).merge_only


def test_a_dora_magnitude_vector_of_the_wrong_shape_is_refused(
    dora_adapter: Path, tmp_path: Path
) -> None:
    adapter = copy_adapter(dora_adapter, tmp_path / "a")
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    edit_tensors(adapter, {name: zeros((575,))})
    assert "expected [576]" in refused(adapter, "bad_shape", MODEL)


def test_a_magnitude_vector_without_use_dora_is_refused(dora_adapter: Path, tmp_path: Path) -> None:
    adapter = copy_adapter(dora_adapter, tmp_path / "a")
    update_config(adapter, use_dora=False)
    refused(adapter, "unknown_tensor", MODEL)


def test_use_dora_that_is_not_a_boolean_is_refused(adapter: Path) -> None:
    update_config(adapter, use_dora="yes")
    refused(adapter, "bad_config", CONFIG)


LM_HEAD = "base_model.model.lm_head.weight"
EMBED_TOKENS = "base_model.model.model.embed_tokens.weight"
VOCAB_BY_HIDDEN = (49152, 576)  # SmolLM2's


def with_saved_modules(adapter: Path, tensors: dict[str, tuple[int, ...]], *listed: str) -> Path:
    update_config(adapter, modules_to_save=list(listed))
    edit_tensors(adapter, {name: zeros(shape, "BF16") for name, shape in tensors.items()})
    return adapter


def test_modules_to_save_of_the_lm_head_and_embedding_is_merge_only(adapter: Path) -> None:
    assert not validate(adapter).merge_only
    saved = {LM_HEAD: VOCAB_BY_HIDDEN, EMBED_TOKENS: VOCAB_BY_HIDDEN}
    info = validate(with_saved_modules(adapter, saved, "lm_head", "embed_tokens"))
    assert info.merge_only
    assert info.target_modules == tuple(sorted(ATTENTION))


@pytest.mark.parametrize("module", ["norm", "model.layers.0.mlp", "classifier", "score"])
def test_modules_to_save_of_other_modules_is_refused(adapter: Path, module: str) -> None:
    update_config(adapter, modules_to_save=[module])
    message = refused(adapter, "modules_to_save_unsupported", CONFIG)
    assert "lm_head and embed_tokens" in message


@pytest.mark.parametrize("value", ["lm_head", [1], {"lm_head": 1}])
def test_modules_to_save_that_is_not_a_list_of_names_is_refused(adapter: Path, value: Any) -> None:
    update_config(adapter, modules_to_save=value)
    refused(adapter, "bad_config", CONFIG)


def test_a_saved_module_of_the_wrong_shape_is_refused(adapter: Path) -> None:
    with_saved_modules(adapter, {LM_HEAD: (64, 576)}, "lm_head")
    assert "vocab_size × hidden_size" in refused(adapter, "bad_shape", MODEL)


def test_a_listed_module_without_its_tensor_is_refused(adapter: Path) -> None:
    with_saved_modules(adapter, {LM_HEAD: VOCAB_BY_HIDDEN}, "lm_head", "embed_tokens")
    assert "embed_tokens" in refused(adapter, "incomplete_pair", MODEL)


def test_a_saved_module_tensor_not_listed_in_the_config_is_refused(adapter: Path) -> None:
    with_saved_modules(
        adapter, {LM_HEAD: VOCAB_BY_HIDDEN, EMBED_TOKENS: VOCAB_BY_HIDDEN}, "lm_head"
    )
    assert "does not list it" in refused(adapter, "unknown_tensor", MODEL)


def test_modules_to_save_against_a_base_of_unknown_vocabulary_is_refused(adapter: Path) -> None:
    with_saved_modules(adapter, {LM_HEAD: VOCAB_BY_HIDDEN}, "lm_head")
    config = (adapter / CONFIG_FILE).read_bytes()
    unknown = replace(base_spec(), vocab_size=0)
    with pytest.raises(AdapterRejectedError) as caught:
        validate_adapter(config, adapter / WEIGHTS_FILE, unknown, LIMITS)
    assert caught.value.code == "modules_to_save_unsupported"


def test_bias_is_refused(adapter: Path) -> None:
    update_config(adapter, bias="lora_only")
    refused(adapter, "bias_unsupported", CONFIG)


@pytest.mark.parametrize(
    "targets",
    [
        ["q_proj", "lm_head"],
        ["embed_tokens"],
        ".*(q_proj|v_proj)$",
        "all-linear",
        ["qkv_proj"],
        [],
        [1],
    ],
)
def test_unsupported_target_modules_are_refused(adapter: Path, targets: object) -> None:
    update_config(adapter, target_modules=targets)
    refused(adapter, "unsupported_target", CONFIG)


def test_missing_target_modules_is_refused(adapter: Path) -> None:
    update_config(adapter, remove=["target_modules"])
    refused(adapter, "unsupported_target", CONFIG)


@pytest.mark.parametrize(
    "changes",
    [
        {"fan_in_fan_out": True},
        {"lora_bias": True},
        {"layers_to_transform": [0, 1]},
        {"layers_pattern": "layers"},
        {"rank_pattern": {"q_proj": 4}},
        {"alpha_pattern": {"q_proj": 4}},
        {"layer_replication": [[0, 4]]},
        {"alora_invocation_tokens": [1, 2]},
        {"use_qalora": True},
        {"trainable_token_indices": [5]},
        {"target_parameters": ["mlp.experts.down_proj"]},
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "loftq"},
    ],
)
def test_config_features_the_engine_does_not_serve_are_refused(
    adapter: Path, changes: dict[str, Any]
) -> None:
    update_config(adapter, **changes)
    refused(adapter, "unsupported_feature", CONFIG)


@pytest.mark.parametrize(
    "config_bytes",
    [
        b"{not json",
        b"\xff\xfe{}",
        b"[1, 2]",
        b'{"peft_type": "LORA", "r": 8, "r": 64}',
        b'{"peft_type": "LORA", "r": 8, "lora_alpha": NaN}',
        b"[" * 100_000,
    ],
)
def test_bad_config_json_is_refused(adapter: Path, config_bytes: bytes) -> None:
    (adapter / CONFIG_FILE).write_bytes(config_bytes)
    refused(adapter, "bad_config", CONFIG, limits=ValidationLimits(max_config_bytes=200_000))


def test_task_type_that_is_not_a_string_is_refused(adapter: Path) -> None:
    update_config(adapter, task_type=5)
    refused(adapter, "bad_config", CONFIG)


# --- safetensors header -------------------------------------------------------------------------


def test_header_longer_than_file_is_refused(adapter: Path) -> None:
    corrupt_header_longer_than_file(weights(adapter))
    assert "longer than the rest of the file" in refused(adapter, "bad_safetensors", MODEL)


def test_header_length_over_max_is_refused(adapter: Path) -> None:
    limits = ValidationLimits(max_header_bytes=1024)
    refused(adapter, "header_too_large", MODEL, AdapterTooLargeError, limits)


def test_too_many_tensors_are_refused(adapter: Path) -> None:
    limits = ValidationLimits(max_tensors=100)  # the adapter has 240
    refused(adapter, "too_many_tensors", MODEL, AdapterTooLargeError, limits)


@pytest.mark.parametrize(
    "header",
    [
        b"{not json",
        b"[]",
        b'"a string"',
        b'{"__metadata__": {"format": 1}}',
        b'{"__metadata__": ["format"]}',
        b'{"t": {"dtype": "F32", "shape": [1, 1]}}',
        b'{"t": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4], "extra": 1}}',
        b'{"t": {"dtype": "F32", "shape": [1, -1], "data_offsets": [0, 0]}}',
        b'{"t": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4, 0]}}',
        b'{"t": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4], "dtype": "F16"}}',
        b"\xff{}",
    ],
)
def test_malformed_header_is_refused(adapter: Path, header: bytes) -> None:
    write_raw(weights(adapter), header, bytes(4))
    refused(adapter, "bad_safetensors", MODEL)


def test_offsets_past_the_data_section_are_refused(adapter: Path) -> None:
    header, data = read_header(weights(adapter))
    last = max((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 4, end + 4]
    write_raw(weights(adapter), header, data)
    refused(adapter, "bad_safetensors", MODEL)


def test_offsets_that_disagree_with_the_shape_are_refused(adapter: Path) -> None:
    header, data = read_header(weights(adapter))
    header[lora_name(0, "q_proj", "A")]["shape"] = [4, 576]
    write_raw(weights(adapter), header, data)
    refused(adapter, "bad_safetensors", MODEL)


def test_overlapping_offsets_are_refused(adapter: Path) -> None:
    overlap_two_tensors(weights(adapter))
    assert "overlap" in refused(adapter, "bad_safetensors", MODEL)


def test_gap_between_tensors_is_refused(adapter: Path) -> None:
    leave_gap_before_last_tensor(weights(adapter))
    assert "belong to no tensor" in refused(adapter, "bad_safetensors", MODEL)


def test_trailing_bytes_are_refused(adapter: Path) -> None:
    append_trailing_bytes(weights(adapter))
    assert "belong to no tensor" in refused(adapter, "bad_safetensors", MODEL)


@pytest.mark.parametrize("dtype", ["F64", "I64"])
def test_bad_dtype_is_refused(adapter: Path, dtype: str) -> None:
    edit_tensors(adapter, {lora_name(3, "v_proj", "A"): zeros((8, 576), dtype)})
    refused(adapter, "bad_dtype", MODEL)


# --- tensors against the base model ------------------------------------------------------------


def test_wrong_shape_is_refused(adapter: Path) -> None:
    name = lora_name(0, "q_proj", "A")
    edit_tensors(adapter, {name: zeros((8, 500))})
    message = refused(adapter, "bad_shape", MODEL)
    assert name in message and "shape [8, 500], expected [8, 576]" in message


def test_factor_of_another_rank_is_refused(adapter: Path) -> None:
    edit_tensors(adapter, {lora_name(5, "k_proj", "B"): zeros((192, 4))})
    assert "expected [192, 8]" in refused(adapter, "bad_shape", MODEL)


def test_tensor_that_is_not_2d_is_refused(adapter: Path) -> None:
    edit_tensors(adapter, {lora_name(5, "k_proj", "B"): zeros((192, 8, 1))})
    refused(adapter, "bad_shape", MODEL)


def test_names_that_match_no_module_are_refused(adapter: Path) -> None:
    tensors = read_tensors(weights(adapter))
    renamed = {n.replace("model.layers.", "transformer.h."): t for n, t in tensors.items()}
    write_tensors(weights(adapter), renamed)
    assert "would change nothing" in refused(adapter, "no_matching_modules", MODEL)


def test_adapter_without_tensors_is_refused(adapter: Path) -> None:
    write_tensors(weights(adapter), {})
    refused(adapter, "no_matching_modules", MODEL)


def test_wrong_layer_index_is_refused(adapter: Path) -> None:
    name = lora_name(30, "q_proj", "A")
    edit_tensors(adapter, {name: zeros((8, 576)), lora_name(30, "q_proj", "B"): zeros((576, 8))})
    message = refused(adapter, "unknown_tensor", MODEL)
    assert message == f"tensor {name}: layer 30 does not exist (the base model has 30 layers)"


@pytest.mark.parametrize(
    "name",
    [
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A",  # vLLM needs `.weight`
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight",
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight",
        "base_model.model.model.layers.00.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1" + "0" * 5000 + ".self_attn.q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.lora_A.weight",
    ],
)
def test_tensor_that_matches_no_module_is_refused(adapter: Path, name: str) -> None:
    edit_tensors(adapter, {name: zeros((8, 576))})
    message = refused(adapter, "unknown_tensor", MODEL)
    assert len(message) < 400  # long names are cut short


def test_lora_a_without_its_b_is_refused(adapter: Path) -> None:
    edit_tensors(adapter, {lora_name(7, "o_proj", "B"): None})
    assert "no lora_B" in refused(adapter, "incomplete_pair", MODEL)


def test_projection_not_in_target_modules_is_refused(adapter: Path) -> None:
    edit_tensors(
        adapter,
        {
            lora_name(0, "gate_proj", "A"): zeros((8, 576)),
            lora_name(0, "gate_proj", "B"): zeros((1536, 8)),
        },
    )
    assert "gate_proj" in refused(adapter, "target_mismatch", MODEL)


# --- pickles and upload file names --------------------------------------------------------------


def test_pickled_bin_is_refused_and_never_unpickled(adapter: Path, tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    pickled = write_pickled_bin(tmp_path / "adapter_model.bin", marker)
    with pytest.raises(AdapterRejectedError) as caught:
        check_upload_filename(MODEL, pickled.name)
    assert (caught.value.code, caught.value.param) == ("pickle_refused", MODEL)
    config = (adapter / CONFIG_FILE).read_bytes()
    with pytest.raises(AdapterRejectedError) as caught:
        validate_adapter(config, pickled, base_spec(), LIMITS)
    assert (caught.value.code, caught.value.param) == ("bad_safetensors", MODEL)
    assert not marker.exists()


def test_pickle_corpus_file_would_run_code_if_loaded(tmp_path: Path) -> None:
    # Proves the test above is meaningful: loading this file does run code.
    marker = tmp_path / "unpickled"
    pickle.loads(write_pickled_bin(tmp_path / "armed.bin", marker).read_bytes())
    assert marker.exists()


@pytest.mark.parametrize(
    ("field", "filename", "code"),
    [
        (MODEL, "adapter_model.bin", "pickle_refused"),
        (MODEL, "x.pt", "pickle_refused"),
        (MODEL, "model.PTH", "pickle_refused"),
        (CONFIG, "adapter_config.pkl", "pickle_refused"),
        (CONFIG, "../adapter_config.json", "bad_filename"),
        (MODEL, "a/adapter_model.safetensors", "bad_filename"),
        (MODEL, "/tmp/adapter_model.safetensors", "bad_filename"),
        (MODEL, "a\\adapter_model.safetensors", "bad_filename"),
        (MODEL, "adapter_model.safetensors\0", "bad_filename"),
        (MODEL, "adapter.zip", "archive_refused"),
        (MODEL, "adapter.tar.gz", "archive_refused"),
        (MODEL, None, "bad_filename"),
        (MODEL, "", "bad_filename"),
        (MODEL, "model.safetensors", "bad_filename"),
        (CONFIG, "adapter_model.safetensors", "bad_filename"),
        (CONFIG, "Adapter_Config.json", "bad_filename"),
    ],
)
def test_wrong_upload_filenames_are_refused(field: str, filename: str | None, code: str) -> None:
    with pytest.raises(AdapterRejectedError) as caught:
        check_upload_filename(field, filename)
    assert (caught.value.code, caught.value.param) == (code, field)


@pytest.mark.parametrize(("field", "filename"), [(CONFIG, CONFIG_FILE), (MODEL, WEIGHTS_FILE)])
def test_right_upload_filenames_are_accepted(field: str, filename: str) -> None:
    check_upload_filename(field, filename)


def test_unknown_upload_field_is_refused() -> None:
    with pytest.raises(AdapterRejectedError) as caught:
        check_upload_filename("adapter_weights", WEIGHTS_FILE)
    assert caught.value.code == "unknown_field"


def test_validation_does_not_import_torch() -> None:
    # The gateway image has no torch: validation must not need it.
    code = "import sys, adapters.validation; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
