"""Test adapters for SmolLM2-135M-Instruct: real PEFT adapters, and the refusal corpus (files
edited byte by byte, by a small safetensors reader/writer that needs no torch).
"""

from __future__ import annotations

import json
import math
import pathlib
import pickle
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.types import CONFIG_FILE, WEIGHTS_FILE, BaseModelSpec

# SmolLM2-135M-Instruct's decoder dimensions (its config.json, minus what LoRA shapes ignore).
SMOLLM2_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}


def base_spec() -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(SMOLLM2_CONFIG)


def write_peft_adapter(
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: Iterable[str] = ATTENTION,
    seed: int = 0,
    scale: float = 1.0,
    dora: bool = False,
) -> Path:
    """A real PEFT LoRA adapter for SmolLM2's shapes, the same bytes for the same arguments.

    lora_B is random (init_lora_weights=False), times `scale`: at scale 1 the effect on greedy
    output is barely visible, so tests that need one pass a large scale. `dora`: a DoRA
    adapter, whose magnitude vectors come from a random stand-in base: right in shape, not in
    value (a test that serves one makes it on the real base).
    """
    # Imported here so tests that only edit files do not pay for torch (seconds).
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    # The vocabulary does not change any LoRA shape; a small one keeps the throwaway base small.
    config = LlamaConfig(**{**SMOLLM2_CONFIG, "vocab_size": 64})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # Uninitialised base weights: only the LoRA factors are saved, and they are seeded below;
    # except for DoRA, whose magnitude vectors are the base weights' norms: seeded ones then.
    model = model.to_empty(device="cpu")
    if dora:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for param in model.parameters():
                param.normal_(std=0.02)
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
        use_dora=dora,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.mul_(scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)  # the model card is not part of an upload
    return out_dir


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(src / name, dst / name)
    return dst


def lora_name(layer: int, projection: str, factor: str) -> str:
    """PEFT's name for one LoRA factor ("A" or "B") of a projection in a decoder layer."""
    parent = base_spec().parents[projection]
    return f"base_model.model.model.layers.{layer}.{parent}.{projection}.lora_{factor}.weight"


# --- adapter_config.json ------------------------------------------------------------------------


def read_config(adapter_dir: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((adapter_dir / CONFIG_FILE).read_text())
    return config


def update_config(adapter_dir: Path, remove: Iterable[str] = (), **changes: Any) -> bytes:
    """Rewrite adapter_config.json with `changes` applied and `remove` keys dropped."""
    config = read_config(adapter_dir) | changes
    for key in remove:
        config.pop(key, None)
    data = json.dumps(config, indent=2).encode()
    (adapter_dir / CONFIG_FILE).write_bytes(data)
    return data


# --- safetensors, by hand ------------------------------------------------------------------------


@dataclass
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def zeros(shape: tuple[int, ...], dtype: str = "F32") -> RawTensor:
    return RawTensor(dtype, shape, bytes(math.prod(shape) * DTYPE_SIZES[dtype]))


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header as JSON and the data section, exactly as stored."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header: dict[str, Any] = json.loads(raw[8 : 8 + length])
    return header, raw[8 + length :]


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    """Write a header and data section as given, however wrong, padded like safetensors does."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def read_tensors(path: Path) -> dict[str, RawTensor]:
    header, data = read_header(path)
    header.pop("__metadata__", None)
    return {
        name: RawTensor(
            e["dtype"], tuple(e["shape"]), data[e["data_offsets"][0] : e["data_offsets"][1]]
        )
        for name, e in header.items()
    }


def write_tensors(path: Path, tensors: dict[str, RawTensor]) -> Path:
    """A well-formed safetensors file (tensors laid out in name order, as safetensors writes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = bytearray()
    for name in sorted(tensors):
        tensor = tensors[name]
        header[name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [len(data), len(data) + len(tensor.data)],
        }
        data += tensor.data
    return write_raw(path, header, bytes(data))


def edit_tensors(adapter_dir: Path, changes: dict[str, RawTensor | None]) -> Path:
    """Replace or add (a RawTensor) or drop (None) tensors, by full name; keep the file valid."""
    path = adapter_dir / WEIGHTS_FILE
    tensors = read_tensors(path)
    for name, tensor in changes.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    return write_tensors(path, tensors)


# --- the refusal corpus -------------------------------------------------------------------------


def corrupt_header_longer_than_file(path: Path) -> Path:
    """Claim a header one byte longer than the whole file."""
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    path.write_bytes(bytes(raw))
    return path


def overlap_two_tensors(path: Path) -> Path:
    """Point a tensor at the bytes of an earlier one of the same size; the file keeps its size."""
    header, data = read_header(path)
    by_size: dict[int, str] = {}
    for name in _in_data_order(header):
        begin, end = header[name]["data_offsets"]
        if end - begin in by_size:
            header[name]["data_offsets"] = list(header[by_size[end - begin]]["data_offsets"])
            return write_raw(path, header, data)
        by_size[end - begin] = name
    raise ValueError(f"{path}: no two tensors of the same size")


def leave_gap_before_last_tensor(path: Path, gap: int = 8) -> Path:
    """Insert unclaimed bytes in the data section just before the last tensor."""
    header, data = read_header(path)
    last = _in_data_order(header)[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + gap, end + gap]
    return write_raw(path, header, data[:begin] + bytes(gap) + data[begin:])


def append_trailing_bytes(path: Path, count: int = 8) -> Path:
    with path.open("ab") as f:
        f.write(b"\0" * count)
    return path


class _TouchOnUnpickle:
    """Unpickling this calls Path.touch(marker): proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (pathlib.Path.touch, (self.marker,))


def write_pickled_bin(path: Path, marker: Path) -> Path:
    """A pickle whose loading would create `marker` (a stand-in for arbitrary code)."""
    path.write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    return path


def _in_data_order(header: dict[str, Any]) -> list[str]:
    names = [n for n in header if n != "__metadata__"]
    return sorted(names, key=lambda n: header[n]["data_offsets"][0])
