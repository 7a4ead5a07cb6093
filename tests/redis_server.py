"""A real `redis-server` for the tests and the benchmarks, on a free loopback port, with no
persistence, in its own session.

It can be stopped or killed and started again on the same port (Redis going down and coming
back), and paused with SIGSTOP (Redis stalled: connections open, no answers). Only the process
this object started is ever signalled.
"""

from __future__ import annotations

import shutil
import signal
import socket
from pathlib import Path

from server.engines.process import free_loopback_port
from tests.local_server import LocalServer, LocalServerError

START_TIMEOUT_S = 10


class RedisServerError(LocalServerError):
    pass


class RedisServer(LocalServer):
    error = RedisServerError

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError("redis-server is not installed: run `make redis-server`")
        super().__init__("redis-server", workdir / "redis.log")
        self._binary = binary
        self._workdir = workdir
        self.port = free_loopback_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            self._binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._workdir),
        ]  # fmt: skip
        self._launch(argv, self.ping, START_TIMEOUT_S, poll_s=0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One inline command, for test set-up (FLUSHALL, ...)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(" ".join(args).encode() + b"\r\n")
            return s.recv(4096)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def ensure_running(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        else:
            self.resume()
