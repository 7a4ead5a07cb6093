"""The port picked for an engine that binds it seconds later: outside the kernel's ephemeral
range, where no outgoing connection can take it meanwhile."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from server.engines import process
from server.engines.process import free_loopback_port


def test_the_port_is_free_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = free_loopback_port()
        assert 1024 <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        used = taken.getsockname()[1]
        monkeypatch.setattr(process, "_below_ephemeral_range", lambda: range(used, used + 1))
        assert free_loopback_port() != used  # the only candidate is taken: the kernel picks


def test_without_a_readable_range_the_kernel_picks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(process, "EPHEMERAL_RANGE_FILE", tmp_path / "missing")
    assert 0 < free_loopback_port() < 65536
