"""The merged model store, on a directory and in a bucket (moto's server, over HTTP): whole
models only, every fetched byte checked against a manifest that must be the key's own."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest

from adapters.errors import AdapterNotFoundError, AdapterStoreError
from adapters.merged_store import (
    MERGED_MANIFEST,
    LocalMergedArtifacts,
    MergedArtifacts,
    S3MergedArtifacts,
    merge_key,
    open_merged_artifacts,
)
from adapters.s3_store import s3_client
from adapters.store_url import FileLocation, S3Location
from tests.moto_server import moto_session, new_bucket

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

PREFIX = "team/adapters"
DIGEST = "ab" * 32
REVISION = "smollm2@1"
KEY = merge_key(DIGEST, REVISION, "none")
OTHER_KEY = merge_key(DIGEST, "smollm2@2", "none")
FILES = {
    "config.json": b'{"dtype": "float32"}',
    "model.safetensors": os.urandom(300_000),
    "tokenizer.json": b'{"model": {}}',
}


def write_merged(path: Path, files: dict[str, bytes] = FILES, revision: str = REVISION) -> Path:
    """A merged dir the way the worker writes one: the files, then their manifest."""
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    manifest = {
        "version": 1, "adapter_digest": DIGEST, "base_revision": revision, "scheme": "none",
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }  # fmt: skip
    (path / MERGED_MANIFEST).write_text(json.dumps(manifest))
    return path


def contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


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


def s3_keys(client: S3Client, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


@pytest.fixture(params=["local", "s3"])
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> MergedArtifacts:
    if request.param == "local":
        return LocalMergedArtifacts(tmp_path / "store")
    client: S3Client = request.getfixturevalue("client")
    return S3MergedArtifacts(client, request.getfixturevalue("bucket"), PREFIX, tmp_path / "cache")


def test_publish_exists_keys_local_dir_delete_round_trip(
    artifacts: MergedArtifacts, tmp_path: Path
) -> None:
    src = write_merged(tmp_path / "src")
    assert not artifacts.exists(KEY) and artifacts.keys() == set()
    with pytest.raises(AdapterNotFoundError):
        artifacts.local_dir(KEY)

    artifacts.publish(KEY, src)
    artifacts.publish(KEY, src)  # a key already stored: a no-op
    assert artifacts.exists(KEY) and not artifacts.exists(OTHER_KEY)
    assert artifacts.keys() == {KEY}
    local = artifacts.local_dir(KEY)
    assert local != src and contents(local) == contents(src)
    assert artifacts.local_dir(KEY) == local
    assert contents(src) == {**FILES, MERGED_MANIFEST: (src / MERGED_MANIFEST).read_bytes()}

    # Published just now: not among the keys published an hour ago or more.
    assert artifacts.keys(older_than_s=3600) == set() and artifacts.keys(0) == {KEY}
    other = write_merged(tmp_path / "other", revision="smollm2@2")
    artifacts.publish(OTHER_KEY, other)
    assert artifacts.keys() == {KEY, OTHER_KEY}

    artifacts.delete(KEY)
    artifacts.delete(KEY)  # absent is fine
    assert not artifacts.exists(KEY) and artifacts.keys() == {OTHER_KEY}
    assert not local.exists()
    with pytest.raises(AdapterNotFoundError):
        artifacts.local_dir(KEY)
    assert contents(artifacts.local_dir(OTHER_KEY)) == contents(other)


def test_a_dir_is_only_published_under_its_own_key(
    artifacts: MergedArtifacts, tmp_path: Path
) -> None:
    src = write_merged(tmp_path / "src")
    with pytest.raises(AdapterStoreError, match="refusing"):
        artifacts.publish(OTHER_KEY, src)
    assert not artifacts.exists(OTHER_KEY) and artifacts.keys() == set()


def test_a_source_that_does_not_match_its_manifest_is_not_published(
    artifacts: MergedArtifacts, tmp_path: Path
) -> None:
    src = write_merged(tmp_path / "src")
    (src / "model.safetensors").write_bytes(os.urandom(300_000))
    with pytest.raises(AdapterStoreError):
        artifacts.publish(KEY, src)
    assert not artifacts.exists(KEY) and artifacts.keys() == set()


@pytest.mark.parametrize(
    "key", ["", "AB" * 32, "ab" * 31, "../" + "a" * 61, "/" * 64, "g" * 64, "ab" * 32 + "\n"]
)
def test_invalid_keys_raise_value_error(
    artifacts: MergedArtifacts, tmp_path: Path, key: str
) -> None:
    src = write_merged(tmp_path / "src")
    calls: list[Any] = [
        lambda: artifacts.exists(key),
        lambda: artifacts.publish(key, src),
        lambda: artifacts.local_dir(key),
        lambda: artifacts.delete(key),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="64 lowercase hex"):
            call()
    assert artifacts.keys() == set()


# --- on a directory ---------------------------------------------------------------------------


def test_the_local_layout_and_nothing_staged_left(tmp_path: Path) -> None:
    store = LocalMergedArtifacts(tmp_path / "store")
    store.publish(KEY, write_merged(tmp_path / "src"))
    assert store.local_dir(KEY) == tmp_path / "store" / "merged" / KEY
    assert [p.name for p in (tmp_path / "store" / "merged").iterdir()] == [KEY]
    assert oct(store.local_dir(KEY).joinpath("config.json").stat().st_mode & 0o777) == "0o444"


def test_a_local_publish_that_died_is_not_a_model(tmp_path: Path) -> None:
    store = LocalMergedArtifacts(tmp_path / "store")
    half = write_merged(tmp_path / "store" / "merged" / f".publish-{KEY[:12]}-x")
    os.utime(half, (0, 0))  # long abandoned
    assert not store.exists(KEY) and store.keys() == set()
    LocalMergedArtifacts(tmp_path / "store")  # the next start sweeps it
    assert list((tmp_path / "store" / "merged").iterdir()) == []


# --- in a bucket ------------------------------------------------------------------------------


def make_s3(client: S3Client, bucket: str, tmp_path: Path, **kwargs: Any) -> S3MergedArtifacts:
    return S3MergedArtifacts(client, bucket, PREFIX, tmp_path / "cache", **kwargs)


def test_the_bucket_layout(client: S3Client, bucket: str, tmp_path: Path) -> None:
    store = make_s3(client, bucket, tmp_path)
    store.publish(KEY, write_merged(tmp_path / "src"))
    assert s3_keys(client, bucket) == sorted(
        f"{PREFIX}/merged/{KEY}/{name}" for name in [*FILES, MERGED_MANIFEST]
    )
    assert store.local_dir(KEY) == tmp_path / "cache" / "merged" / KEY
    assert [p.name for p in (tmp_path / "cache" / "merged").iterdir()] == [KEY]  # no staging
    store.delete(KEY)
    assert s3_keys(client, bucket) == []


def test_a_publish_interrupted_before_the_manifest_is_not_a_model(
    client: S3Client, bucket: str, tmp_path: Path
) -> None:
    store = make_s3(client, bucket, tmp_path)
    for name, data in FILES.items():  # the files, as a publish that died uploaded them
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/merged/{KEY}/{name}", Body=data)
    assert not store.exists(KEY) and store.keys() == set()
    with pytest.raises(AdapterNotFoundError):
        store.local_dir(KEY)
    store.publish(KEY, write_merged(tmp_path / "src"))  # the next publish completes it
    assert store.exists(KEY)
    assert contents(store.local_dir(KEY)) == contents(tmp_path / "src")
    store.delete(KEY)
    assert s3_keys(client, bucket) == []  # the delete takes the leftovers too


def test_a_tampered_object_is_refused(client: S3Client, bucket: str, tmp_path: Path) -> None:
    store = make_s3(client, bucket, tmp_path)
    store.publish(KEY, write_merged(tmp_path / "src"))
    tampered = bytearray(FILES["model.safetensors"])
    tampered[1000] ^= 0xFF
    client.put_object(
        Bucket=bucket, Key=f"{PREFIX}/merged/{KEY}/model.safetensors", Body=bytes(tampered)
    )
    with pytest.raises(AdapterStoreError, match=r"model\.safetensors .* refusing"):
        store.local_dir(KEY)
    assert list((tmp_path / "cache" / "merged").iterdir()) == []  # nothing published or staged


def put_manifest(client: S3Client, bucket: str, key: str, manifest: dict[str, Any]) -> None:
    body = json.dumps(manifest).encode()
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/merged/{key}/{MERGED_MANIFEST}", Body=body)


def manifest_of(tmp_path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((tmp_path / "src" / MERGED_MANIFEST).read_text())
    return loaded


@pytest.mark.parametrize(
    "files",
    [
        {f"shard-{i}.safetensors": "0" * 64 for i in range(65)},
        {"../escape": "0" * 64},
        {"sub/dir.json": "0" * 64},
        {"..": "0" * 64},
        {".hidden": "0" * 64},
        {"config.json": "not-a-sha"},
        {},
    ],
)
def test_a_manifest_naming_unsafe_files_is_refused(
    client: S3Client, bucket: str, tmp_path: Path, files: dict[str, str]
) -> None:
    store = make_s3(client, bucket, tmp_path)
    store.publish(KEY, write_merged(tmp_path / "src"))
    put_manifest(client, bucket, KEY, {**manifest_of(tmp_path), "files": files})
    with pytest.raises(AdapterStoreError, match="manifest"):
        store.local_dir(KEY)
    assert list((tmp_path / "cache" / "merged").iterdir()) == []


def test_a_manifest_moved_to_another_key_is_refused(
    client: S3Client, bucket: str, tmp_path: Path
) -> None:
    store = make_s3(client, bucket, tmp_path)
    store.publish(KEY, write_merged(tmp_path / "src"))
    for name, data in FILES.items():
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/merged/{OTHER_KEY}/{name}", Body=data)
    put_manifest(client, bucket, OTHER_KEY, manifest_of(tmp_path))
    assert store.exists(OTHER_KEY)  # its manifest is there: a reader must still refuse it
    with pytest.raises(AdapterStoreError, match="refusing"):
        store.local_dir(OTHER_KEY)


def test_a_model_over_max_bytes_is_not_downloaded(
    client: S3Client, bucket: str, tmp_path: Path
) -> None:
    make_s3(client, bucket, tmp_path).publish(KEY, write_merged(tmp_path / "src"))
    small = make_s3(client, bucket, tmp_path, max_bytes=sum(map(len, FILES.values())) - 1)
    with pytest.raises(AdapterStoreError, match="over the"):
        small.local_dir(KEY)
    assert list((tmp_path / "cache" / "merged").iterdir()) == []
    fits = make_s3(client, bucket, tmp_path, max_bytes=sum(map(len, FILES.values())))
    assert contents(fits.local_dir(KEY)) == contents(tmp_path / "src")


def test_a_missing_file_is_incomplete(client: S3Client, bucket: str, tmp_path: Path) -> None:
    store = make_s3(client, bucket, tmp_path)
    store.publish(KEY, write_merged(tmp_path / "src"))
    client.delete_object(Bucket=bucket, Key=f"{PREFIX}/merged/{KEY}/tokenizer.json")
    with pytest.raises(AdapterNotFoundError, match="incomplete"):
        store.local_dir(KEY)


# --- opening by location ----------------------------------------------------------------------


def test_open_merged_artifacts_on_a_directory(tmp_path: Path) -> None:
    store = open_merged_artifacts(FileLocation(tmp_path / "store"), cache_dir=tmp_path / "cache")
    assert isinstance(store, LocalMergedArtifacts)
    store.publish(KEY, write_merged(tmp_path / "src"))
    assert store.local_dir(KEY) == tmp_path / "store" / "merged" / KEY


def test_open_merged_artifacts_on_a_bucket(client: S3Client, bucket: str, tmp_path: Path) -> None:
    store = open_merged_artifacts(S3Location(bucket, PREFIX), cache_dir=tmp_path / "cache")
    assert isinstance(store, S3MergedArtifacts)
    store.publish(KEY, write_merged(tmp_path / "src"))
    assert s3_keys(client, bucket)[0].startswith(f"{PREFIX}/merged/{KEY}/")
