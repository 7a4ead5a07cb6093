"""Which merged model `loragate engine --merged TENANT/NAME` serves: the adapter's current
version, as the registry records it, merged into this engine's base model (same base revision,
full precision), fetched from the store and checked whole before vLLM is pointed at it.

It is served as `lgm-<digest>` (`server.engines.adapter_slots.merged_engine_name`): gateways
route a version's requests to the engines serving that name, so an engine started before the
adapter was replaced serves nobody's requests for the new version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterError
from adapters.types import AdapterRecord
from server.adapter_setup import open_adapter_store, open_merged_store
from server.cache.policy import base_revision
from server.engines.adapter_slots import merged_engine_name
from server.engines.process import EngineStartError
from server.merging.build import MergeError, verify_merged_dir
from server.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergedModel:
    directory: Path
    served_name: str
    record: AdapterRecord


def parse_merged_spec(spec: str) -> tuple[str, str]:
    tenant, sep, name = spec.partition("/")
    if not sep or not tenant or not name or "/" in name:
        raise EngineStartError(f"--merged takes TENANT/NAME, not {spec!r}")
    return tenant, name


def resolve_merged_model(settings: Settings, spec: str) -> MergedModel:
    """The merged model of `spec` (TENANT/NAME), local and verified; EngineStartError, saying
    what to do, when the adapter is absent, not promoted for this base, or its files are not
    whole."""
    tenant, name = parse_merged_spec(spec)
    _, registry = open_adapter_store(settings)
    try:
        record = registry.get(tenant, name)
    except AdapterError as e:
        raise EngineStartError(f"cannot read adapter {spec}: {e.message}") from e
    if record is None:
        raise EngineStartError(f"no adapter {spec} in the store")
    revision = base_revision(settings)
    copy = record.merged_copy(revision)
    if copy is None:
        raise EngineStartError(
            f"adapter {spec} (version {record.digest[:12]}) has no merged copy for the base "
            f"{revision}: run `loragate adapters merge --tenant {tenant} {name}` first"
        )
    artifacts = open_merged_store(settings)
    try:
        directory = artifacts.local_dir(copy.key)
        verify_merged_dir(directory)
    except (AdapterError, MergeError) as e:
        message = e.message if isinstance(e, AdapterError) else str(e)
        raise EngineStartError(f"the merged copy of {spec} is not usable: {message}") from e
    logger.info("serving %s (version %s) merged, from %s", spec, record.digest[:12], directory)
    return MergedModel(directory, merged_engine_name(record.digest), record)
