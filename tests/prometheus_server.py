"""A real `prometheus` for the tests, on a free loopback port, with its data in a directory of the
test's, in its own session.

It scrapes and evaluates what the given config says (tests/api/test_prometheus_scrape.py: a
gateway's metrics listener every second, deploy/monitoring/rules.yaml). Only the process this
object started is ever signalled.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import yaml

from server.engines.process import free_loopback_port
from tests.local_server import LocalServer, LocalServerError

START_TIMEOUT_S = 20


class PrometheusServerError(LocalServerError):
    pass


class PrometheusServer(LocalServer):
    error = PrometheusServerError

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusServerError("prometheus is not installed: run `make prometheus`")
        super().__init__("prometheus", workdir / "prometheus.log")
        self._binary = binary
        self._workdir = workdir
        self._config = config
        self.port = free_loopback_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
        self._launch(argv, self.ready, START_TIMEOUT_S, poll_s=0.1, cwd=self._workdir)

    def _error(self, message: str) -> PrometheusServerError:
        return PrometheusServerError(f"{message}:\n{self.log()}")

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
