"""Helpers shared by the test tiers: test tenants with known keys."""

from __future__ import annotations

from pathlib import Path

import yaml

from server.tenants import hash_api_key

ADMIN_KEY = "sk-test-admin"
TENANT_KEYS = {"acme": "sk-test-acme", "globex": "sk-test-globex", "initech": "sk-test-initech"}


def write_tenants_file(path: Path) -> Path:
    config = {
        "admin": {"api_key_sha256": [hash_api_key(ADMIN_KEY)]},
        "tenants": {
            name: {"api_key_sha256": [hash_api_key(key)]} for name, key in TENANT_KEYS.items()
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path
