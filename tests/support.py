"""Helpers shared by the test tiers: test tenants with known keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from server.tenants import hash_api_key

ADMIN_KEY = "sk-test-admin"
TENANT_KEYS = {"acme": "sk-test-acme", "globex": "sk-test-globex", "initech": "sk-test-initech"}


def write_tenants_file(path: Path, limits: dict[str, dict[str, int]] | None = None) -> Path:
    """The test tenants; `limits` maps a tenant to its `limits` block."""
    tenants: dict[str, Any] = {
        name: {"api_key_sha256": [hash_api_key(key)]} for name, key in TENANT_KEYS.items()
    }
    for name, block in (limits or {}).items():
        tenants[name]["limits"] = block
    config = {"admin": {"api_key_sha256": [hash_api_key(ADMIN_KEY)]}, "tenants": tenants}
    path.write_text(yaml.safe_dump(config))
    return path
