"""The S3 adapter store against a real S3 endpoint (moto's server, over HTTP), the blob check
the engine side runs on every fetched dir, and the store URL."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from adapters.blob_check import verify_blob_dir
from adapters.errors import AdapterNotFoundError, AdapterRejectedError, AdapterStoreError
from adapters.registry import LocalAdapterRegistry
from adapters.s3_registry import S3AdapterRegistry
from adapters.s3_store import S3AdapterStore, s3_client
from adapters.store import LocalAdapterStore
from adapters.store_url import FileLocation, S3Location, open_store, parse_store_url
from adapters.types import CONFIG_FILE, WEIGHTS_FILE, adapter_digest
from server.engines.process import free_loopback_port
from tests.moto_server import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    moto_session,
    new_bucket,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PREFIX = "team/adapters"
CONFIG = b'{"r": 8, "lora_alpha": 16}'


def blob(weights: bytes) -> tuple[str, bytes]:
    digest = adapter_digest(hashlib.sha256(CONFIG).hexdigest(), hashlib.sha256(weights).hexdigest())
    return digest, weights


DIGEST, WEIGHTS = blob(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + os.urandom(4096))
OTHER, OTHER_WEIGHTS = blob(os.urandom(4096))
THIRD, THIRD_WEIGHTS = blob(os.urandom(4096))


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


def make_store(client: S3Client, bucket: str, cache: Path, **kwargs: Any) -> S3AdapterStore:
    kwargs.setdefault("max_blob_bytes", 1 << 20)
    return S3AdapterStore(client, bucket, PREFIX, cache_dir=cache, **kwargs)


@pytest.fixture
def store(client: S3Client, bucket: str, tmp_path: Path) -> S3AdapterStore:
    return make_store(client, bucket, tmp_path / "cache")


def upload(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "upload" / hashlib.sha256(data).hexdigest()[:12] / WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def keys(client: S3Client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def cached(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def test_put_exists_local_dir_delete_round_trip(
    store: S3AdapterStore, client: S3Client, bucket: str, tmp_path: Path
) -> None:
    assert store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS)) is True
    assert keys(client, bucket) == [
        f"{PREFIX}/blobs/{DIGEST}/{name}" for name in (CONFIG_FILE, WEIGHTS_FILE, "complete")
    ]
    assert store.exists(DIGEST) and store.digests() == {DIGEST}
    local = store.local_dir(DIGEST)
    assert local == tmp_path / "cache" / DIGEST
    assert (local / CONFIG_FILE).read_bytes() == CONFIG
    assert (local / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS)) is False

    store.delete(DIGEST)
    store.delete(DIGEST)  # absent is fine
    assert not store.exists(DIGEST) and store.digests() == set()
    assert keys(client, bucket) == [] and cached(tmp_path) == []
    with pytest.raises(AdapterNotFoundError):
        store.local_dir(DIGEST)


def test_a_put_of_a_stored_digest_restarts_its_age(
    store: S3AdapterStore, client: S3Client, bucket: str, tmp_path: Path
) -> None:
    marker = f"{PREFIX}/blobs/{DIGEST}/complete"
    store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    first = client.head_object(Bucket=bucket, Key=marker)["LastModified"]
    time.sleep(1.2)  # S3 times are to the second
    assert store.digests(older_than_s=1.0) == {DIGEST}
    assert store.digests(older_than_s=60) == set()
    assert store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS)) is False
    assert client.head_object(Bucket=bucket, Key=marker)["LastModified"] > first


def test_a_put_that_dies_between_files_leaves_nothing_visible(
    store: S3AdapterStore,
    client: S3Client,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def die(*_: object, **__: object) -> None:
        raise S3UploadFailedError("connection reset while uploading the weights")

    monkeypatch.setattr(client, "upload_file", die)
    with pytest.raises(AdapterStoreError, match="S3UploadFailedError"):
        store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    assert keys(client, bucket) == [f"{PREFIX}/blobs/{DIGEST}/{CONFIG_FILE}"]  # unmarked
    assert not store.exists(DIGEST) and store.digests() == set()
    with pytest.raises(AdapterNotFoundError):
        store.local_dir(DIGEST)

    monkeypatch.undo()
    assert store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS)) is True
    assert (store.local_dir(DIGEST) / WEIGHTS_FILE).read_bytes() == WEIGHTS


def test_unreadable_weights_become_a_store_error(store: S3AdapterStore, tmp_path: Path) -> None:
    with pytest.raises(AdapterStoreError):
        store.put(DIGEST, CONFIG, tmp_path / "nowhere.safetensors")
    assert not store.exists(DIGEST)


def test_local_dir_refuses_tampered_content(client: S3Client, bucket: str, tmp_path: Path) -> None:
    store = make_store(client, bucket, tmp_path / "cache")
    store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    tampered = bytearray(WEIGHTS)
    tampered[-1] ^= 1
    client.put_object(
        Bucket=bucket, Key=f"{PREFIX}/blobs/{DIGEST}/{WEIGHTS_FILE}", Body=bytes(tampered)
    )
    fresh = make_store(client, bucket, tmp_path / "cache")  # same dir, nothing cached yet
    with pytest.raises(AdapterStoreError, match="refusing"):
        fresh.local_dir(DIGEST)
    assert cached(tmp_path) == []  # the staging dir went too


def test_local_dir_refuses_an_oversized_blob_before_downloading(
    client: S3Client, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store(client, bucket, tmp_path / "cache", max_blob_bytes=len(WEIGHTS))
    store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))  # both files: over by len(CONFIG)
    gets: list[object] = []
    real_get = client.get_object
    monkeypatch.setattr(client, "get_object", lambda **kw: gets.append(kw) or real_get(**kw))
    with pytest.raises(AdapterStoreError, match="over the"):
        store.local_dir(DIGEST)
    assert gets == [] and cached(tmp_path) == []


def test_marker_without_files_is_absent_and_the_next_put_repairs_it(
    store: S3AdapterStore, client: S3Client, bucket: str, tmp_path: Path
) -> None:
    # What a delete on one replica racing a put of the same digest on another can leave.
    store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/blobs/{DIGEST}/{WEIGHTS_FILE}")
    with pytest.raises(AdapterNotFoundError, match="incomplete"):
        store.local_dir(DIGEST)
    assert store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS)) is True
    assert (store.local_dir(DIGEST) / WEIGHTS_FILE).read_bytes() == WEIGHTS


def test_big_weights_go_up_in_parts(client: S3Client, bucket: str, tmp_path: Path) -> None:
    part = 5 << 20  # S3's smallest part
    transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
    store = make_store(
        client, bucket, tmp_path / "cache", max_blob_bytes=4 * part, transfer=transfer
    )
    digest, weights = blob(os.urandom(part + 4096))
    store.put(digest, CONFIG, upload(tmp_path, weights))
    etag = client.head_object(Bucket=bucket, Key=f"{PREFIX}/blobs/{digest}/{WEIGHTS_FILE}")["ETag"]
    assert etag.endswith('-2"')  # a multipart object's ETag counts its parts
    assert (store.local_dir(digest) / WEIGHTS_FILE).read_bytes() == weights


def test_cache_keeps_the_most_recently_used_within_its_bytes(
    client: S3Client, bucket: str, tmp_path: Path
) -> None:
    one_blob = len(CONFIG) + len(WEIGHTS)
    store = make_store(client, bucket, tmp_path / "cache", max_cache_bytes=2 * one_blob + 100)
    for digest, weights in ((DIGEST, WEIGHTS), (OTHER, OTHER_WEIGHTS), (THIRD, THIRD_WEIGHTS)):
        store.put(digest, CONFIG, upload(tmp_path, weights))
    store.local_dir(DIGEST)
    time.sleep(0.01)
    store.local_dir(OTHER)
    time.sleep(0.01)
    store.local_dir(DIGEST)  # a hit: now the most recent
    time.sleep(0.01)
    store.local_dir(THIRD)
    assert cached(tmp_path) == sorted([DIGEST, THIRD])
    assert (store.local_dir(OTHER) / WEIGHTS_FILE).read_bytes() == OTHER_WEIGHTS  # fetched again
    assert cached(tmp_path) == sorted([OTHER, THIRD])


def test_concurrent_fetches_of_one_blob_publish_one_whole_dir(
    store: S3AdapterStore, tmp_path: Path
) -> None:
    store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    with ThreadPoolExecutor(8) as pool:
        dirs = set(pool.map(lambda _: store.local_dir(DIGEST), range(8)))
    assert dirs == {tmp_path / "cache" / DIGEST}
    assert (tmp_path / "cache" / DIGEST / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert cached(tmp_path) == [DIGEST]  # no staging left behind


def test_leftovers_of_a_crashed_fetch_are_swept(
    client: S3Client, bucket: str, tmp_path: Path
) -> None:
    (tmp_path / "cache" / ".evict-abc-123").mkdir(parents=True)
    stale = tmp_path / "cache" / ".fetch-abc-old"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    (tmp_path / "cache" / ".fetch-abc-now").mkdir()  # another process's, under way
    make_store(client, bucket, tmp_path / "cache")
    assert cached(tmp_path) == [".fetch-abc-now"]


@pytest.mark.parametrize("digest", ["", "../" + DIGEST[3:], DIGEST.upper(), DIGEST[:63], "/" * 64])
def test_malformed_digests_never_reach_a_key(
    store: S3AdapterStore, client: S3Client, bucket: str, tmp_path: Path, digest: str
) -> None:
    calls: list[Any] = [
        lambda: store.put(digest, CONFIG, upload(tmp_path, WEIGHTS)),
        lambda: store.local_dir(digest),
        lambda: store.exists(digest),
        lambda: store.delete(digest),
    ]
    for call in calls:
        with pytest.raises(AdapterRejectedError) as info:
            call()
        assert info.value.code == "bad_digest"
    assert keys(client, bucket) == []


def test_s3_errors_never_carry_credentials(
    client: S3Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing_bucket = make_store(client, "no-such-bucket-here", tmp_path / "cache")
    with pytest.raises(AdapterStoreError) as info:
        missing_bucket.digests()
    assert info.value.message == "S3 could not list the adapter store: NoSuchBucket (HTTP 404)"

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_loopback_port()}")
    unreachable = boto3.session.Session().client(
        "s3", config=Config(retries={"max_attempts": 1}, connect_timeout=1)
    )
    store = make_store(unreachable, "loragate", tmp_path / "cache")
    for call in (lambda: store.exists(DIGEST), lambda: store.put(DIGEST, CONFIG, Path("/x"))):
        with pytest.raises(AdapterStoreError) as info:
            call()
        assert "EndpointConnectionError" in info.value.message
        for secret in (SECRET_ACCESS_KEY, ACCESS_KEY_ID):
            assert secret not in info.value.message


# --- the blob check ---------------------------------------------------------------------------


def test_verify_blob_dir_accepts_a_dir_from_either_store(
    store: S3AdapterStore, tmp_path: Path
) -> None:
    store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    verify_blob_dir(store.local_dir(DIGEST), DIGEST)
    local = LocalAdapterStore(tmp_path / "local")
    local.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    verify_blob_dir(local.local_dir(DIGEST), DIGEST)


def test_verify_blob_dir_refuses_other_or_missing_files(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_bytes(CONFIG)
    (tmp_path / WEIGHTS_FILE).write_bytes(OTHER_WEIGHTS)
    with pytest.raises(AdapterStoreError, match="refusing"):
        verify_blob_dir(tmp_path, DIGEST)
    verify_blob_dir(tmp_path, OTHER)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(AdapterStoreError, match="cannot read"):
        verify_blob_dir(tmp_path, OTHER)


# --- the store URL ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("file:///srv/adapters", FileLocation(Path("/srv/adapters"))),
        ("file:///srv/my%20adapters/", FileLocation(Path("/srv/my adapters"))),
        ("s3://loragate", S3Location("loragate", "")),
        ("s3://loragate/", S3Location("loragate", "")),
        ("S3://my.bucket-1/team/Adapters_v2/", S3Location("my.bucket-1", "team/Adapters_v2")),
    ],
)
def test_store_urls_that_parse(url: str, location: object) -> None:
    assert parse_store_url(url) == location


@pytest.mark.parametrize(
    "url",
    [
        "",
        "srv/adapters",
        "/srv/adapters",
        "./adapters",
        "file:relative/path",
        "file:/one/slash",
        "file://relative/path",
        "file://host/srv/adapters",
        "file:///srv/adapters?x=1",
        "file:///srv/a\0b",
        "http://loragate/adapters",
        "https://s3.amazonaws.com/loragate",
        "gs://loragate/adapters",
        "s3:/loragate",
        "s3://",
        "s3://ab",
        "s3://" + "a" * 64,
        "s3://LoraGate",
        "s3://lora_gate",
        "s3://-loragate",
        "s3://loragate-",
        "s3://lora..gate",
        "s3://192.168.1.10",
        "s3://xn--loragate",
        "s3://loragate-s3alias",
        "s3://loragate:9000/adapters",
        "s3://[::1]/adapters",
        "s3://loragate/a/../b",
        "s3://loragate/..",
        "s3://loragate/./a",
        "s3://loragate/a//b",
        "s3://loragate/%2e%2e/b",
        "s3://loragate/a b",
        "s3://loragate/a?versionId=1",
        "s3://loragate/a#frag",
        "s3://loragate/" + "a" * 600,
    ],
)
def test_store_urls_that_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_store_url(url)


def test_a_refused_url_is_not_echoed_with_its_credentials() -> None:
    with pytest.raises(ValueError, match="credentials") as info:
        parse_store_url(f"s3://{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}@loragate/adapters")
    assert SECRET_ACCESS_KEY not in str(info.value) and ACCESS_KEY_ID not in str(info.value)


def test_open_store_on_a_directory_is_todays_layout(tmp_path: Path) -> None:
    store, registry = open_store(
        parse_store_url(f"file://{tmp_path}/store"),
        cache_dir=tmp_path / "cache", max_adapters_per_tenant=10, max_blob_bytes=1 << 20,
        record_ttl_s=1.0,
    )  # fmt: skip
    assert isinstance(store, LocalAdapterStore) and isinstance(registry, LocalAdapterRegistry)
    assert (store.shared, registry.shared) == (False, False)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["blobs", "registry", "tmp"]


def test_open_store_on_a_bucket(client: S3Client, bucket: str, tmp_path: Path) -> None:
    store, registry = open_store(
        parse_store_url(f"s3://{bucket}/{PREFIX}"),
        cache_dir=tmp_path / "cache", max_adapters_per_tenant=10, max_blob_bytes=1 << 20,
        record_ttl_s=1.0,
    )  # fmt: skip
    assert isinstance(store, S3AdapterStore) and isinstance(registry, S3AdapterRegistry)
    assert (store.shared, registry.shared) == (True, True)
    store.put(DIGEST, CONFIG, upload(tmp_path, WEIGHTS))
    assert keys(client, bucket)[0].startswith(f"{PREFIX}/blobs/{DIGEST}/")
    assert not [k for k in keys(client, bucket) if "probe" in k]  # the check cleaned up


def test_open_store_fails_at_once_on_a_missing_bucket(client: S3Client, tmp_path: Path) -> None:
    with pytest.raises(AdapterStoreError, match="reach bucket 'no-such-bucket-here'"):
        open_store(
            S3Location("no-such-bucket-here", ""),
            cache_dir=tmp_path / "cache", max_adapters_per_tenant=10, max_blob_bytes=1 << 20,
            record_ttl_s=1.0,
        )  # fmt: skip
