"""Adapter files are collected once nothing uses them: after a refused upload, a replace, a delete
(once the requests running on the version end), and by the sweep; never while in use."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.store import ORPHAN_GRACE_S, LocalAdapterStore
from adapters.types import CONFIG_FILE, WEIGHTS_FILE
from server.adapter_admin import AdapterAdminService
from server.engine_servers.fake_engine import FakeEngineKnobs
from server.engines.adapter_slots import engine_name
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import Gateway, make_settings, running_gateway
from tests.api.test_adapters_admin import store_blobs, upload
from tests.api.test_errors import assert_envelope
from tests.api.test_openai_routes import chat_body, sse_events

ADAPTERS = "/admin/v1/tenants/{tenant}/adapters/{name}"


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [write_peft_adapter(root / f"a{i}", seed=i) for i in range(2)]


def blob_names(gateway: Gateway) -> set[str]:
    return {p.name for p in store_blobs(gateway)}


def admin_service(gateway: Gateway) -> AdapterAdminService:
    service: AdapterAdminService = gateway.app.state.services.admin
    return service


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_409_leaves_no_new_blob(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    kept = upload(gateway, adapter_dirs[0]).json()["digest"]
    conflict = upload(gateway, adapter_dirs[1])
    assert assert_envelope(conflict, 409)["code"] == "adapter_conflict"
    assert blob_names(gateway) == {kept}


def test_replace_removes_the_old_blob(gateway: Gateway, adapter_dirs: list[Path]) -> None:
    upload(gateway, adapter_dirs[0])
    new = upload(gateway, adapter_dirs[1], replace="true")
    assert new.headers["x-loragate-result"] == "replaced"
    assert blob_names(gateway) == {new.json()["digest"]}


@pytest.mark.parametrize("sharer", [("acme", "twin"), ("globex", "helper")])
def test_replace_keeps_the_old_blob_another_record_shares(
    gateway: Gateway, adapter_dirs: list[Path], sharer: tuple[str, str]
) -> None:
    old = upload(gateway, adapter_dirs[0]).json()["digest"]
    tenant, name = sharer
    assert upload(gateway, adapter_dirs[0], tenant=tenant, name=name).status_code == 201
    new = upload(gateway, adapter_dirs[1], replace="true").json()["digest"]
    assert blob_names(gateway) == {old, new}
    upload(gateway, adapter_dirs[1], tenant=tenant, name=name, replace="true")
    assert blob_names(gateway) == {new}  # its last record replaced: now it goes


def test_deleting_one_of_two_tenants_with_the_same_content_keeps_the_blob(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    digest = upload(gateway, adapter_dirs[0], tenant="acme").json()["digest"]
    assert upload(gateway, adapter_dirs[0], tenant="globex").json()["digest"] == digest
    url = ADAPTERS.format(tenant="acme", name="helper")
    assert gateway.client.delete(url, headers=gateway.admin).status_code == 200
    assert blob_names(gateway) == {digest}
    answer = gateway.client.post(
        "/v1/chat/completions",
        json={**chat_body(), "model": "helper"},
        headers=gateway.headers("globex"),
    )
    assert answer.status_code == 200, answer.text  # globex's adapter still loads from its files
    new = upload(gateway, adapter_dirs[1], tenant="globex", replace="true").json()["digest"]
    assert blob_names(gateway) == {new}  # its last record replaced: now it goes


@pytest.mark.parametrize("change", ["delete", "replace"])
def test_a_version_in_use_keeps_its_files_until_its_stream_ends(
    gateway: Gateway, adapter_dirs: list[Path], change: str
) -> None:
    digest = upload(gateway, adapter_dirs[0]).json()["digest"]
    gateway.knobs.token_interval_s = 0.1  # 8 tokens: the stream runs for most of a second
    streamed: list[httpx.Response] = []
    body = {**chat_body("one two three four five six seven"), "model": "helper", "stream": True}
    stream = threading.Thread(
        target=lambda: streamed.append(
            gateway.client.post("/v1/chat/completions", json=body, headers=gateway.headers())
        )
    )
    stream.start()
    try:
        running = gateway.fake.state.stats.in_flight
        assert wait_until(lambda: running[engine_name(digest)] > 0), "the stream never started"
        if change == "delete":
            url = ADAPTERS.format(tenant="acme", name="helper")
            assert gateway.client.delete(url, headers=gateway.admin).status_code == 200
        else:
            assert upload(gateway, adapter_dirs[1], replace="true").status_code == 201
        assert digest in blob_names(gateway)
        assert running[engine_name(digest)] > 0  # the check above ran while it streamed
    finally:
        stream.join(10)
    assert streamed[0].status_code == 200
    assert sse_events(streamed[0].text)[-1] == "[DONE]"
    assert wait_until(lambda: digest not in blob_names(gateway)), "the files were never collected"


def put_orphan(gateway: Gateway, adapter_dir: Path, digest: str, age_s: float) -> None:
    """A blob no record points at, as a crash or another replica's delete would leave it."""
    store = LocalAdapterStore(gateway.settings.store_path)
    config = (adapter_dir / CONFIG_FILE).read_bytes()
    assert store.put(digest, config, adapter_dir / WEIGHTS_FILE)
    then = time.time() - age_s
    os.utime(store.local_dir(digest), (then, then))


def test_the_sweep_removes_an_old_orphan_and_keeps_a_fresh_one(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    referenced = upload(gateway, adapter_dirs[0]).json()["digest"]
    old, fresh = "0" * 64, "f" * 64
    put_orphan(gateway, adapter_dirs[1], old, age_s=ORPHAN_GRACE_S + 60)
    put_orphan(gateway, adapter_dirs[1], fresh, age_s=ORPHAN_GRACE_S - 60)
    then = time.time() - 10 * ORPHAN_GRACE_S  # referenced: kept, however old
    os.utime(gateway.settings.store_path / "blobs" / referenced, (then, then))
    assert admin_service(gateway).sweep() == 1
    assert blob_names(gateway) == {referenced, fresh}


def test_the_sweeper_sweeps_at_once_when_it_starts(
    gateway: Gateway, adapter_dirs: list[Path]
) -> None:
    orphan = "0" * 64
    put_orphan(gateway, adapter_dirs[1], orphan, age_s=3600)
    portal = gateway.client.portal
    assert portal is not None
    sweeper = portal.start_task_soon(admin_service(gateway).run_sweeps, 3600.0)
    try:
        assert wait_until(lambda: orphan not in blob_names(gateway))
    finally:
        sweeper.cancel()


@pytest.mark.parametrize("change", ["replace", "delete"])
def test_a_request_waiting_for_its_turn_keeps_its_versions_files(
    tmp_path: Path, knobs: FakeEngineKnobs, adapter_dirs: list[Path], change: str
) -> None:
    """A request that resolved a version and waits (here in the engine queue, before it pins
    the adapter) is served by that version even if the adapter is replaced or deleted
    meanwhile: the files go only when it ends (seen in the soak: 404 adapter_not_found)."""
    settings = make_settings(tmp_path, admission={"max_running": 1, "max_queued": 4})
    knobs.ttft_s = 1.0
    with running_gateway(settings, knobs) as gw, ThreadPoolExecutor(2) as pool:
        digest = upload(gw, adapter_dirs[0]).json()["digest"]
        busy = pool.submit(gw.client.post, "/v1/chat/completions", json=chat_body("busy"),
                           headers=gw.headers())  # fmt: skip
        registry = gw.app.state.services.metrics.registry
        assert wait_until(
            lambda: (
                registry.get_sample_value("loragate_engine_requests_running", {"engine": "local"})
                == 1
            )
        )
        body = {**chat_body("waiting"), "model": "helper"}
        waiting = pool.submit(gw.client.post, "/v1/chat/completions", json=body,
                              headers=gw.headers())  # fmt: skip
        assert wait_until(
            lambda: (
                registry.get_sample_value("loragate_engine_queue_depth", {"engine": "local"}) == 1
            )
        ), "the adapter request never queued"
        if change == "delete":
            url = ADAPTERS.format(tenant="acme", name="helper")
            assert gw.client.delete(url, headers=gw.admin).status_code == 200
        else:
            assert upload(gw, adapter_dirs[1], replace="true").status_code == 201
        assert digest in blob_names(gw)  # held by the waiting request
        assert busy.result(timeout=10).status_code == 200
        served = waiting.result(timeout=10)
        assert served.status_code == 200, served.text
        assert wait_until(lambda: digest not in blob_names(gw)), "the files were never collected"


def test_a_record_read_just_before_a_replace_is_not_served_from_collected_files(
    gateway: Gateway, adapter_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read of a record on a worker thread can return the version a replace (and its
    collection) retired a moment later, before the request holds it: the request checks, once
    it holds its version, that it is still the current one, and otherwise resolves again."""
    old = upload(gateway, adapter_dirs[0]).json()["digest"]
    registry = gateway.app.state.services.generation._registry
    stale = registry.get("acme", "helper")
    assert upload(gateway, adapter_dirs[1], replace="true").status_code == 201
    assert old not in blob_names(gateway)  # collected: nothing held it
    real_peek = registry.peek
    reads = {"peek": 0}

    def first_peek_misses(tenant: str, name: str) -> Any:
        reads["peek"] += 1
        return None if reads["peek"] == 1 else real_peek(tenant, name)

    # The interleaving: this request's read returned the record as it was before the replace.
    monkeypatch.setattr(registry, "peek", first_peek_misses)
    monkeypatch.setattr(registry, "get", lambda tenant, name: stale)
    body = {**chat_body("after the replace"), "model": "helper"}
    served = gateway.client.post("/v1/chat/completions", json=body, headers=gateway.headers())
    assert served.status_code == 200, served.text
