"""A real S3 endpoint for the tests: moto's server on a free loopback port, in its own session,
spoken to over HTTP by a real boto3 client. Only the process this object started is signalled.

moto checks a conditional write's condition and then writes, where S3 does both at once; the
gap is short enough not to matter to the tests' races (of 1,300 eight-way create races run
against moto 5.2.5 while writing them, none let two writers through).
"""

from __future__ import annotations

import contextlib
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
import pytest

from server.engines.process import free_loopback_port
from tests.local_server import LocalServer, LocalServerError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

START_TIMEOUT_S = 20
ACCESS_KEY_ID = "AKIATESTMOTO00000000"
SECRET_ACCESS_KEY = "moto-test-secret-do-not-leak"
REGION = "us-east-1"


class MotoServerError(LocalServerError):
    pass


class MotoServer(LocalServer):
    error = MotoServerError

    def __init__(self, workdir: Path) -> None:
        super().__init__("moto server", workdir / "moto.log")
        self.port = free_loopback_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # The venv's own interpreter: its moto, whatever PATH says.
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._launch(argv, self.answers, START_TIMEOUT_S, poll_s=0.05)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=0.5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False


@contextlib.contextmanager
def moto_session(workdir: Path) -> Iterator[boto3.session.Session]:
    """A moto server, and a boto3 session pointed at it the way an operator would point one:
    through the environment only (set until the end), with the machine's own AWS config kept
    out. Clients made from the session share its loaded service model, so each is cheap."""
    server = MotoServer(workdir)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", server.url)
            env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            env.setenv("AWS_DEFAULT_REGION", REGION)
            env.setenv("AWS_CONFIG_FILE", str(workdir / "no-aws-config"))
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-aws-credentials"))
            for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
                env.delenv(name, raising=False)
            yield boto3.session.Session()
    finally:
        server.stop()


def new_bucket(client: S3Client) -> str:
    """A bucket of its own for one test: no state carries over between tests."""
    name = f"loragate-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    return name
