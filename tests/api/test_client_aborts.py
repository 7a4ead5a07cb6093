"""A client that hangs up while sending its body is counted as a client abort (499) and logged in
one line: not a 500, not a traceback. Real sockets against a real `loragate serve`."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.support import ADMIN_KEY, TENANT_KEYS
from tests.unit.test_server_limits import Served, served_gateway

DECLARED_LENGTH = 100_000


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with served_gateway(tmp_path_factory.mktemp("aborts")) as served:
        yield served


def send_half_and_hang_up(gateway: Served, head: str, body_start: bytes) -> None:
    """Declare a body of DECLARED_LENGTH bytes, send half of it, close the connection."""
    body = body_start + b"a" * (DECLARED_LENGTH // 2 - len(body_start))
    with gateway.connect() as sock:
        sock.sendall(f"{head}Content-Length: {DECLARED_LENGTH}\r\n\r\n".encode() + body)


def requests_counted(gateway: Served, route: str, status: str) -> float:
    pattern = rf'^loragate_requests_total{{route="{re.escape(route)}",status="{status}"}} (\S+)$'
    found = re.search(pattern, gateway.metrics(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def assert_counted_as_abort(gateway: Served, route: str, method: str) -> None:
    deadline = time.monotonic() + 10
    while requests_counted(gateway, route, "499") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert requests_counted(gateway, route, "499") == 1
    assert 'status="500"' not in gateway.metrics()
    log = gateway.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log
    line = "INFO    server.middleware: client closed the connection while sending the body of "
    assert log.count(f"{line}{method} {route}\n") == 1, log


def test_chat_body_cut_short_is_a_client_abort(gateway: Served) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {TENANT_KEYS['acme']}\r\nContent-Type: application/json\r\n"
    )
    send_half_and_hang_up(gateway, head, b'{"model": "test-model", "messages": [')
    assert_counted_as_abort(gateway, "/v1/chat/completions", "POST")


def test_adapter_upload_cut_short_is_a_client_abort(gateway: Served) -> None:
    boundary = "loragate-test-boundary"
    head = (
        "PUT /admin/v1/tenants/acme/adapters/x HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {ADMIN_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
    )
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="adapter_model"; '
        'filename="adapter_model.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    send_half_and_hang_up(gateway, head, part.encode())
    assert_counted_as_abort(gateway, "/admin/v1/tenants/{tenant}/adapters/{name}", "PUT")
