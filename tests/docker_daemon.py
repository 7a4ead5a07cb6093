"""A Docker daemon of the tests' own (Debian's `docker.io`), and a base image made with
`debootstrap`, for building and running the images in deploy/docker where no registry is
reachable.

The daemon runs as `dockerd --bridge=none --iptables=false` with its data, state and socket
under one directory, so it touches no other daemon's images or containers; builds and containers
use the host's network. It is stopped by the PID this object holds, never by name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.local_server import LocalServer, LocalServerError

START_TIMEOUT_S = 60
DEBIAN_MIRROR = os.environ.get("LORAGATE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Stands in for python:3.11-slim-bookworm: bookworm's python3 is 3.11, as the images need.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# The host's trust store goes into the base: pip inside the build reaches the package index
# through the same network, and so needs the same CAs.
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class DockerError(LocalServerError):
    pass


def missing_tools() -> list[str]:
    """What the image tests need and this machine lacks (`make docker` installs it)."""
    tools = ("dockerd", "docker", "debootstrap")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (dockerd and debootstrap need it)")
    return missing


class DockerDaemon(LocalServer):
    error = DockerError

    def __init__(self, workdir: Path) -> None:
        super().__init__("dockerd", workdir / "dockerd.log")
        self._workdir = workdir
        self.socket = workdir / "docker.sock"

    @property
    def env(self) -> dict[str, str]:
        """The environment a `docker` command needs to talk to this daemon."""
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}"}

    def start(self) -> None:
        argv = [
            "dockerd",
            "--bridge=none", "--iptables=false", "--ip6tables=false",
            "--data-root", str(self._workdir / "data"),
            "--exec-root", str(self._workdir / "exec"),
            "--pidfile", str(self._workdir / "dockerd.pid"),
            "--host", f"unix://{self.socket}",
        ]  # fmt: skip
        self._launch(argv, self._answers, START_TIMEOUT_S, poll_s=0.5)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the daemon, then undo the mounts it leaves behind under its directory (it
        bind-mounts its network namespace and does not unmount it on exit), so the directory
        can be removed."""
        super().stop(sig)
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        mine = [m for m in mounts if Path(m).is_relative_to(self._workdir)]
        for mount in sorted(mine, key=len, reverse=True):  # the deepest first
            subprocess.run(["umount", mount], check=False, capture_output=True)

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        return self.docker("version", check=False, timeout=10).returncode == 0

    def docker(
        self, *args: str, check: bool = True, timeout: float = 60, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker ARGS` against this daemon; a failure names the command and its output."""
        proc = subprocess.run(
            ["docker", *args], env=self.env, capture_output=True, timeout=timeout,
            input=input.decode() if input is not None else None, text=True,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise DockerError(f"docker {' '.join(args)}: {proc.returncode}\n{proc.stderr[-4000:]}")
        return proc

    def import_base_image(self, tag: str, cache_dir: Path) -> None:
        """Import a bookworm root with python3 as `tag`, made by debootstrap once and kept as a
        tarball in `cache_dir` (a minute to make, seconds to import)."""
        tarball = base_image_tarball(cache_dir)
        with tarball.open("rb") as f:
            proc = subprocess.run(
                ["docker", "import", "-", tag], env=self.env, stdin=f, capture_output=True,
                text=True, timeout=300,
            )  # fmt: skip
        if proc.returncode != 0:
            raise DockerError(f"docker import: {proc.returncode}\n{proc.stderr[-4000:]}")


def base_image_tarball(cache_dir: Path) -> Path:
    """The base root as a tarball, made with debootstrap unless `cache_dir` holds it already."""
    key = hashlib.sha256(" ".join((DEBIAN_MIRROR, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    tarball = cache_dir / f"bookworm-python3-{key}.tar"
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        root = Path(scratch) / "root"
        proc = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             "bookworm", str(root), DEBIAN_MIRROR],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode != 0:
            raise DockerError(f"debootstrap: {proc.returncode}\n{proc.stdout[-4000:]}")
        shutil.copyfile(HOST_CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
        partial = Path(scratch) / "base.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)  # whole or absent: a failed run leaves no half tarball
    return tarball
