"""A real `prometheus` for the tests, on a free loopback port, with its data in a directory of the
test's, in its own session.

It scrapes and evaluates what the given config says (tests/api/test_prometheus_scrape.py: a
gateway's metrics listener every second, deploy/monitoring/rules.yaml). Only the process this
object started is ever signalled.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from server.engines.process import free_loopback_port

START_TIMEOUT_S = 20


class PrometheusServerError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusServerError("prometheus is not installed: run `make prometheus`")
        self._binary = binary
        self._workdir = workdir
        self._config = config
        self.port = free_loopback_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._workdir / "prometheus.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def start(self) -> None:
        config_path = self._workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self._config))
        argv = [
            self._binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self._workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
        ]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self._workdir, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusServerError(
                    f"prometheus exited with {self._proc.returncode}:\n{self.log()}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        raise PrometheusServerError(f"prometheus not ready within {START_TIMEOUT_S} s")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; its `data`, after checking the status."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusServerError(f"{path} {params}: {response.status_code} {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's samples (a vector; a scalar comes back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """`sig` to the server this object started (SIGKILL after 10 s), and wait for it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None
