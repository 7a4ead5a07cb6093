"""The public port bounds what a connection may hold before any route (and so authentication)
runs: the request head's size and read time, idle keep-alive, the number of connections.
Real sockets against a real `loragate serve` with the fake engine."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.engines.process import free_loopback_port
from server.settings import ServerSettings, Settings
from tests.support import fake_serve_env

LORAGATE = str(Path(sys.executable).parent / "loragate")
HEADER_TIMEOUT_S = 1.5
KEEP_ALIVE_S = 1
MAX_CONNECTIONS = 24


@dataclass
class Served:
    """A running `loragate serve`: its process, public and metrics ports, and its log."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmRSS")).split()[1])

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text


@contextlib.contextmanager
def served_gateway(tmp_path: Path, **env: str) -> Iterator[Served]:
    """`loragate serve` with the fake engine and `env` on top, ready; stopped with SIGTERM."""
    port, metrics_port = free_loopback_port(), free_loopback_port()
    full_env = fake_serve_env(tmp_path, port=port, metrics_port=metrics_port, **env)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([LORAGATE, "serve"], env=full_env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield Served(proc, port, metrics_port, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One gateway for the module, with short timeouts and a low connection cap to test them."""
    with served_gateway(
        tmp_path_factory.mktemp("limits"),
        LORAGATE_SERVER__HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        LORAGATE_SERVER__KEEP_ALIVE_TIMEOUT_S=str(KEEP_ALIVE_S),
        LORAGATE_SERVER__MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    ) as served:
        yield served


def closed_by_server(sock: socket.socket, within_s: float) -> bytes | None:
    """What the server sent before closing the connection within `within_s`; None if it is
    still open then."""
    sock.settimeout(within_s)
    received = b""
    deadline = time.monotonic() + within_s
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return received
    except TimeoutError:
        return None
    return None


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"closed mid-response: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail(f"closed mid-response: {data!r}")
    return head + b"\r\n\r\n" + body


def send_head(sock: socket.socket, head: bytes) -> None:
    """Send what the server will read; it may refuse and close before the last byte."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(head)


def test_defaults_are_a_production_servers() -> None:
    server = Settings().server
    assert server.max_header_bytes == 64 << 10
    assert server.header_timeout_s == 10
    assert server.send_timeout_s == 30
    assert server.keep_alive_timeout_s == 5
    assert server.max_connections == 2048


def test_limits_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAGATE_SERVER__MAX_HEADER_BYTES", "16384")
    monkeypatch.setenv("LORAGATE_SERVER__HEADER_TIMEOUT_S", "2.5")
    server = Settings().server
    assert (server.max_header_bytes, server.header_timeout_s) == (16384, 2.5)


@pytest.mark.parametrize(
    "field",
    [{"max_header_bytes": 1024}, {"header_timeout_s": 0}, {"send_timeout_s": 0},
     {"max_connections": 0}],
)  # fmt: skip
def test_unbounded_or_unusable_limits_are_refused(field: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ServerSettings.model_validate(field)


def test_oversized_heads_are_refused_without_buffering(gateway: Served) -> None:
    before = gateway.rss_kib()
    socks = [gateway.connect() for _ in range(16)]
    try:
        head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * (1 << 20)
        for sock in socks:
            send_head(sock, head)
        answers = [closed_by_server(sock, within_s=5) for sock in socks]
        grown = gateway.rss_kib() - before
    finally:
        for sock in socks:
            sock.close()
    assert all(a is not None and (a == b"" or a.startswith(b"HTTP/1.1 400")) for a in answers), (
        answers
    )
    # 16 MB of headers were sent; unbounded, the server held all of it (and more).
    assert grown < 4096, f"RSS grew by {grown} KiB"


def test_head_within_the_bound_is_served(gateway: Served) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"a" * 32_000 + b"\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")


def test_connection_that_never_sends_a_request_is_closed(gateway: Served) -> None:
    with gateway.connect() as sock:
        started = time.monotonic()
        assert closed_by_server(sock, within_s=HEADER_TIMEOUT_S + 3) == b""
        assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.2


def test_head_sent_a_byte_at_a_time_is_cut_off(gateway: Served) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Slow: " + b"a" * 100
    with gateway.connect() as sock:
        started = time.monotonic()
        for i in range(len(head)):
            try:
                sock.sendall(head[i : i + 1])
            except (ConnectionResetError, BrokenPipeError):
                break
            time.sleep(0.1)
            if time.monotonic() - started > HEADER_TIMEOUT_S + 3:
                pytest.fail("the server still reads a head sent for longer than its timeout")
        assert closed_by_server(sock, within_s=3) == b""


def test_idle_keep_alive_connection_is_closed(gateway: Served) -> None:
    with gateway.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        # A second request on the same connection is served: keep-alive works...
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        # ...and an idle one is closed after the keep-alive timeout (uvicorn's default: 5 s).
        assert closed_by_server(sock, within_s=KEEP_ALIVE_S + 2.5) == b""


def test_connections_beyond_the_cap_get_503(gateway: Served) -> None:
    held = [gateway.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        with gateway.connect() as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 503")
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the server sees the held connections close a moment later
        response = httpx.get(f"http://127.0.0.1:{gateway.port}/healthz", timeout=5)
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert response.status_code == 200
