"""What the result cache may answer, and under which key.

Only reproducible requests are cached: greedy (temperature 0, explicitly) with n = 1, or an
explicit `seed` (vLLM honours per-request seeds). The key is a sha256 over the tenant, the base
model's name and weights revision, the adapter's version (content digest and registry creation
time), the public model name, the endpoint, and the canonical form of every request field that can
change the output. A replaced adapter, or one deleted and uploaded again, is a new version, so its
old entries can never match again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from server.model_prepare import MANIFEST
from server.settings import Settings

logger = logging.getLogger(__name__)

CacheStatus = Literal["hit", "miss", "bypass"]
CACHE_HEADER = "x-loragate-cache"
KEY_VERSION = 1

# Fields that cannot change the generated content: left out of the key, so a streamed and a
# non-streamed request share one entry. (`model` enters as the resolved public name and adapter
# version; `request_id` and `priority` are never forwarded, and only name or order the work.)
# Every other field, vLLM's sampling and template extensions included, is in the key.
OUTPUT_NEUTRAL_FIELDS = frozenset(
    {"model", "stream", "stream_options", "user", "request_id", "priority"}
)


@dataclass(frozen=True)
class CacheDirectives:
    """The request's `Cache-Control`: no-cache = do not answer from the cache, no-store = do
    not store the result."""

    no_cache: bool = False
    no_store: bool = False

    @classmethod
    def from_header(cls, value: str | None) -> CacheDirectives:
        if not value:
            return cls()
        directives = {part.strip().lower() for part in value[:1024].split(",")}
        return cls(no_cache="no-cache" in directives, no_store="no-store" in directives)


@dataclass(frozen=True)
class CachePlan:
    key: str | None  # None: the request is not reproducible, the cache is not involved
    read: bool
    write: bool

    @classmethod
    def bypass(cls) -> CachePlan:
        return cls(None, False, False)


def is_reproducible(body: dict[str, Any]) -> bool:
    if body.get("n", 1) != 1:
        return False
    return body.get("temperature") == 0 or body.get("seed") is not None


def cache_key(
    *,
    tenant: str,
    base_revision: str,
    adapter_version: str | None,
    public_model: str,
    endpoint: str,
    body: dict[str, Any],
) -> str:
    request = {k: v for k, v in body.items() if k not in OUTPUT_NEUTRAL_FIELDS}
    material = {
        "v": KEY_VERSION,
        "tenant": tenant,
        "base": base_revision,
        "adapter": adapter_version,
        "model": public_model,
        "endpoint": endpoint,
        "request": request,
    }
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def base_revision(settings: Settings) -> str:
    """The base model's name and weights revision, as it enters every cache key (and a merged
    copy's): `<name>@<revision>`, or `<name>-<quantization>@<revision>` for a quantized base,
    so full-precision and quantized weights never share a key, whatever the revision says."""
    model = settings.model
    name = model.name if model.quantization == "none" else f"{model.name}-{model.quantization}"
    if model.revision:
        return f"{name}@{model.revision}"
    digest = _manifest_digest(settings.model_path / MANIFEST, model.quantization)
    if digest is None:
        logger.warning(
            "no model manifest in %s and no LORAGATE_MODEL__REVISION: cache keys name the base "
            "model by name only; set the revision so new weights never hit old results",
            settings.model_path,
        )
        return f"{name}@unversioned"
    return f"{name}@{digest}"


def _manifest_digest(path: Path, quantization: str) -> str | None:
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        scheme = manifest.get("scheme", "none")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if scheme != quantization:
        logger.warning(
            "%s says the weights are %s, LORAGATE_MODEL__QUANTIZATION says %s", path, scheme,
            quantization,
        )  # fmt: skip
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
