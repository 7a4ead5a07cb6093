"""Which requests are cached, and what their keys depend on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.cache.policy import CacheDirectives, base_revision, cache_key, is_reproducible
from server.model_prepare import MANIFEST
from server.settings import Settings


def key(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "tenant": "acme",
        "base_revision": "base@1",
        "adapter_version": None,
        "public_model": "base",
        "endpoint": "chat",
        "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": 0},
    }
    args.update(overrides)
    return cache_key(**args)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "n": 1}, True),
        ({"seed": 7, "temperature": 0.9}, True),
        ({"temperature": 0.7}, False),
        ({}, False),  # the engine's default temperature samples
        ({"temperature": 0, "n": 2}, False),
        ({"seed": 7, "n": 3}, False),
    ],
)
def test_only_reproducible_requests_are_cacheable(body: dict[str, Any], expected: bool) -> None:
    assert is_reproducible(body) is expected


def test_key_depends_on_everything_that_can_change_the_output() -> None:
    reference = key()
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    different = [
        key(tenant="globex"),
        key(base_revision="base@2"),
        key(adapter_version="a" * 64 + "@2026-11-23T00:00:00.000001+00:00"),
        key(public_model="other"),
        key(endpoint="completions"),
        key(body={**body, "max_tokens": 5}),
        key(body={**body, "stop": ["x"]}),
        key(body={**body, "messages": [{"role": "user", "content": "hi!"}]}),
    ]
    assert reference not in different
    assert len(set(different)) == len(different)


def test_key_ignores_fields_that_cannot_change_the_output() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    neutral = {**body, "stream": True, "stream_options": {"include_usage": True}, "user": "u1"}
    assert key(body=neutral) == key(body=body)
    # Field order is not part of the request's meaning.
    assert key(body=dict(reversed(body.items()))) == key(body=body)


@pytest.mark.parametrize(
    ("header", "no_cache", "no_store"),
    [
        (None, False, False),
        ("no-cache", True, False),
        ("No-Store", False, True),
        ("max-age=0, no-cache, no-store", True, True),
        ("private", False, False),
    ],
)
def test_cache_control_directives(header: str | None, no_cache: bool, no_store: bool) -> None:
    directives = CacheDirectives.from_header(header)
    assert (directives.no_cache, directives.no_store) == (no_cache, no_store)


def test_base_revision_comes_from_the_model_manifest(tmp_path: Path) -> None:
    settings = Settings(model={"name": "m", "path": tmp_path})
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": "ab" * 32}}))
    first = base_revision(settings)
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {"model.safetensors": "cd" * 32}}))
    assert first.startswith("m@") and base_revision(settings) != first


def test_base_revision_setting_wins_and_its_absence_is_explicit(tmp_path: Path) -> None:
    assert base_revision(Settings(model={"name": "m", "path": tmp_path})) == "m@unversioned"
    pinned = Settings(model={"name": "m", "path": tmp_path, "revision": "r1"})
    assert base_revision(pinned) == "m@r1"
