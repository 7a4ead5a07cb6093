"""The fuzz tier: schemathesis drives every operation of the gateway's own OpenAPI document
against the app in-process, in front of the fake engine, and checks each response against the
document: no 5xx, documented statuses, content types and headers, bodies that match their
schemas, every error an OpenAI envelope with a string `code`.

Bounded and reproducible: a fixed number of examples per operation, derandomized, no example
database. Run it alone with `.venv/bin/python -m pytest tests/fuzz -q -p no:cacheprovider`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.python import asgi
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi import checks as openapi_checks
from schemathesis.specs.openapi.schemas import OpenApiSchema

from adapters.merged_store import MANIFEST_VERSION, MERGED_MANIFEST
from adapters.types import CONFIG_FILE, FULL_PRECISION, WEIGHTS_FILE
from server.app import create_app
from server.engine_servers.fake_engine import FakeEngineKnobs, create_fake_engine_app
from server.merging import promotion
from server.settings import Settings
from tests.adapter_factory import write_peft_adapter
from tests.api.conftest import MODEL, engine_at, make_settings, serving
from tests.support import ADMIN_KEY, TENANT_KEYS

pytestmark = pytest.mark.fuzz

# Per operation and mode: the whole tier takes about 25 s here.
MAX_EXAMPLES = 100
TENANT, ADAPTER = "acme", "helper"  # what the steered cases aim at (uploaded by the fixture)
WRONG_KEY_EXAMPLES = 5

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 8,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            # Negative cases break the request, not the key: wrong keys have their own test.
            "with-security-parameters": False,
        },
        "auth": {
            "openapi": {
                "tenantKey": {"bearer": TENANT_KEYS["acme"]},
                "adminKey": {"bearer": ADMIN_KEY},
            }
        },
    }
)
BOUNDED = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@schemathesis.check
def errors_are_openai_envelopes(ctx: CheckContext, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx, documented or not (404/405 of probed methods too), is the envelope
    with a non-empty string `code` (HEAD answers have no body to check)."""
    if response.status_code < 400 or case.method == "HEAD":
        return None
    body = json.loads(response.content)
    error = body["error"]
    assert set(body) == {"error"}, body
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str), error
    assert isinstance(error["code"], str) and error["code"], f"no code: {error}"
    assert error["param"] is None or isinstance(error["param"], str), error
    return True


CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.ignored_auth,
    openapi_checks.unsupported_method,
    openapi_checks.allow_header_conformance,
    errors_are_openai_envelopes,
]


@pytest.fixture(scope="module")
def engine_url() -> Iterator[str]:
    with serving(create_fake_engine_app(FakeEngineKnobs(model=MODEL))) as url:
        yield url


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft_adapter(tmp_path_factory.mktemp("adapter"), rank=4)


def stand_in_merge(
    base_dir: Path, adapter_dir: Path, out_dir: Path, *, adapter_digest: str,
    base_revision: str, timeout_s: float,
) -> None:  # fmt: skip
    """What `build_merged` leaves, without the merge: this gateway's base is a config file
    only (tests/e2e/test_merged.py merges for real)."""
    out_dir.mkdir()
    config = (base_dir / "config.json").read_bytes()
    (out_dir / "config.json").write_bytes(config)
    manifest = {
        "version": MANIFEST_VERSION, "adapter_digest": adapter_digest,
        "base_revision": base_revision, "scheme": FULL_PRECISION,
        "files": {"config.json": hashlib.sha256(config).hexdigest()},
    }  # fmt: skip
    (out_dir / MERGED_MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def gateway_schema(
    tmp_path: Path, engine_url: str, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[OpenApiSchema]:
    """A new gateway and its document, loaded from the app itself. schemathesis runs the app's
    lifespan on its own event loop, where every request goes, and ends it after each test; so
    the app is not entered in a TestClient as `running_gateway` does (the engine client must
    live on the loop that serves the requests)."""
    monkeypatch.setattr(promotion, "build_merged", stand_in_merge)
    settings_ = make_settings(
        tmp_path,
        engine={"health_interval_s": 0.2, "max_loras": 2},
        max_loaded_adapters=2,
        adapters={"max_upload_bytes": 8 << 20},
    )
    app = create_app(settings_, engine=engine_at(engine_url))
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
        with asgi.get_client(app) as client:  # an adapter for the steered cases to reach
            files = {
                "adapter_config": (CONFIG_FILE, (adapter_dir / CONFIG_FILE).read_bytes()),
                "adapter_model": (WEIGHTS_FILE, (adapter_dir / WEIGHTS_FILE).read_bytes()),
            }
            url = f"/admin/v1/tenants/{TENANT}/adapters/{ADAPTER}"
            auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
            assert client.put(url, files=files, headers=auth).status_code == 201
        yield schema
    finally:
        asgi.shutdown_lifespans()  # schemathesis's pytest plugin does it too, when it is on


def steered(operation: APIOperation, mode: GenerationMode) -> st.SearchStrategy[schemathesis.Case]:
    """Cases as generated, or (positive ones, half the time) aimed at what exists: the tenant,
    the adapter or another valid name, the base model or the adapter, streamed or not. Random
    names alone would almost never get past 404 to the engine."""

    def aim(drawn: tuple[schemathesis.Case, bool, str, str, bool]) -> schemathesis.Case:
        case, aimed, name, model, stream = drawn
        if aimed and mode is GenerationMode.POSITIVE:
            params = dict(case.path_parameters or {})
            params.update({k: v for k, v in (("tenant", TENANT), ("name", name)) if k in params})
            case.path_parameters = params
            if isinstance(case.body, dict) and "model" in case.body:
                case.body = {**case.body, "model": model, "stream": stream}
        return case

    return st.tuples(
        operation.as_strategy(generation_mode=mode),
        st.booleans(),
        st.sampled_from([ADAPTER, "other-name"]),
        st.sampled_from([MODEL, ADAPTER]),
        st.booleans(),
    ).map(aim)


def _breakable(operation: dict[str, Any]) -> bool:
    """Has an input that a negative case can break (any string is a valid path segment)."""
    params = operation.get("parameters", [])
    return "requestBody" in operation or any(p["in"] != "path" for p in params)


def _document() -> dict[str, Any]:
    # The document does not depend on settings: the defaults, no environment, no lifespan.
    return create_app(Settings.model_construct()).openapi()


DOCUMENT = _document()
OPERATIONS = [(m.upper(), path) for path, item in DOCUMENT["paths"].items() for m in item]
FUZZ_CASES = [
    pytest.param(mode, method, path, id=f"{mode.value}-{method} {path}")
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or _breakable(DOCUMENT["paths"][path][method.lower()])
]
per_operation = pytest.mark.parametrize(
    ("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS]
)


@pytest.mark.parametrize(("mode", "method", "path"), FUZZ_CASES)
def test_operation_conforms_to_the_document(
    gateway_schema: OpenApiSchema, mode: GenerationMode, method: str, path: str
) -> None:
    operation = gateway_schema[path][method]

    @given(case=steered(operation, mode))
    @BOUNDED
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS)

    run()


WRONG_KEYS = {"tenantKey": f"Bearer {ADMIN_KEY}", "adminKey": f"Bearer {TENANT_KEYS['acme']}"}


@per_operation
def test_wrong_keys_are_refused_with_an_envelope(
    gateway_schema: OpenApiSchema, method: str, path: str
) -> None:
    """On every secured operation: the other kind of key is 403, an unknown key 401, both
    with the envelope, whatever the rest of the request is."""
    operation = gateway_schema[path][method]
    schemes = {name for req in operation.definition.raw.get("security", []) for name in req}

    @given(case=operation.as_strategy())
    @settings(BOUNDED, max_examples=WRONG_KEY_EXAMPLES)
    def run(case: schemathesis.Case) -> None:
        for scheme in schemes:
            for authorization, status in ((WRONG_KEYS[scheme], 403), ("Bearer sk-nobody", 401)):
                response = case.call(headers={"Authorization": authorization})
                assert response.status_code == status, (method, path, response.text)
                case.validate_response(response, checks=CHECKS)

    run()
