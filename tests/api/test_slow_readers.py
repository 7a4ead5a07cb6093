"""A streaming client that stays connected but reads nothing loses its connection once the
gateway's writes to it have stalled for `LORAGATE_SERVER__SEND_TIMEOUT_S`, and everything the
request held comes back: its tenant's concurrency slot, its engine turn, the in-flight gauge.
Real sockets against a real `loragate serve` with the fake engine."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from server.model_prepare import DEFAULT_MODEL_NAME
from tests.support import TENANT_KEYS, write_tenants_file
from tests.unit.test_server_limits import Served, served_gateway

SEND_TIMEOUT_S = 1.5
# The fake engine echoes the prompt a word per token: 1,000 words of 8,000 characters make a
# stream of about 8 MB, more than the client's small receive buffer and the gateway's socket
# (up to 4 MB here) and transport buffers hold, so the gateway's writes stall once the client
# stops reading. The words come in parts: one text may hold 1 MiB.
WORDS, WORD_CHARS, PARTS = 1000, 8000, 10


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp_path = tmp_path_factory.mktemp("slow-readers")
    tenants = write_tenants_file(tmp_path / "limited.yaml", {"acme": {"max_concurrent": 1}})
    with served_gateway(
        tmp_path,
        LORAGATE_TENANTS_FILE=str(tenants),
        LORAGATE_SERVER__SEND_TIMEOUT_S=str(SEND_TIMEOUT_S),
        LORAGATE_LIMITS__MAX_BODY_BYTES=str(16 << 20),
        LORAGATE_LIMITS__MAX_TOKENS=str(WORDS),
    ) as served:
        yield served


def stream_request(model: str) -> bytes:
    part = {"type": "text", "text": " ".join("w" * WORD_CHARS for _ in range(WORDS // PARTS))}
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": [part] * PARTS}],
            "max_tokens": WORDS,
            "stream": True,
        }
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {TENANT_KEYS['acme']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def gauge(gateway: Served, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", gateway.metrics(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def second_request_status(gateway: Served) -> int:
    response = httpx.post(
        f"http://127.0.0.1:{gateway.port}/v1/completions",
        headers={"Authorization": f"Bearer {TENANT_KEYS['acme']}"},
        json={"model": DEFAULT_MODEL_NAME, "prompt": "hello", "max_tokens": 4},
        timeout=10,
    )
    return response.status_code


def test_a_client_that_stops_reading_is_cut_off_and_its_slot_freed(gateway: Served) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window (set before connecting) so the gateway's side fills up fast.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    with sock:
        sock.sendall(stream_request(DEFAULT_MODEL_NAME))
        assert sock.recv(64).startswith(b"HTTP/1.1 200"), "the stream did not start"
        # The client reads nothing more. While the gateway's writes are stalled, the stream
        # holds acme's only concurrency slot.
        time.sleep(0.5)
        assert second_request_status(gateway) == 429
        deadline = time.monotonic() + SEND_TIMEOUT_S + 10
        while (status := second_request_status(gateway)) == 429:
            assert time.monotonic() < deadline, "the stalled stream still holds the slot"
            time.sleep(0.2)
        assert status == 200
        assert gauge(gateway, "loragate_engine_requests_running") == 0
        assert gauge(gateway, "loragate_requests_in_flight") == 0
        # The gateway aborted the connection: what its socket still held drains, then the
        # connection ends, the stream cut short.
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(1 << 20):
            received += chunk
        assert b"data: [DONE]" not in received
    log = gateway.log.read_text()
    assert log.count("read nothing for") == 1, log
    assert "Traceback" not in log, log
