"""The engine side of adapter loading: a vLLM LoRA resolver plugin that makes every adapter of the
store loadable by digest, with no filesystem shared with the gateway.

vLLM calls a resolver when a request names a LoRA model it does not hold (with runtime LoRA
updating on). Gateways name adapters `lg-<digest>`; this resolver fetches that blob from the store
(`LORAGATE_STORE_URL`: S3, or a file:// directory) into a local cache, checks that its files hash
to the digest, and only then hands vLLM the directory. Anything else it does not know (None: vLLM
answers 404). It is registered through the `vllm.general_plugins` entry point, and only in an
engine process `loragate engine` started (`LORAGATE_STORE_RESOLVER=1`): any other vLLM on the
host is left alone.

Why a resolver and not an agent in front of vLLM: the resolver runs inside vLLM's own server
process, so generation traffic takes no extra hop (a proxy would copy every streamed token once
more), and vLLM already serializes resolutions per name, so concurrent first requests fetch once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.blob_check import verify_blob_dir
from adapters.errors import AdapterError, AdapterNotFoundError
from adapters.store import AdapterStore
from adapters.store_url import open_blob_store, parse_store_url
from server.settings import Settings

logger = logging.getLogger(__name__)

RESOLVER_ENV = "LORAGATE_STORE_RESOLVER"
RESOLVER_NAME = "loragate store"
ENGINE_ADAPTER = re.compile(r"lg-([0-9a-f]{64})")


def open_engine_store(settings: Settings) -> AdapterStore:
    """The store the settings name, for reading blobs only."""
    return open_blob_store(
        parse_store_url(settings.store_location),
        cache_dir=settings.cache_dir / "engine-adapters",
        max_blob_bytes=settings.adapters.max_upload_bytes,
    )


class StoreAdapterFetcher:
    """Fetches and verifies an adapter version by digest; a digest verified once, from a dir
    that has not changed since, is not hashed again. The store is opened on first use: vLLM
    registers plugins in its worker processes too, which never resolve anything."""

    def __init__(self, open_store: Callable[[], AdapterStore]) -> None:
        self._open_store = open_store
        self._store: AdapterStore | None = None
        self._verified: dict[str, tuple[str, int]] = {}

    def fetch(self, digest: str) -> Path | None:
        """The verified local dir of `digest`, or None when the store has no such version.
        Blocking: run it on a thread. Raises AdapterError when the files do not verify."""
        if self._store is None:
            self._store = self._open_store()
        try:
            path = self._store.local_dir(digest)
        except AdapterNotFoundError:
            return None
        stamp = (str(path), os.stat(path / "adapter_model.safetensors").st_mtime_ns)
        if self._verified.get(digest) != stamp:
            verify_blob_dir(path, digest)
            self._verified[digest] = stamp
        return path


def _make_resolver(fetcher: StoreAdapterFetcher) -> Any:
    # vLLM imported here: this module is also imported (to test the fetcher) where it is absent.
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class StoreResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            match = ENGINE_ADAPTER.fullmatch(lora_name)
            if match is None:
                return None
            digest = match.group(1)
            try:
                path = await asyncio.to_thread(fetcher.fetch, digest)
            except AdapterError as e:
                logger.error("adapter %s refused: %s", digest[:12], e.message)
                return None
            if path is None:
                logger.warning("adapter %s is not in the store", digest[:12])
                return None
            logger.info("adapter %s fetched and verified", digest[:12])
            # vLLM sets the int id itself; it must be positive here.
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    return StoreResolver()


def register() -> None:
    """The `vllm.general_plugins` entry point; vLLM calls it in each of its processes."""
    if os.environ.get(RESOLVER_ENV) != "1":
        return
    from vllm.lora.resolver import LoRAResolverRegistry

    settings = Settings()
    fetcher = StoreAdapterFetcher(lambda: open_engine_store(settings))
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _make_resolver(fetcher))
    logger.info("loragate store resolver registered")
