"""Adapter validation: decides from the uploaded bytes alone whether an adapter is safe to store and
servable by the engine. Owns the upload file-name rules, the adapter_config.json rules and a
hand-written safetensors header parser; no tensor is ever loaded (and torch is never imported).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from adapters.errors import AdapterRejectedError, AdapterTooLargeError
from adapters.types import CONFIG_FILE, WEIGHTS_FILE, AdapterInfo, BaseModelSpec, adapter_digest

CONFIG_FIELD = "adapter_config"
WEIGHTS_FIELD = "adapter_model"
_FILE_FOR_FIELD = {CONFIG_FIELD: CONFIG_FILE, WEIGHTS_FIELD: WEIGHTS_FILE}
# Formats whose loaders run code (pickle) or unpack paths we do not control (archives).
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar")

_DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2}
_HASH_BLOCK = 1024 * 1024
# vLLM's parse_fine_tuned_lora_name only takes lora_A/lora_B tensors with the `.weight` suffix.
# DoRA adds a magnitude vector per module (`...<projection>.lora_magnitude_vector`), factor "M".
_TENSOR_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(0|[1-9][0-9]*)\.(\w+)\.(\w+)"
    r"\.(?:lora_(A|B)\.weight|lora_magnitude_vector)",
    re.ASCII,
)
_NAME_FORM = "base_model.model.model.layers.<i>.<self_attn|mlp>.<projection>.lora_<A|B>.weight"
_MAGNITUDE = "M"
# modules_to_save a merge can take: a full trained copy of the module, (vocab, hidden) each.
# PEFT saves the copy under the module's own weight name.
_SAVED_MODULE_TENSORS = {
    "lm_head": "base_model.model.lm_head.weight",
    "embed_tokens": "base_model.model.model.embed_tokens.weight",
}

# Config keys that must be empty or false. vLLM itself refuses DoRA, modules_to_save, lora_bias,
# layer_replication, aLoRA, QALoRA and BD-LoRA; the others change what the adapter computes
# (transposed weights, base-weight surgery, routing, extra tensors) or give per-module ranks and
# layer subsets that the shape checks below do not model.
# DoRA (use_dora) and modules_to_save of the embedding or LM head are accepted as merge-only:
# vLLM cannot hot-swap them, PEFT can merge them.
_MUST_BE_UNSET: dict[str, tuple[str, str]] = {
    "fan_in_fan_out": ("unsupported_feature", "fan_in_fan_out (transposed weights)"),
    "lora_bias": ("unsupported_feature", "LoRA bias (lora_bias)"),
    "layers_to_transform": ("unsupported_feature", "layers_to_transform"),
    "layers_pattern": ("unsupported_feature", "layers_pattern"),
    "rank_pattern": ("unsupported_feature", "per-module ranks (rank_pattern)"),
    "alpha_pattern": ("unsupported_feature", "per-module alphas (alpha_pattern)"),
    "layer_replication": ("unsupported_feature", "layer_replication"),
    "alora_invocation_tokens": ("unsupported_feature", "Activated LoRA (alora_invocation_tokens)"),
    "use_qalora": ("unsupported_feature", "QALoRA (use_qalora)"),
    "use_bdlora": ("unsupported_feature", "block-diagonal LoRA (use_bdlora)"),
    "kasa_config": ("unsupported_feature", "KaSA (kasa_config)"),
    "arrow_config": ("unsupported_feature", "Arrow routing (arrow_config)"),
    "monteclora_config": ("unsupported_feature", "MonteCLoRA (monteclora_config)"),
    "trainable_token_indices": ("unsupported_feature", "trainable_token_indices"),
    "target_parameters": ("unsupported_feature", "target_parameters"),
}
# Initialisations that only set the starting weights; the others (PiSSA, OLoRA, LoftQ, CorDA …)
# rewrite base-model weights when PEFT loads the adapter, which a shared engine cannot do.
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})


@dataclass(frozen=True)
class ValidationLimits:
    max_config_bytes: int = 64 * 1024
    max_weights_bytes: int = 256 * 1024 * 1024
    max_header_bytes: int = 16 * 1024 * 1024
    max_tensors: int = 4096
    max_rank: int = 16  # the engine's --max-lora-rank (the gateway passes the real value)


@dataclass(frozen=True)
class _LoraConfig:
    rank: int
    alpha: float
    targets: frozenset[str]
    dora: bool = False  # merge-only: served through a merged engine alone
    saved_modules: frozenset[str] = frozenset()  # modules_to_save: merge-only too

    @property
    def merge_only(self) -> bool:
        return self.dora or bool(self.saved_modules)


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def validate_adapter(
    config_bytes: bytes, weights_path: Path, base: BaseModelSpec, limits: ValidationLimits
) -> AdapterInfo:
    """Check an uploaded adapter without loading tensors; raise AdapterRejectedError /
    AdapterTooLargeError (with a `code` and `param`) or return its AdapterInfo."""
    with weights_path.open("rb") as weights:
        weights_size = os.fstat(weights.fileno()).st_size
        _check_sizes(len(config_bytes), weights_size, limits)
        config = _parse_config(config_bytes, base, limits)
        tensors = _read_header(weights, weights_size, limits)
        present = _check_tensors(tensors, config, base)
        weights.seek(0)
        weights_sha256 = _stream_sha256(weights)
    digest = adapter_digest(hashlib.sha256(config_bytes).hexdigest(), weights_sha256)
    return AdapterInfo(
        digest=digest,
        rank=config.rank,
        alpha=config.alpha,
        target_modules=present,
        size_bytes=len(config_bytes) + weights_size,
        merge_only=config.merge_only,
    )


def check_upload_filename(field: str, filename: str | None) -> None:
    """Refuse an upload part unless it is the one file its field names, by its bare name."""
    expected = _FILE_FOR_FIELD.get(field)
    if expected is None:
        raise AdapterRejectedError(
            f"unknown upload field {_show(field)}: send {CONFIG_FIELD} and {WEIGHTS_FIELD}",
            code="unknown_field",
            param=_show(field),
        )
    if not filename:
        _refuse(field, "bad_filename", f"{field} has no file name: send it as {expected}")
    if any(bad in filename for bad in ("/", "\\", "\0", "..")):
        _refuse(
            field,
            "bad_filename",
            f"{field} file name {_show(filename)} is not a bare file name: send it as {expected}",
        )
    lowered = filename.lower()
    if lowered.endswith(_PICKLE_SUFFIXES):
        _refuse(
            field,
            "pickle_refused",
            f"{field} file {_show(filename)} is a pickle, which can run code when loaded: "
            f"adapters are accepted only as {CONFIG_FILE} and {WEIGHTS_FILE}",
        )
    if lowered.endswith(_ARCHIVE_SUFFIXES):
        _refuse(
            field,
            "archive_refused",
            f"{field} file {_show(filename)} is an archive: upload {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} as two separate files",
        )
    if filename != expected:
        _refuse(field, "bad_filename", f"{field} must be named {expected}, got {_show(filename)}")


# --- sizes and config --------------------------------------------------------------------------


def _check_sizes(config_size: int, weights_size: int, limits: ValidationLimits) -> None:
    if config_size > limits.max_config_bytes:
        raise AdapterTooLargeError(
            f"{CONFIG_FILE} is {config_size} bytes, over the limit of {limits.max_config_bytes}",
            code="config_too_large",
            param=CONFIG_FIELD,
        )
    if weights_size > limits.max_weights_bytes:
        raise AdapterTooLargeError(
            f"{WEIGHTS_FILE} is {weights_size} bytes, over the limit of {limits.max_weights_bytes}",
            code="weights_too_large",
            param=WEIGHTS_FIELD,
        )
    if weights_size < 8:
        _refuse(
            WEIGHTS_FIELD,
            "bad_safetensors",
            f"{WEIGHTS_FILE} is {weights_size} bytes: too short to be a safetensors file",
        )


def _parse_config(
    config_bytes: bytes, base: BaseModelSpec, limits: ValidationLimits
) -> _LoraConfig:
    try:
        raw = _strict_json(config_bytes)
    except (ValueError, RecursionError) as exc:
        _refuse(CONFIG_FIELD, "bad_config", f"{CONFIG_FILE} is not valid UTF-8 JSON: {exc}")
    if not isinstance(raw, dict):
        _refuse(CONFIG_FIELD, "bad_config", f"{CONFIG_FILE} must hold a JSON object")
    if raw.get("peft_type") != "LORA":
        found = f"is {_show(raw['peft_type'])}" if "peft_type" in raw else "is missing"
        _refuse(
            CONFIG_FIELD,
            "not_lora",
            f"peft_type {found}: only LoRA adapters (peft_type LORA) can be served",
        )
    rank = _check_rank(raw.get("r"), limits.max_rank)
    alpha = _check_alpha(raw.get("lora_alpha"))
    _check_features(raw)
    targets = _check_targets(raw.get("target_modules"), base)
    dora = raw.get("use_dora", False)
    if not isinstance(dora, bool):
        _refuse(CONFIG_FIELD, "bad_config", f"use_dora is {_show(dora)}: not true or false")
    saved = _check_modules_to_save(raw.get("modules_to_save"), base)
    return _LoraConfig(rank, alpha, targets, dora, saved)


def _check_modules_to_save(value: Any, base: BaseModelSpec) -> frozenset[str]:
    if value is None or value == []:
        return frozenset()
    supported = " and ".join(_SAVED_MODULE_TENSORS)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _refuse(
            CONFIG_FIELD, "bad_config", f"modules_to_save is {_show(value)}: not a list of names"
        )
    other = next((v for v in value if v not in _SAVED_MODULE_TENSORS), None)
    if other is not None:
        _refuse(
            CONFIG_FIELD,
            "modules_to_save_unsupported",
            f"modules_to_save names {_show(other)}: only {supported} can be saved modules "
            "(adapter_config has modules_to_save=" + _show(value) + ")",
        )
    if not base.vocab_size:
        _refuse(
            CONFIG_FIELD,
            "modules_to_save_unsupported",
            "modules_to_save cannot be checked: the base model's vocab_size is unknown",
        )
    return frozenset(value)


def _check_rank(value: Any, max_rank: int) -> int:
    if not _is_int(value) or value < 1:
        _refuse(CONFIG_FIELD, "bad_rank", f"r is {_show(value)}: the rank must be an integer ≥ 1")
    if value > max_rank:
        _refuse(
            CONFIG_FIELD,
            "rank_over_limit",
            f"rank {value} is over the engine's max LoRA rank {max_rank}",
        )
    return int(value)


def _check_alpha(value: Any) -> float:
    try:
        alpha = (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0
        )
    except OverflowError:  # an integer too large for a float
        alpha = math.inf
    if not math.isfinite(alpha) or alpha <= 0:
        _refuse(CONFIG_FIELD, "bad_alpha", f"lora_alpha is {_show(value)}: it must be a number > 0")
    return alpha


def _check_features(raw: dict[str, Any]) -> None:
    for key, (code, what) in _MUST_BE_UNSET.items():
        if raw.get(key):
            message = what if code != "unsupported_feature" else f"{what}: not supported"
            _refuse(CONFIG_FIELD, code, f"{message} (adapter_config has {key}={_show(raw[key])})")
    if raw.get("bias", "none") != "none":
        _refuse(
            CONFIG_FIELD,
            "bias_unsupported",
            f"bias is {_show(raw['bias'])}: adapters with bias terms are not supported",
        )
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, bool) and not (isinstance(init, str) and init.lower() in _PLAIN_INITS):
        _refuse(
            CONFIG_FIELD,
            "unsupported_feature",
            f"init_lora_weights={_show(init)} changes the base model's weights when loaded, "
            "which a shared engine cannot do: convert the adapter to plain LoRA first",
        )
    task_type = raw.get("task_type")
    if task_type is not None and not isinstance(task_type, str):
        _refuse(CONFIG_FIELD, "bad_config", f"task_type is {_show(task_type)}: not a string")


def _check_targets(value: Any, base: BaseModelSpec) -> frozenset[str]:
    known = ", ".join(base.projections)
    if isinstance(value, str):
        _refuse(
            CONFIG_FIELD,
            "unsupported_target",
            f"target_modules is the pattern {_show(value)}: list projection names instead "
            f"(any of {known})",
        )
    if not isinstance(value, list) or not value:
        _refuse(
            CONFIG_FIELD,
            "unsupported_target",
            f"target_modules must be a non-empty list of projection names (any of {known})",
        )
    for name in value:
        if not isinstance(name, str) or name not in base.projections:
            _refuse(
                CONFIG_FIELD,
                "unsupported_target",
                f"target module {_show(name)} is not supported: adapters may target only {known}",
            )
    return frozenset(value)


# --- safetensors header -----------------------------------------------------------------------


def _read_header(weights: BinaryIO, file_size: int, limits: ValidationLimits) -> list[_Tensor]:
    (length,) = struct.unpack("<Q", weights.read(8))
    if 8 + length > file_size:
        _refuse(
            WEIGHTS_FIELD,
            "bad_safetensors",
            f"{WEIGHTS_FILE}: the header claims {length} bytes, longer than the rest of the "
            f"file ({file_size - 8} bytes)",
        )
    if length > limits.max_header_bytes:
        raise AdapterTooLargeError(
            f"{WEIGHTS_FILE}: the header is {length} bytes, over the limit of "
            f"{limits.max_header_bytes}",
            code="header_too_large",
            param=WEIGHTS_FIELD,
        )
    raw = weights.read(length)
    # safetensors itself refuses a header that does not open with "{".
    if len(raw) != length or not raw.startswith(b"{"):
        _weights_error(f"the {length}-byte header is not a JSON object")
    try:
        header = _strict_json(raw)
    except (ValueError, RecursionError) as exc:
        _weights_error(f"the header is not valid UTF-8 JSON: {exc}")
    if not isinstance(header, dict):
        _weights_error("the header is not a JSON object")
    return _parse_entries(header, file_size - 8 - length, limits)


def _parse_entries(
    header: dict[str, Any], data_len: int, limits: ValidationLimits
) -> list[_Tensor]:
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _weights_error("__metadata__ must map strings to strings")
    if len(header) > limits.max_tensors:
        raise AdapterTooLargeError(
            f"{WEIGHTS_FILE} holds {len(header)} tensors, over the limit of {limits.max_tensors}",
            code="too_many_tensors",
            param=WEIGHTS_FIELD,
        )
    tensors = [_parse_entry(name, entry, data_len) for name, entry in header.items()]
    _check_layout(tensors, data_len)
    return tensors


def _parse_entry(name: str, entry: Any, data_len: int) -> _Tensor:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        _weights_error(f"tensor {_show(name)}: needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_SIZES:
        _refuse(
            WEIGHTS_FIELD,
            "bad_dtype",
            f"tensor {_show(name)} has dtype {_show(dtype)}: adapter weights must be "
            f"{', '.join(_DTYPE_SIZES)}",
        )
    if not _is_int_list(shape) or not _is_int_list(offsets, length=2):
        _weights_error(f"tensor {_show(name)}: shape and data_offsets must be lists of integers")
    # LoRA factors are 2-D, DoRA magnitude vectors 1-D (their sizes are checked against the base).
    if len(shape) != (1 if name.endswith(".lora_magnitude_vector") else 2):
        _refuse(
            WEIGHTS_FIELD,
            "bad_shape",
            f"tensor {_show(name)} has shape {shape}: LoRA weights are 2-D, DoRA magnitude "
            "vectors 1-D",
        )
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        _weights_error(
            f"tensor {_show(name)}: data_offsets {offsets} fall outside the {data_len}-byte "
            "data section"
        )
    if end - begin != math.prod(shape) * _DTYPE_SIZES[dtype]:
        _weights_error(
            f"tensor {_show(name)}: data_offsets {offsets} hold {end - begin} bytes, but "
            f"shape {shape} in {dtype} needs {math.prod(shape) * _DTYPE_SIZES[dtype]}"
        )
    return _Tensor(name, dtype, tuple(shape), begin, end)


def _check_layout(tensors: list[_Tensor], data_len: int) -> None:
    # Like safetensors' own check: tensors tile the data section, so no byte is shared or hidden.
    cursor, previous = 0, None
    for tensor in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if previous is not None and tensor.begin < cursor:
            _weights_error(f"tensors {_show(previous.name)} and {_show(tensor.name)} overlap")
        if tensor.begin > cursor:
            _weights_error(f"data bytes {cursor}..{tensor.begin} belong to no tensor")
        cursor, previous = tensor.end, tensor
    if cursor != data_len:
        _weights_error(f"data bytes {cursor}..{data_len} belong to no tensor")


# --- tensors against the base model -----------------------------------------------------------


def _check_tensors(
    tensors: list[_Tensor], config: _LoraConfig, base: BaseModelSpec
) -> tuple[str, ...]:
    pairs: dict[tuple[int, str], dict[str, _Tensor]] = {}
    unknown: list[tuple[str, str]] = []
    saved_names = {name: module for module, name in _SAVED_MODULE_TENSORS.items()}
    saved: set[str] = set()
    for tensor in tensors:
        if tensor.name in saved_names:
            saved.add(_check_saved_module(tensor, saved_names[tensor.name], config, base))
            continue
        located = _locate(tensor.name, base)
        if isinstance(located, str):
            unknown.append((tensor.name, located))
        else:
            layer, projection, factor = located
            pairs.setdefault((layer, projection), {})[factor] = tensor
    if not pairs:
        # Names that match no module would load fine and change nothing: a silent no-op.
        first = f"; the first is {_show(unknown[0][0])}: {unknown[0][1]}" if unknown else ""
        _refuse(
            WEIGHTS_FIELD,
            "no_matching_modules",
            f"none of the {len(tensors)} tensors matches a module of the base model, so the "
            f"adapter would change nothing{first}",
        )
    if unknown:
        name, why = unknown[0]
        _refuse(WEIGHTS_FIELD, "unknown_tensor", f"tensor {_show(name)}: {why}")
    for (layer, projection), pair in sorted(pairs.items()):
        _check_pair(layer, projection, pair, config, base)
    for module in sorted(config.saved_modules - saved):
        _refuse(
            WEIGHTS_FIELD,
            "incomplete_pair",
            f"modules_to_save lists {module}, but there is no {_SAVED_MODULE_TENSORS[module]}",
        )
    return tuple(sorted({projection for _, projection in pairs}))


def _check_saved_module(
    tensor: _Tensor, module: str, config: _LoraConfig, base: BaseModelSpec
) -> str:
    if module not in config.saved_modules:
        _refuse(
            WEIGHTS_FIELD,
            "unknown_tensor",
            f"tensor {_show(tensor.name)} is a saved copy of {module}, but adapter_config's "
            "modules_to_save does not list it",
        )
    expected = (base.vocab_size, base.hidden_size)
    if tensor.shape != expected:
        _refuse(
            WEIGHTS_FIELD,
            "bad_shape",
            f"tensor {_show(tensor.name)} has shape {list(tensor.shape)}, expected "
            f"{list(expected)} (the base model's vocab_size × hidden_size)",
        )
    return module


def _locate(name: str, base: BaseModelSpec) -> tuple[int, str, str] | str:
    """Where a tensor goes, as (layer, projection, "A" | "B" | "M"), or why it goes nowhere."""
    match = _TENSOR_NAME.fullmatch(name)
    if match is None:
        return f"not a LoRA weight of the base model (expected {_NAME_FORM})"
    layer, parent, projection, factor = match.groups()
    factor = factor or _MAGNITUDE
    if projection not in base.projections:
        return f"the base model has no projection {projection} (it has {', '.join(base.parents)})"
    if parent != base.parents[projection]:
        return f"{projection} is in {base.parents[projection]}, not {parent}"
    # Compare the length first: int() refuses strings of thousands of digits.
    if len(layer) > len(str(base.num_layers)) or int(layer) >= base.num_layers:
        return (
            f"layer {_show(layer, 20)} does not exist (the base model has {base.num_layers} layers)"
        )
    return int(layer), projection, factor


def _check_pair(
    layer: int, projection: str, pair: dict[str, _Tensor], config: _LoraConfig, base: BaseModelSpec
) -> None:
    some = next(iter(pair.values()))
    if projection not in config.targets:
        _refuse(
            WEIGHTS_FIELD,
            "target_mismatch",
            f"tensor {_show(some.name)}: {projection} is not in target_modules "
            f"({', '.join(sorted(config.targets))})",
        )
    for factor in ("A", "B"):
        if factor not in pair:
            _refuse(
                WEIGHTS_FIELD,
                "incomplete_pair",
                f"layer {layer} {projection} has lora_{'B' if factor == 'A' else 'A'} "
                f"but no lora_{factor} ({_show(some.name)})",
            )
    if (_MAGNITUDE in pair) != config.dora:
        missing = "has no lora_magnitude_vector" if config.dora else "has a DoRA magnitude vector"
        _refuse(
            WEIGHTS_FIELD,
            "incomplete_pair" if config.dora else "unknown_tensor",
            f"layer {layer} {projection} {missing}, but adapter_config has "
            f"use_dora={str(config.dora).lower()} ({_show(some.name)})",
        )
    in_features, out_features = base.projections[projection]
    expected = {
        "A": (config.rank, in_features),
        "B": (out_features, config.rank),
        _MAGNITUDE: (out_features,),
    }
    for factor, tensor in pair.items():
        if tensor.shape != expected[factor]:
            _refuse(
                WEIGHTS_FIELD,
                "bad_shape",
                f"tensor {_show(tensor.name)} has shape {list(tensor.shape)}, expected "
                f"{list(expected[factor])} (rank {config.rank}, {projection} is "
                f"{in_features} → {out_features})",
            )


# --- helpers ----------------------------------------------------------------------------------


def _stream_sha256(stream: BinaryIO) -> str:
    digest = hashlib.sha256()
    while block := stream.read(_HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def _strict_json(raw: bytes) -> Any:
    # Duplicate keys and NaN/Infinity are legal to Python's json but ambiguous to other parsers
    # (the engine's included): refuse them rather than guess which value the engine would see.
    return json.loads(
        raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant
    )


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_show(key)}")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_list(value: Any, length: int | None = None) -> bool:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        return False
    return all(_is_int(v) and v >= 0 for v in value)


def _show(value: object, limit: int = 120) -> str:
    """A user-supplied value, quoted if odd and cut short, fit for a message or a log line."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _weights_error(message: str) -> NoReturn:
    _refuse(WEIGHTS_FIELD, "bad_safetensors", f"{WEIGHTS_FILE}: {message}")


def _refuse(field: str, code: str, message: str) -> NoReturn:
    raise AdapterRejectedError(message, code=code, param=field)
