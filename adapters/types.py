"""Value objects shared by adapter validation, the store, the registry and the gateway.

An adapter version is identified by its content digest, never by the name a tenant gave it:
cache keys, engine-side names and routing all use `AdapterRecord.digest`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

ADAPTER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_digest(config_sha256: str, weights_sha256: str) -> str:
    """The version of an adapter: sha256 over both files' digests, labelled by file name."""
    h = hashlib.sha256()
    h.update(f"{CONFIG_FILE}\0{config_sha256}\n{WEIGHTS_FILE}\0{weights_sha256}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter is checked against: the base model's layers and projection shapes."""

    num_layers: int
    # projection name -> (in_features, out_features), e.g. "q_proj" -> (576, 576)
    projections: dict[str, tuple[int, int]]
    # where each projection lives inside a decoder layer, e.g. "q_proj" -> "self_attn"
    parents: dict[str, str]
    # the embedding and LM head shape (vocab_size, hidden_size): what a modules_to_save copy of
    # either must have; (0, 0) where unknown (such adapters are then refused)
    vocab_size: int = 0
    hidden_size: int = 0

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> BaseModelSpec:
        """For Llama-style decoders (Llama, SmolLM2, Mistral, Qwen2 …)."""
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inter = int(config["intermediate_size"])
        projections = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        parents = {n: "self_attn" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        parents |= {n: "mlp" for n in ("gate_proj", "up_proj", "down_proj")}
        return cls(
            int(config["num_hidden_layers"]), projections, parents,
            vocab_size=int(config.get("vocab_size") or 0), hidden_size=hidden,
        )  # fmt: skip


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned about an adapter's files."""

    digest: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int  # both files together
    # Only a merged engine can serve it (DoRA, modules_to_save: vLLM's hot-swap path refuses
    # them, PEFT merges them).
    merge_only: bool = False


FULL_PRECISION = "none"  # the scheme of a merged copy stored unquantized


@dataclass(frozen=True)
class MergedCopy:
    """A merged model built from one adapter version: the base it was merged into and how it was
    stored, and its key in the store (`server.merging.build.merge_key` of the three)."""

    key: str
    base_revision: str
    scheme: str  # "none": full precision; else the quantization scheme applied after merging

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "base_revision": self.base_revision, "scheme": self.scheme}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MergedCopy:
        return cls(str(data["key"]), str(data["base_revision"]), str(data["scheme"]))


@dataclass(frozen=True)
class AdapterRecord:
    """One named version of a tenant's adapter, as the registry holds it. `merged` lists the
    merged copies an operator promoted it to; a new version (another digest) starts with none."""

    tenant: str
    name: str
    digest: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at: str  # ISO 8601, UTC
    merged: tuple[MergedCopy, ...] = ()
    merge_only: bool = False  # see AdapterInfo

    def merged_copy(self, base_revision: str, scheme: str = FULL_PRECISION) -> MergedCopy | None:
        """Its copy merged into the base at `base_revision` and stored as `scheme`, if any."""
        for copy in self.merged:
            if copy.base_revision == base_revision and copy.scheme == scheme:
                return copy
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "merge_only": self.merge_only,
            "merged": [copy.to_json() for copy in self.merged],
            "tenant": self.tenant,
            "name": self.name,
            "digest": self.digest,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterRecord:
        return cls(
            tenant=str(data["tenant"]),
            name=str(data["name"]),
            digest=str(data["digest"]),
            rank=int(data["rank"]),
            alpha=float(data["alpha"]),
            target_modules=tuple(str(m) for m in data["target_modules"]),
            size_bytes=int(data["size_bytes"]),
            created_at=str(data["created_at"]),
            # Absent in records written before promotion existed.
            merged=tuple(MergedCopy.from_json(m) for m in data.get("merged", [])),
            merge_only=bool(data.get("merge_only", False)),
        )
