"""Which merged model `loragate engine --merged TENANT/NAME` serves: the adapter's current
version, as the registry records it, merged into this engine's base model (same base revision,
full precision), fetched from the store and checked whole before vLLM is pointed at it.

It is served as `lgm-<digest>` (`server.engines.adapter_slots.merged_engine_name`): gateways
route a version's requests to the engines serving that name. The engine follows the adapter
(`MergedFollower`): once the version it serves is replaced, demoted or deleted it stops serving
it (a stale version never answers, and its memory is given back), and it serves the current
version as soon as that has a merged copy for this base; until then it waits, not listening.
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
    key: str  # the merged copy's key in the store


class NotServableError(Exception):
    """The adapter has nothing this engine can serve merged right now; says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_merged_spec(spec: str) -> tuple[str, str]:
    tenant, sep, name = spec.partition("/")
    if not sep or not tenant or not name or "/" in name:
        raise EngineStartError(f"--merged takes TENANT/NAME, not {spec!r}")
    return tenant, name


class MergedFollower:
    """The merged model an engine serving `spec` (TENANT/NAME) should serve now. Blocking
    (registry reads, fetching a model from the store): call from a thread."""

    def __init__(self, settings: Settings, spec: str) -> None:
        self.tenant, self.name = parse_merged_spec(spec)
        self.spec = spec
        _, self._registry = open_adapter_store(settings)
        self._artifacts = open_merged_store(settings)
        self._revision = base_revision(settings)

    def resolve(self) -> MergedModel:
        """The current version's merged copy, local and verified; NotServableError when the
        adapter is absent, not promoted for this base, or its copy is not whole."""
        record = self._record()
        copy = record.merged_copy(self._revision)
        if copy is None:
            raise NotServableError(
                f"adapter {self.spec} (version {record.digest[:12]}) has no merged copy for the "
                f"base {self._revision}: run `loragate adapters merge --tenant {self.tenant} "
                f"{self.name}`"
            )
        try:
            directory = self._artifacts.local_dir(copy.key)
            verify_merged_dir(directory)
        except (AdapterError, MergeError) as e:
            message = e.message if isinstance(e, AdapterError) else str(e)
            raise NotServableError(
                f"the merged copy of {self.spec} is not usable: {message}"
            ) from e
        logger.info(
            "serving %s (version %s) merged, from %s", self.spec, record.digest[:12], directory
        )
        return MergedModel(directory, merged_engine_name(record.digest), record, copy.key)

    def retired(self, serving: MergedModel) -> str | None:
        """Why `serving` must stop (its version replaced, demoted or deleted), or None while it
        is current. A store that cannot be read now retires nothing: gateways route by the
        record, so an outage never makes a stale version answer."""
        try:
            record = self._registry.get(self.tenant, self.name)
        except AdapterError as e:
            logger.warning("cannot check adapter %s (%s): serving on", self.spec, e.message)
            return None
        old = serving.record.digest[:12]
        if record is None:
            return f"adapter {self.spec} was deleted"
        if record.digest != serving.record.digest:
            return f"adapter {self.spec} was replaced (version {old} by {record.digest[:12]})"
        copy = record.merged_copy(self._revision)
        if copy is None or copy.key != serving.key:
            return f"adapter {self.spec} (version {old}) was demoted"
        return None

    def _record(self) -> AdapterRecord:
        try:
            record = self._registry.get(self.tenant, self.name)
        except AdapterError as e:
            raise NotServableError(f"cannot read adapter {self.spec}: {e.message}") from e
        if record is None:
            raise NotServableError(f"no adapter {self.spec} in the store")
        return record
