"""Build `<models dir>/<name>-<scheme>` from the full-precision model: the quantize worker runs
in the quantize venv, bounded in time, into a temp dir beside the target; what it wrote is
checked (a compressed-tensors config of the scheme, every projection packed in the shapes the
base's config implies), given a manifest and renamed into place. So the target is either absent,
or stale, or a whole quantized model whose manifest vouches for every file: never half-written.

The manifest names the source (its weights' sha256), the scheme, the recipe as applied and the
sha256 of every file written; `base_revision` then gives it cache keys of its own.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.types import BaseModelSpec
from server.model_prepare import MANIFEST, MANIFEST_VERSION, file_sha256
from server.quantization import QuantizeError
from server.quantization.process import run_bounded
from server.quantization.venv import clean_env, ensure_quantize_python

WORKER = Path(__file__).with_name("worker.py")
# What each scheme's config.json must say (compressed-tensors' own format name and weight args).
SCHEME_WEIGHTS: dict[str, dict[str, Any]] = {
    "w4a16": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64,
    },
}  # fmt: skip
PACKED_FORMAT = "pack-quantized"
# Files a model dir may hold that are pickles: vLLM and transformers could load them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 100 << 20
_LOGURU_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+ \| [^|]+ \| [A-Z]+ - ")


@dataclass(frozen=True)
class QuantizedModel:
    path: Path
    scheme: str
    weights_sha256: str
    built: bool  # False when an existing, verified folder was reused
    venv_created: bool = False
    seconds: float | None = None  # the quantizer's own time, when built


def quantized_dir_name(name: str, scheme: str) -> str:
    return f"{name}-{scheme}"


def weights_sha256(files: dict[str, str]) -> str:
    """The sha256 of the single weights file, or of the canonical list of several shards."""
    shards = {n: d for n, d in files.items() if n.endswith(".safetensors")}
    if list(shards) == ["model.safetensors"]:
        return shards["model.safetensors"]
    canonical = json.dumps(shards, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify_quantized_dir(
    path: Path, scheme: str, source_weights_sha256: str | None = None
) -> dict[str, Any]:
    """The manifest of the quantized dir `path`, once every file it lists has its sha256 and it
    says it is `scheme` made from `source_weights_sha256` (when given); QuantizeError if not."""
    try:
        manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise QuantizeError(f"{path} has no readable {MANIFEST}: not built, or incomplete") from e
    if manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("files"), dict):
        raise QuantizeError(f"{path / MANIFEST} has an unknown version or no file list")
    if manifest.get("scheme") != scheme:
        raise QuantizeError(f"{path} holds scheme {manifest.get('scheme')!r}, not {scheme!r}")
    source = manifest.get("source") or {}
    if source_weights_sha256 is not None and source.get("weights_sha256") != source_weights_sha256:
        raise QuantizeError(f"{path} was quantized from other weights than the current model's")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file() or file_sha256(file) != expected:
            raise QuantizeError(f"{file} is missing or does not match its checksum")
    if manifest.get("weights_sha256") != weights_sha256(manifest["files"]):
        raise QuantizeError(f"{path / MANIFEST} names weights it does not list")
    return manifest


def check_quantized_output(out: Path, source: Path, scheme: str) -> None:
    """What the worker wrote is a compressed `scheme` model of the source's shapes."""
    try:
        config = json.loads((out / "config.json").read_text())
        source_config = json.loads((source / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise QuantizeError(f"the quantizer wrote no readable config.json ({e})") from e
    if config.get("architectures") != source_config.get("architectures"):
        raise QuantizeError("the quantized config names another architecture than the source")
    spec = BaseModelSpec.from_hf_config(config)
    if spec != BaseModelSpec.from_hf_config(source_config):
        raise QuantizeError("the quantized config's shapes differ from the source's")
    quant = config.get("quantization_config") or {}
    groups = list((quant.get("config_groups") or {}).values())
    wanted = SCHEME_WEIGHTS[scheme]
    if (
        quant.get("quant_method") != "compressed-tensors"
        or quant.get("format") != PACKED_FORMAT
        or len(groups) != 1
        or any(groups[0].get("weights", {}).get(k) != v for k, v in wanted.items())
        or groups[0].get("input_activations") is not None
    ):
        raise QuantizeError(f"the quantized config.json is not a packed {scheme} model: {quant}")
    pickles = [p.name for p in out.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise QuantizeError(f"the quantizer wrote pickle files: {pickles}")
    for needed in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / needed).is_file():
            raise QuantizeError(f"the quantizer wrote no {needed}")
    _check_packed_tensors(out, spec, wanted)


def _check_packed_tensors(out: Path, spec: BaseModelSpec, weights: dict[str, Any]) -> None:
    tensors: dict[str, Any] = {}
    shards = sorted(out.glob("*.safetensors"))
    if not shards:
        raise QuantizeError("the quantizer wrote no .safetensors weights")
    for shard in shards:
        tensors |= _safetensors_header(shard)
    per_int32 = 32 // int(weights["num_bits"])
    group = int(weights["group_size"])
    for layer in range(spec.num_layers):
        for projection, (fan_in, fan_out) in spec.projections.items():
            prefix = f"model.layers.{layer}.{spec.parents[projection]}.{projection}"
            if f"{prefix}.weight" in tensors:
                raise QuantizeError(f"{prefix} was left unquantized")
            expected = {
                "weight_packed": ("I32", [fan_out, fan_in // per_int32]),
                "weight_scale": (None, [fan_out, fan_in // group]),
            }
            for suffix, (dtype, shape) in expected.items():
                entry = tensors.get(f"{prefix}.{suffix}")
                if entry is None or entry["shape"] != shape or dtype not in (None, entry["dtype"]):
                    raise QuantizeError(f"{prefix}.{suffix} is missing or not {shape}: {entry}")


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        raw = f.read(8)
        (length,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
        if not 0 < length <= MAX_HEADER_BYTES:
            raise QuantizeError(f"{path.name} is not a safetensors file")
        header: dict[str, Any] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def prepare_quantized_model(
    source: Path,
    source_weights_sha256: str,
    target: Path,
    scheme: str,
    *,
    cache_dir: Path,
    quantize_python: Path | None,
    timeout_s: float,
    log_path: Path,
    force: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> QuantizedModel:
    """Quantize the full-precision model in `source` into `target` unless a verified copy made
    from the same weights is already there."""
    if scheme not in SCHEME_WEIGHTS:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}")
    if target.exists() and not force:
        try:
            manifest = verify_quantized_dir(target, scheme, source_weights_sha256)
            return QuantizedModel(target, scheme, manifest["weights_sha256"], built=False)
        except (QuantizeError, OSError) as e:
            progress(f"existing {target.name} is not usable ({e}); rebuilding")

    python, venv_created = ensure_quantize_python(
        quantize_python, cache_dir, log_path=log_path, timeout_s=timeout_s, progress=progress
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    staging = target.parent / f".{target.name}.tmp-{token}"
    result = target.parent / f".{target.name}.result-{token}.json"
    staging.mkdir()
    started = time.monotonic()
    try:
        argv = [
            str(python), str(WORKER), "--source", str(source), "--out", str(staging),
            "--result", str(result), "--scheme", scheme,
        ]  # fmt: skip
        env = clean_env() | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        progress(f"quantizing to {scheme} (about 4 minutes on 2 cores)")
        run_bounded(
            argv, log_path=log_path, timeout_s=timeout_s, what="the quantizer", env=env,
            on_line=lambda line: progress(_status(scheme, line)),
        )  # fmt: skip
        report = json.loads(result.read_text())
        progress("checking the quantized model")
        check_quantized_output(staging, source, scheme)
        files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        manifest = {
            "version": MANIFEST_VERSION,
            "scheme": scheme,
            "source": {"path": str(source), "weights_sha256": source_weights_sha256},
            "recipe": report.get("recipe"),
            "versions": report.get("versions"),
            "weights_sha256": weights_sha256(files),
            "files": files,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        verify_quantized_dir(staging, scheme, source_weights_sha256)
        # The quantizer wrote some files private; the engine may run as another user.
        staging.chmod(0o755)
        for file in staging.iterdir():
            file.chmod(0o644)
        _replace(target, staging)
    except (OSError, ValueError, KeyError) as e:
        raise QuantizeError(f"quantizing failed: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        result.unlink(missing_ok=True)
    seconds = round(time.monotonic() - started, 1)
    return QuantizedModel(
        target, scheme, str(manifest["weights_sha256"]), True, venv_created, seconds
    )


def _replace(target: Path, staging: Path) -> None:
    """Put `staging` at `target`: a stale target is moved aside first and removed after."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{secrets.token_hex(8)}"
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _status(scheme: str, line: str) -> str:
    # llmcompressor logs through loguru: its timestamp and logger name only make the line long.
    text = _LOGURU_PREFIX.sub("", line.removeprefix("stage: "))
    return f"quantizing to {scheme}: {text[:90]}"
