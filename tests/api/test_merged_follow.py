"""`loragate engine --merged` follows its adapter (the fake engine as a real subprocess, a file
store): it waits, not listening, until the adapter's version has a merged copy; serves it as
`lgm-<digest>`; stops serving it once the version is replaced, demoted or deleted; and serves
the new version as soon as that one is promoted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest

from adapters.merged_store import MERGED_MANIFEST, MergedArtifacts, merge_key
from adapters.registry import AdapterRegistry
from adapters.types import FULL_PRECISION, AdapterRecord, MergedCopy
from server.adapter_setup import open_adapter_store, open_merged_store
from server.cache.policy import base_revision
from server.engine_servers.engine_command import Following, engine_argv, supervise
from server.engine_servers.merged_model import MergedFollower
from server.engines.adapter_slots import merged_engine_name
from server.engines.process import EngineProcess, free_loopback_port
from server.settings import Settings
from tests.api.conftest import make_settings
from tests.support import ENGINE_KEY

POLL_S = 0.2
FIRST, SECOND = "1" * 64, "2" * 64


@dataclass
class Follow:
    settings: Settings
    registry: AdapterRegistry
    artifacts: MergedArtifacts
    url: str
    task: asyncio.Task[int]

    def register(self, digest: str, *, promoted: bool) -> AdapterRecord:
        """Make `digest` acme/hot's current version, with a stored merged copy if `promoted`."""
        record = AdapterRecord(
            "acme", "hot", digest, 8, 16.0, ("q_proj",), 1, "2026-12-04T00:00:00Z"
        )
        self.registry.put(record, replace=True)
        return self.promote(record) if promoted else record

    def promote(self, record: AdapterRecord) -> AdapterRecord:
        revision = base_revision(self.settings)
        key = merge_key(record.digest, revision, FULL_PRECISION)
        if not self.artifacts.exists(key):
            with tempfile.TemporaryDirectory() as scratch:
                self.artifacts.publish(key, write_merged(Path(scratch) / key, record, revision))
        copy = MergedCopy(key, revision, FULL_PRECISION)
        return self.registry.set_merged("acme", "hot", record.digest, (copy,))

    async def served(self) -> str | None:
        """The model the engine serves, or None while nothing listens."""
        async with httpx.AsyncClient(timeout=2) as client:
            try:
                response = await client.get(
                    f"{self.url}/v1/models", headers={"Authorization": f"Bearer {ENGINE_KEY}"}
                )
            except httpx.TransportError:
                return None
        assert response.status_code == 200, response.text
        [model] = response.json()["data"]
        return str(model["id"])

    async def wait_for(self, expected: str | None, timeout_s: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (seen := await self.served()) != expected:
            assert not self.task.done(), self.task
            assert asyncio.get_running_loop().time() < deadline, (seen, expected)
            await asyncio.sleep(0.1)


def write_merged(path: Path, record: AdapterRecord, revision: str) -> Path:
    """A merged dir as the merge worker writes one (the fake engine never reads the weights)."""
    path.mkdir(parents=True)
    files = {"config.json": b"{}", "model.safetensors": record.digest.encode()}
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {
        "version": 1, "adapter_digest": record.digest, "base_revision": revision,
        "scheme": FULL_PRECISION,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }  # fmt: skip
    (path / MERGED_MANIFEST).write_text(json.dumps(manifest))
    return path


@pytest.fixture
async def follow(tmp_path: Path) -> AsyncIterator[Follow]:
    settings = make_settings(
        tmp_path,
        store_url=(tmp_path / "store").as_uri(),
        engine={"kind": "fake", "merged_poll_s": POLL_S, "api_key": ENGINE_KEY},
    )
    _, registry = open_adapter_store(settings)
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    following = Following(
        MergedFollower(settings, "acme/hot"),
        lambda model: engine_argv(settings, "127.0.0.1", port, model),
    )
    process = EngineProcess(engine_argv(settings, "127.0.0.1", port), None, api_key=ENGINE_KEY)
    stop = asyncio.Event()
    task = asyncio.create_task(supervise(process, settings, url, following, stop))
    try:
        yield Follow(settings, registry, open_merged_store(settings), url, task)
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
    assert process.returncode() is not None  # its engine stopped with it


async def test_it_waits_for_a_merged_copy_then_serves_the_current_version(
    follow: Follow,
) -> None:
    await asyncio.sleep(3 * POLL_S)
    assert await follow.served() is None  # no adapter yet: nothing listens
    record = follow.register(FIRST, promoted=False)
    await asyncio.sleep(3 * POLL_S)
    assert await follow.served() is None  # not promoted: still waiting
    follow.promote(record)
    await follow.wait_for(merged_engine_name(FIRST))


async def test_a_replaced_version_stops_being_served_and_the_new_one_serves_once_promoted(
    follow: Follow,
) -> None:
    follow.register(FIRST, promoted=True)
    await follow.wait_for(merged_engine_name(FIRST))
    second = follow.register(SECOND, promoted=False)
    await follow.wait_for(None)  # the old version retired within a poll
    follow.promote(second)
    await follow.wait_for(merged_engine_name(SECOND))


async def test_a_demoted_or_deleted_adapter_stops_being_served(follow: Follow) -> None:
    record = follow.register(FIRST, promoted=True)
    await follow.wait_for(merged_engine_name(FIRST))
    follow.registry.set_merged("acme", "hot", FIRST, ())
    await follow.wait_for(None)
    follow.promote(replace(record, merged=()))
    await follow.wait_for(merged_engine_name(FIRST))  # promoted again: served again
    follow.registry.delete("acme", "hot")
    await follow.wait_for(None)
    await asyncio.sleep(3 * POLL_S)
    assert await follow.served() is None
