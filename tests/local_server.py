"""What every server the tests start themselves has in common (redis-server, moto, prometheus):
a process in its own session writing to a log, waited for until it answers, and stopped by the
PID this object holds, never by name."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


class LocalServerError(RuntimeError):
    pass


class LocalServer:
    error: type[LocalServerError] = LocalServerError

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _launch(
        self,
        argv: list[str],
        ready: Callable[[], bool],
        timeout_s: float,
        poll_s: float,
        cwd: Path | None = None,
    ) -> None:
        """Start `argv` and wait until `ready()`; the error names why it never was."""
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=cwd, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._error(f"{self.name} exited with {self._proc.returncode}")
            if ready():
                return
            time.sleep(poll_s)
        self.stop()
        raise self._error(f"{self.name} did not answer within {timeout_s} s")

    def _error(self, message: str) -> LocalServerError:
        return self.error(message)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """`sig` to the server this object started (SIGKILL after 10 s), and wait for it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on `sig`
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
