"""The adapter store, registry and upload checks as the settings name them: shared by the
gateway's lifespan and the processes that read the registry without a gateway (`loragate engine
--merged`)."""

from __future__ import annotations

import json
import logging

from adapters.merged_store import MergedArtifacts, open_merged_artifacts
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from adapters.store_url import open_store, parse_store_url
from adapters.types import BaseModelSpec
from adapters.validation import ValidationLimits
from server.settings import Settings

logger = logging.getLogger(__name__)


def open_adapter_store(settings: Settings) -> tuple[AdapterStore, AdapterRegistry]:
    """The adapter store and registry `store_url` names (default: the store dir)."""
    return open_store(
        parse_store_url(settings.store_location),
        cache_dir=settings.cache_dir / "store-cache",
        max_adapters_per_tenant=settings.adapters.max_per_tenant,
        max_blob_bytes=settings.adapters.max_upload_bytes,
        record_ttl_s=settings.adapters.record_ttl_s,
    )


def open_merged_store(settings: Settings) -> MergedArtifacts:
    """Where merged copies of adapters live: beside the adapters `store_url` names."""
    return open_merged_artifacts(
        parse_store_url(settings.store_location), cache_dir=settings.cache_dir / "store-cache"
    )


def load_base_spec(settings: Settings) -> BaseModelSpec | None:
    """The base model's shapes, to validate uploads against; None without a local config.

    A quantized base's config.json gives the full-precision shapes too: compressed-tensors only
    adds `quantization_config` to it (`model prepare --quantize` checks the shapes are equal),
    so adapters are checked against the unquantized layers they were trained on."""
    config_path = settings.model_path / "config.json"
    try:
        return BaseModelSpec.from_hf_config(json.loads(config_path.read_text()))
    except (OSError, ValueError, KeyError) as e:
        logger.warning("cannot read %s (%s): adapter uploads will be refused", config_path, e)
        return None


def validation_limits(settings: Settings) -> ValidationLimits:
    a = settings.adapters
    return ValidationLimits(
        max_config_bytes=a.max_config_bytes,
        max_weights_bytes=a.max_upload_bytes,
        max_rank=settings.engine.max_lora_rank,
    )
