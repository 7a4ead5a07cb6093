"""The S3 adapter registry against a real S3 endpoint (moto's server, over HTTP), including two
"replicas" (registry objects with clients of their own) racing on one name."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from adapters.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    AdapterRejectedError,
    AdapterStoreError,
)
from adapters.registry import PutResult
from adapters.s3_registry import S3AdapterRegistry
from adapters.s3_store import s3_client
from adapters.types import AdapterRecord
from server.engines.process import free_loopback_port
from tests.moto_server import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    moto_session,
    new_bucket,
)
from tests.unit.test_adapter_registry import check_merged_copies

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PREFIX = "team"
TTL_S = 0.3


def digest(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def record(
    name: str = "support-bot",
    version: str = "v1",
    tenant: str = "acme",
    created_at: str = "2025-01-01T00:00:00Z",
) -> AdapterRecord:
    return AdapterRecord(
        tenant=tenant,
        name=name,
        digest=digest(version),
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        size_bytes=1234,
        created_at=created_at,
    )


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[boto3.session.Session]:
    with moto_session(tmp_path_factory.mktemp("moto")) as session:
        yield session


@pytest.fixture
def client(session: boto3.session.Session) -> S3Client:
    return s3_client(session)


@pytest.fixture
def bucket(client: S3Client) -> str:
    return new_bucket(client)


def replica(session: boto3.session.Session, bucket: str, **kwargs: Any) -> S3AdapterRegistry:
    """A registry with a client of its own, as another gateway replica would have."""
    kwargs.setdefault("record_ttl_s", TTL_S)
    return S3AdapterRegistry(s3_client(session), bucket, PREFIX, **kwargs)


@pytest.fixture
def registry(session: boto3.session.Session, bucket: str) -> S3AdapterRegistry:
    return replica(session, bucket)


@pytest.fixture
def other(session: boto3.session.Session, bucket: str) -> S3AdapterRegistry:
    return replica(session, bucket)


def keys(client: S3Client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def client_of(registry: S3AdapterRegistry) -> Any:
    return registry._client


def before_first(
    registry: S3AdapterRegistry, method: str, key: str, action: Callable[[], object]
) -> None:
    """Run `action` (another replica's change) just before `registry` next calls `method` on
    `key`: between its read and its conditional write, where a real race would put it."""
    client = client_of(registry)
    real = getattr(client, method)
    pending = [action]

    def wrapped(**kwargs: Any) -> Any:
        if kwargs.get("Key") == key and pending:
            pending.pop()()
        return real(**kwargs)

    setattr(client, method, wrapped)


def record_key(tenant: str = "acme", name: str = "support-bot") -> str:
    return f"{PREFIX}/registry/{tenant}/{name}.json"


def test_new_name_is_created_as_the_records_json(
    registry: S3AdapterRegistry, client: S3Client, bucket: str
) -> None:
    assert registry.put(record(), replace=False) == (PutResult.CREATED, record())
    assert registry.get("acme", "support-bot") == record()
    stored = client.get_object(Bucket=bucket, Key=record_key())["Body"].read()
    assert AdapterRecord.from_json(json.loads(stored)) == record()
    assert keys(client, bucket) == [f"{PREFIX}/registry/.generation", record_key()]


def test_same_content_twice_is_unchanged(registry: S3AdapterRegistry) -> None:
    registry.put(record(created_at="2025-01-01T00:00:00Z"), replace=False)
    again = record(created_at="2025-06-01T00:00:00Z")
    result, kept = registry.put(again, replace=False)
    assert result is PutResult.UNCHANGED and kept.created_at == "2025-01-01T00:00:00Z"
    assert registry.put(again, replace=True) == (PutResult.UNCHANGED, kept)


def test_different_content_is_conflict_without_replace(registry: S3AdapterRegistry) -> None:
    registry.put(record(version="v1"), replace=False)
    with pytest.raises(AdapterConflictError) as info:
        registry.put(record(version="v2"), replace=False)
    assert (info.value.code, info.value.param) == ("adapter_conflict", "name")
    assert registry.get("acme", "support-bot") == record(version="v1")


def test_replace_points_the_name_at_the_new_version(registry: S3AdapterRegistry) -> None:
    registry.put(record(version="v1"), replace=False)
    new = record(version="v2", created_at="2025-06-01T00:00:00Z")
    assert registry.put(new, replace=True) == (PutResult.REPLACED, new)
    assert registry.get("acme", "support-bot") == new


def test_list_is_sorted_by_name_and_holds_only_the_tenants_adapters(
    registry: S3AdapterRegistry,
) -> None:
    for name in ("zeta", "alpha", "mid.v2", "a", "a-b"):  # key order would put a-b before a
        registry.put(record(name=name), replace=False)
    registry.put(record(name="other", tenant="globex"), replace=False)
    registry.put(record(name="x", tenant="acme-two"), replace=False)  # a tenant sharing a prefix
    assert [r.name for r in registry.list("acme")] == ["a", "a-b", "alpha", "mid.v2", "zeta"]
    assert [r.name for r in registry.list("globex")] == ["other"]
    assert registry.list("initech") == []
    assert registry.get("globex", "alpha") is None


def test_delete_returns_the_record_and_missing_is_not_found(
    registry: S3AdapterRegistry, client: S3Client, bucket: str
) -> None:
    registry.put(record(), replace=False)
    assert registry.delete("acme", "support-bot") == record()
    assert registry.get("acme", "support-bot") is None
    assert registry.peek("acme", "support-bot") is None
    with pytest.raises(AdapterNotFoundError) as info:
        registry.delete("acme", "support-bot")
    assert info.value.code == "adapter_not_found"
    with pytest.raises(AdapterNotFoundError):
        registry.delete("initech", "support-bot")
    assert keys(client, bucket) == [f"{PREFIX}/registry/.generation"]


BAD_NAMES = [
    "",
    ".",
    "..",
    "../../etc",
    "a/b",
    "/abs",
    "a\\b",
    "name\n",
    ".hidden",
    "UPPER",
    "аcme",
]


@pytest.mark.parametrize("bad", [*BAD_NAMES, "a" * 64])
def test_invalid_names_are_refused_before_any_request(
    registry: S3AdapterRegistry, client: S3Client, bucket: str, bad: str
) -> None:
    with pytest.raises(AdapterRejectedError) as info:
        registry.put(record(name=bad), replace=True)
    assert (info.value.code, info.value.param) == ("bad_name", "name")
    with pytest.raises(AdapterRejectedError) as info:
        registry.put(record(tenant=bad), replace=True)
    assert (info.value.code, info.value.param) == ("bad_name", "tenant")
    for call in (lambda: registry.delete("acme", bad), lambda: registry.list(bad)):
        with pytest.raises(AdapterRejectedError):
            call()
    assert registry.get("acme", bad) is None and registry.get(bad, "support-bot") is None
    assert registry.peek("acme", bad) is None
    assert keys(client, bucket) == []


def test_malformed_digest_is_refused(registry: S3AdapterRegistry) -> None:
    bad = AdapterRecord(**{**record().__dict__, "digest": "../" + digest("v1")[3:]})
    with pytest.raises(AdapterRejectedError):
        registry.put(bad, replace=False)


def test_per_tenant_cap_is_enforced(session: boto3.session.Session, bucket: str) -> None:
    registry = replica(session, bucket, max_adapters_per_tenant=2)
    registry.put(record(name="a"), replace=False)
    registry.put(record(name="b"), replace=False)
    with pytest.raises(AdapterRejectedError) as info:
        registry.put(record(name="c"), replace=False)
    assert info.value.code == "too_many_adapters"
    assert registry.put(record(name="b", version="v2"), replace=True)[0] is PutResult.REPLACED
    assert registry.put(record(name="c", tenant="globex"), replace=False)[0] is PutResult.CREATED
    registry.delete("acme", "a")
    assert registry.put(record(name="c"), replace=False)[0] is PutResult.CREATED


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"tenant": "acme"}', b"\xff\xfe", b""])
def test_corrupt_records_are_skipped_not_fatal(
    registry: S3AdapterRegistry, client: S3Client, bucket: str, content: bytes
) -> None:
    registry.put(record(name="good"), replace=False)
    client.put_object(Bucket=bucket, Key=record_key(name="broken"), Body=content)
    assert [r.name for r in registry.list("acme")] == ["good"]
    assert registry.get("acme", "broken") is None
    assert registry.referenced_digests() == {digest("v1")}
    with pytest.raises(AdapterNotFoundError):
        registry.delete("acme", "broken")
    # An upload repairs the name.
    assert registry.put(record(name="broken"), replace=False)[0] is PutResult.CREATED


def test_record_that_does_not_match_its_key_is_skipped(
    registry: S3AdapterRegistry, client: S3Client, bucket: str
) -> None:
    registry.put(record(name="good", tenant="globex"), replace=False)
    client.copy_object(
        Bucket=bucket,
        Key=record_key("acme", "stolen"),
        CopySource={"Bucket": bucket, "Key": record_key("globex", "good")},
    )
    assert registry.get("acme", "stolen") is None and registry.list("acme") == []


def test_generation_changes_on_every_change_only(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    seen = [registry.generation()]
    registry.put(record(), replace=False)
    seen.append(registry.generation())
    registry.put(record(), replace=False)  # unchanged: nothing to notice
    assert registry.generation() == seen[-1]
    registry.put(record(version="v2"), replace=True)
    seen.append(registry.generation())
    other.delete("acme", "support-bot")  # another replica's change counts the same
    seen.append(registry.generation())
    assert seen == [0, 1, 2, 3]


def test_referenced_digests_span_all_tenants_and_pages(
    registry: S3AdapterRegistry, client: S3Client, bucket: str
) -> None:
    registry.put(record(name="a", version="v1"), replace=False)
    registry.put(record(name="b", version="v1"), replace=False)
    registry.put(record(name="c", version="v3"), replace=False)
    registry.put(record(name="a", version="v2", tenant="globex"), replace=False)
    pages: list[int] = []

    def small_pages(params: dict[str, Any], **_: Any) -> None:
        params["MaxKeys"] = 2
        pages.append(1)

    client_of(registry).meta.events.register("provide-client-params.s3.ListObjectsV2", small_pages)
    assert registry.referenced_digests() == {digest("v1"), digest("v2"), digest("v3")}
    assert len(pages) >= 3
    registry.delete("globex", "a")
    assert registry.referenced_digests() == {digest("v1"), digest("v3")}


def test_two_replicas_racing_creates_on_one_name_have_one_winner(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    racers = 8
    start = threading.Barrier(racers)

    def put(i: int) -> tuple[str, int]:
        replica = registry if i % 2 else other
        start.wait()
        try:
            return replica.put(record(version=f"v{i}"), replace=False)[0].value, i
        except AdapterConflictError:
            return "conflict", i

    with ThreadPoolExecutor(racers) as pool:
        results = list(pool.map(put, range(racers)))
    outcomes = sorted(outcome for outcome, _ in results)
    assert outcomes == ["conflict"] * (racers - 1) + ["created"]
    (winner,) = [i for outcome, i in results if outcome == "created"]
    assert registry.get("acme", "support-bot") == record(version=f"v{winner}")
    assert other.get("acme", "support-bot") == record(version=f"v{winner}")
    assert registry.generation() == 1


def test_a_create_that_loses_its_race_decides_again(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    before_first(
        registry,
        "put_object",
        record_key(),
        lambda: other.put(record("support-bot", "v3"), replace=False),
    )
    with pytest.raises(AdapterConflictError):
        registry.put(record(version="v2"), replace=False)
    assert registry.get("acme", "support-bot") == record(version="v3")

    before_first(
        registry, "put_object", record_key(name="same"),
        lambda: other.put(record("same", "v4"), replace=False),
    )  # fmt: skip
    result, kept = registry.put(
        record("same", "v4", created_at="2030-01-01T00:00:00Z"), replace=False
    )
    assert result is PutResult.UNCHANGED and kept == record("same", "v4")


def test_a_replace_that_loses_its_race_replaces_the_winner(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    registry.put(record(version="v1"), replace=False)
    before_first(
        registry, "put_object", record_key(), lambda: other.put(record(version="v3"), replace=True)
    )
    assert registry.put(record(version="v2"), replace=True)[0] is PutResult.REPLACED
    assert other.get("acme", "support-bot") == record(version="v2")
    assert registry.generation() == 3


def test_a_delete_racing_a_replace_returns_the_version_it_removed(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    registry.put(record(version="v1"), replace=False)
    before_first(
        registry,
        "delete_object",
        record_key(),
        lambda: other.put(record(version="v2"), replace=True),
    )
    assert registry.delete("acme", "support-bot") == record(version="v2")
    assert other.get("acme", "support-bot") is None


def test_a_name_that_keeps_changing_fails_after_bounded_attempts(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    registry.put(record(version="v0"), replace=False)
    client = client_of(registry)
    real = client.put_object
    versions = iter(range(1, 100))

    def always_beaten(**kwargs: Any) -> Any:
        if kwargs.get("Key") == record_key():
            other.put(record(version=f"w{next(versions)}"), replace=True)
        return real(**kwargs)

    client.put_object = always_beaten
    with pytest.raises(AdapterStoreError, match="kept changing"):
        registry.put(record(version="mine"), replace=True)
    assert other.get("acme", "support-bot") != record(version="mine")


def test_peek_sees_a_delete_through_another_replica_within_the_ttl(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    other.put(record(), replace=False)
    assert registry.peek("acme", "support-bot") is None  # never read here: call get
    assert registry.get("acme", "support-bot") == record()
    assert registry.peek("acme", "support-bot") == record()
    other.delete("acme", "support-bot")
    time.sleep(TTL_S + 0.05)
    assert registry.peek("acme", "support-bot") is None
    assert registry.get("acme", "support-bot") is None


def test_peek_sees_a_replace_through_another_replica_within_the_ttl(
    registry: S3AdapterRegistry, other: S3AdapterRegistry
) -> None:
    registry.put(record(version="v1"), replace=False)
    assert registry.peek("acme", "support-bot") == record(version="v1")  # its own write
    other.put(record(version="v2"), replace=True)
    time.sleep(TTL_S + 0.05)
    assert registry.peek("acme", "support-bot") is None
    assert registry.get("acme", "support-bot") == record(version="v2")


def test_absence_is_not_cached(registry: S3AdapterRegistry, other: S3AdapterRegistry) -> None:
    assert registry.get("acme", "support-bot") is None
    other.put(record(), replace=False)
    assert registry.get("acme", "support-bot") == record()  # servable at once
    assert registry.peek("acme", "support-bot") == record()


def test_conditional_writes_are_checked_and_the_probe_removed(
    registry: S3AdapterRegistry, client: S3Client, bucket: str
) -> None:
    registry.check_conditional_writes()
    assert keys(client, bucket) == []


def strip_headers(registry: S3AdapterRegistry, operation: str) -> None:
    """Make this client's requests reach S3 as from an endpoint that ignores the conditions."""

    def strip(request: Any, **_: Any) -> None:
        for header in ("If-None-Match", "If-Match"):
            if header in request.headers:
                del request.headers[header]

    client_of(registry).meta.events.register(f"before-sign.s3.{operation}", strip)


def test_an_endpoint_ignoring_conditional_writes_is_refused(
    registry: S3AdapterRegistry, client: S3Client, bucket: str
) -> None:
    strip_headers(registry, "PutObject")
    with pytest.raises(AdapterStoreError, match="ignores conditional writes"):
        registry.check_conditional_writes()
    assert keys(client, bucket) == []


def test_an_endpoint_without_conditional_delete_gets_plain_deletes(
    registry: S3AdapterRegistry, client: S3Client, bucket: str
) -> None:
    strip_headers(registry, "DeleteObject")
    registry.check_conditional_writes()
    registry.put(record(), replace=False)
    assert registry.delete("acme", "support-bot") == record()
    assert keys(client, bucket) == [f"{PREFIX}/registry/.generation"]


def test_s3_errors_never_carry_credentials(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_loopback_port()}")
    unreachable = boto3.session.Session().client(
        "s3", config=Config(retries={"max_attempts": 1}, connect_timeout=1)
    )
    registry = S3AdapterRegistry(unreachable, bucket, PREFIX)
    calls: list[Callable[[], object]] = [
        lambda: registry.get("acme", "support-bot"),
        lambda: registry.put(record(), replace=False),
        lambda: registry.delete("acme", "support-bot"),
        registry.referenced_digests,
        registry.generation,
    ]
    for call in calls:
        with pytest.raises(AdapterStoreError) as info:
            call()
        assert info.value.message.endswith(": EndpointConnectionError")
        for secret in (SECRET_ACCESS_KEY, ACCESS_KEY_ID):
            assert secret not in info.value.message


def test_merged_copies_are_recorded_on_the_version_they_were_built_from(
    registry: S3AdapterRegistry,
) -> None:
    check_merged_copies(registry)
