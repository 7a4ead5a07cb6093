"""`loragate adapters` against an in-memory admin API that implements the documented contract."""

from __future__ import annotations

import hashlib
import json
import re
import socket
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.filesize import decimal
from typer.testing import CliRunner, Result

from server import cli_adapters
from server.cli_adapters import adapters_app
from tests.support import ADMIN_KEY

CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
# Bigger than httpx's 64 KiB multipart chunk, and holding bytes that look like multipart framing.
WEIGHTS = b"\r\n--not-the-boundary\r\n\r\n" + bytes(range(256)) * 1024
SIZE = len(json.dumps(CONFIG)) + len(WEIGHTS)


def error(status: int, message: str, code: str | None = None) -> httpx.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
    body["error"]["code"] = code
    return httpx.Response(status, json=body)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    """field name -> (filename, bytes); enough of RFC 7578 for what httpx sends."""
    boundary = content_type.split("boundary=")[1].encode()
    fields = {}
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = head.decode()
        name = re.search(r'; name="([^"]*)"', disposition)
        filename = re.search(r'; filename="([^"]*)"', disposition)
        assert name and filename, disposition
        fields[name[1]] = (filename[1], data.removesuffix(b"\r\n"))
    return fields


class StreamingMockTransport(httpx.MockTransport):
    """MockTransport, minus its `request.read()`: the handler sees the body as a socket would."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.handler(request)
        assert isinstance(response, httpx.Response)
        return response


class FakeAdminAPI:
    """The admin API's contract in memory, recording what the CLI sent."""

    def __init__(self) -> None:
        self.tenants = {"acme"}
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.uploads: list[dict[str, tuple[str, bytes]]] = []
        self.chunk_sizes: list[int] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {ADMIN_KEY}":
            return error(401, "invalid admin API key", "invalid_api_key")
        parts = request.url.path.split("/")  # "", admin, v1, tenants, T, adapters[, N]
        assert parts[:4] == ["", "admin", "v1", "tenants"] and parts[5] == "adapters", parts
        tenant, name = parts[4], (parts[6] if len(parts) > 6 else None)
        if tenant not in self.tenants:
            return error(404, f"no tenant {tenant}", "tenant_not_found")
        if name is None:
            listed = [r for (t, _), r in sorted(self.records.items()) if t == tenant]
            return httpx.Response(200, json={"object": "list", "data": listed})
        if request.method == "PUT":
            return self.put(request, tenant, name)
        if (tenant, name) not in self.records:
            return error(404, f"no adapter {name}", "adapter_not_found")
        if len(parts) > 7 and parts[7] == "merge":
            return self.merge(request, tenant, name)
        if request.method == "DELETE":
            return httpx.Response(200, json=self.records.pop((tenant, name)))
        return httpx.Response(200, json=self.records[(tenant, name)])

    def merge(self, request: httpx.Request, tenant: str, name: str) -> httpx.Response:
        record = self.records[(tenant, name)]
        if request.method == "POST":
            key = hashlib.sha256(record["digest"].encode()).hexdigest()
            record["merged"] = [{"key": key, "base_revision": "base@1", "scheme": "none"}]
        else:
            assert request.method == "DELETE"
            record["merged"] = []
        return httpx.Response(200, json=record)

    def put(self, request: httpx.Request, tenant: str, name: str) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        chunks = list(request.stream)
        self.chunk_sizes += [len(c) for c in chunks]
        body = b"".join(chunks)
        assert int(request.headers["content-length"]) == len(body)
        files = parse_multipart(request.headers["content-type"], body)
        self.uploads.append(files)
        config, weights = files["adapter_config"][1], files["adapter_model"][1]
        digest = hashlib.sha256(config + b"\0" + weights).hexdigest()
        old = self.records.get((tenant, name))
        if old is not None and old["digest"] == digest:
            return httpx.Response(200, json=old, headers={"x-loragate-result": "unchanged"})
        replace = request.url.params.get("replace") == "true"
        if old is not None and not replace:
            return error(409, f"{name} holds different content", "adapter_conflict")
        parsed = json.loads(config)
        self.records[(tenant, name)] = record = {
            "tenant": tenant,
            "name": name,
            "digest": digest,
            "rank": parsed["r"],
            "alpha": parsed["lora_alpha"],
            "target_modules": parsed["target_modules"],
            "size_bytes": len(config) + len(weights),
            "created_at": "2025-03-04T05:06:07+00:00",
        }
        result = "replaced" if old is not None else "created"
        return httpx.Response(201, json=record, headers={"x-loragate-result": result})


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeAdminAPI:
    fake = FakeAdminAPI()
    # The real make_client (base URL, auth header, timeouts), with the fake behind it.
    real = cli_adapters.make_client
    monkeypatch.setattr(
        cli_adapters, "make_client", partial(real, transport=StreamingMockTransport(fake))
    )
    return fake


def write_adapter(directory: Path, weights: bytes = WEIGHTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(CONFIG))
    (directory / "adapter_model.safetensors").write_bytes(weights)
    return directory


def run(*args: str, key: str = ADMIN_KEY, stdin: str | None = None) -> Result:
    """Invoke the CLI; every run also checks the key never shows and nothing crashed."""
    env = {
        "LORAGATE_ADMIN_KEY": key,
        "LORAGATE_ADMIN_URL": "http://loragate.test",
        "COLUMNS": "200",
    }
    result = CliRunner().invoke(adapters_app, list(args), env=env, input=stdin)
    assert key not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def push(directory: Path, *extra: str, name: str = "bot") -> Result:
    return run("push", str(directory), "--tenant", "acme", "--name", name, *extra)


def test_push_creates_then_same_content_is_unchanged(api: FakeAdminAPI, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a")
    first = push(adapter)
    assert first.exit_code == 0, first.output
    assert "created acme/bot" in first.output and "q_proj, v_proj" in first.output
    again = push(adapter)
    assert again.exit_code == 0 and "unchanged acme/bot" in again.output
    assert len(api.records) == 1


def test_push_sends_both_files_intact_under_their_field_names(
    api: FakeAdminAPI, tmp_path: Path
) -> None:
    push(write_adapter(tmp_path / "a"))
    (upload,) = api.uploads
    assert upload == {
        "adapter_config": ("adapter_config.json", json.dumps(CONFIG).encode()),
        "adapter_model": ("adapter_model.safetensors", WEIGHTS),
    }
    assert api.requests[0].method == "PUT"
    assert api.requests[0].url.path == "/admin/v1/tenants/acme/adapters/bot"


def test_push_streams_the_body_in_chunks(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"))
    # Several chunks, none bigger than httpx's read size: the file was never read whole.
    assert len(api.chunk_sizes) > 3 and max(api.chunk_sizes) <= 64 * 1024


def test_conflicting_push_hints_replace_and_exits_1(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"))
    result = push(write_adapter(tmp_path / "b", weights=b"other weights"))
    assert result.exit_code == 1
    assert "error (409): bot holds different content" in result.output
    assert "code: adapter_conflict" in result.output and "--replace" in result.output
    assert "Traceback" not in result.output


def test_push_with_replace_replaces(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"))
    result = push(write_adapter(tmp_path / "b", weights=b"other weights"), "--replace")
    assert result.exit_code == 0 and "replaced acme/bot" in result.output
    assert api.requests[-1].url.params["replace"] == "true"
    assert api.records[("acme", "bot")]["size_bytes"] == len(json.dumps(CONFIG)) + 13


def test_missing_weights_are_refused_before_any_request(api: FakeAdminAPI, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()
    result = push(adapter)
    assert result.exit_code == 2 and "has no adapter_model.safetensors" in result.output
    assert api.requests == []


def test_missing_config_is_refused_before_any_request(api: FakeAdminAPI, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a")
    (adapter / "adapter_config.json").unlink()
    result = push(adapter)
    assert result.exit_code == 2 and "has no adapter_config.json" in result.output
    assert api.requests == []


def test_pickled_weights_are_refused_with_how_to_convert(api: FakeAdminAPI, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    result = push(adapter)
    assert result.exit_code == 2
    assert "adapter_model.bin" in result.output and "only accepts safetensors" in result.output
    assert "safe_serialization=True" in result.output
    assert api.requests == []


def test_stray_pickle_beside_safetensors_is_not_sent(api: FakeAdminAPI, tmp_path: Path) -> None:
    # Trainer checkpoints hold training_args.bin; only the two adapter files are uploaded.
    adapter = write_adapter(tmp_path / "a")
    (adapter / "training_args.bin").write_bytes(b"\x80\x04pickle")
    assert push(adapter).exit_code == 0
    assert set(api.uploads[0]) == {"adapter_config", "adapter_model"}


def test_list_renders_a_row_per_adapter(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"), name="alpha")
    push(write_adapter(tmp_path / "b", weights=b"w"), name="beta")
    result = run("list", "--tenant", "acme")
    assert result.exit_code == 0, result.output
    for record in api.records.values():
        assert re.search(rf"{record['name']}\s+│\s+{record['digest'][:12]}\s", result.output)
    assert record["digest"] not in result.output  # digests are shortened to 12
    assert decimal(SIZE) in result.output and "2025-03-04 05:06 UTC" in result.output


def test_list_of_a_tenant_without_adapters_says_so(api: FakeAdminAPI) -> None:
    result = run("list", "--tenant", "acme")
    assert result.exit_code == 0 and "tenant acme has no adapters" in result.output


def test_show_renders_every_field(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"))
    result = run("show", "--tenant", "acme", "bot")
    assert result.exit_code == 0, result.output
    record = api.records[("acme", "bot")]
    for key in record:
        assert key in result.output
    assert record["digest"] in result.output and f"{SIZE:,} bytes" in result.output


def test_show_of_an_absent_adapter_is_a_404_message(api: FakeAdminAPI) -> None:
    result = run("show", "--tenant", "acme", "ghost")
    assert result.exit_code == 1
    assert "error (404): no adapter ghost (code: adapter_not_found)" in result.output


def test_unknown_tenant_is_a_404_message(api: FakeAdminAPI) -> None:
    result = run("list", "--tenant", "initech")
    assert result.exit_code == 1 and "error (404): no tenant initech" in result.output


def test_rm_with_yes_deletes(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"))
    result = run("rm", "--tenant", "acme", "bot", "--yes")
    assert result.exit_code == 0 and "deleted acme/bot" in result.output
    assert api.records == {}


def test_rm_without_yes_asks_and_a_no_deletes_nothing(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"))
    result = run("rm", "--tenant", "acme", "bot", stdin="n\n")
    assert result.exit_code == 1 and "delete adapter bot of tenant acme?" in result.output
    assert [r.method for r in api.requests] == ["PUT"]


def test_rm_without_yes_deletes_after_a_yes(api: FakeAdminAPI, tmp_path: Path) -> None:
    push(write_adapter(tmp_path / "a"))
    result = run("rm", "--tenant", "acme", "bot", stdin="y\n")
    assert result.exit_code == 0 and "deleted acme/bot" in result.output


def test_wrong_key_is_a_readable_401(api: FakeAdminAPI, tmp_path: Path) -> None:
    result = run("push", str(write_adapter(tmp_path / "a")), "-t", "acme", "-n", "bot", key="nope")
    assert result.exit_code == 1
    assert "error (401): invalid admin API key" in result.output
    assert "LORAGATE_ADMIN_KEY" in result.output and "Traceback" not in result.output


def test_admin_key_never_appears_in_output(api: FakeAdminAPI, tmp_path: Path) -> None:
    secret = "sk-very-secret-admin-key"
    outputs = [
        run("list", "--tenant", "acme", key=secret).output,  # refused: 401
        run("list", "--tenant", "acme", "--admin-key", secret, key=secret).output,
        run("push", "--help", key=secret).output,
        run("list", "--tenant", "acme", key=secret + "\n\x7f").output,  # unsendable header
    ]
    assert all(secret not in output for output in outputs)
    assert "holds characters an HTTP header cannot carry" in outputs[3]


def test_unreachable_server_is_a_readable_message(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = run("list", "--tenant", "acme", "--url", url)
    assert result.exit_code == 1
    assert f"cannot reach loragate at {url}" in result.output
    assert "Traceback" not in result.output


def test_non_envelope_error_still_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>upstream down</html>")

    real = cli_adapters.make_client
    transport = httpx.MockTransport(proxy)
    monkeypatch.setattr(cli_adapters, "make_client", partial(real, transport=transport))
    result = run("list", "--tenant", "acme")
    assert result.exit_code == 1
    assert "error (502): Bad Gateway: <html>upstream down</html>" in result.output


def test_merge_promotes_and_says_how_to_serve_it_and_demote_undoes_it(
    api: FakeAdminAPI, tmp_path: Path
) -> None:
    push(write_adapter(tmp_path / "a"))
    result = run("merge", "--tenant", "acme", "bot")
    assert result.exit_code == 0, result.output
    key = api.records[("acme", "bot")]["merged"][0]["key"]
    assert f"merged acme/bot: {key[:12]}" in result.output
    assert "loragate engine --merged acme/bot" in result.output
    assert api.requests[-1].method == "POST"
    assert api.requests[-1].url.path == "/admin/v1/tenants/acme/adapters/bot/merge"

    result = run("demote", "--tenant", "acme", "bot")
    assert result.exit_code == 0 and "demoted acme/bot" in result.output
    assert api.records[("acme", "bot")]["merged"] == []


def test_merge_of_an_absent_adapter_is_a_404_message(api: FakeAdminAPI) -> None:
    result = run("merge", "--tenant", "acme", "nope")
    assert result.exit_code == 1 and "no adapter nope" in result.output
