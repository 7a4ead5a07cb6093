"""Building a merged model: run `server.merging.worker` in a process group of its own, bounded in
time and in the output kept, into a staging dir that becomes `out_dir` with one rename once
checked. So `out_dir` is either absent or a whole merged dir whose manifest vouches for every
file, whatever the worker did: ran out of memory, took too long, or wrote half a model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from adapters.errors import AdapterStoreError
from adapters.merged_store import MERGED_MANIFEST, merge_key, verify_dir
from adapters.store import fsync_dir

__all__ = [
    "MERGED_MANIFEST",
    "MergeError",
    "build_merged",
    "merge_key",
    "verify_merged_dir",
]

logger = logging.getLogger(__name__)

OUTPUT_TAIL_BYTES = 4096
FAILED = "merge failed:"
_KILL_WAIT_S = 10.0
_REPO_ROOT = Path(__file__).resolve().parents[2]


class MergeError(RuntimeError):
    """The merge did not produce a merged model; the message is safe to show an operator (it
    names no path of the store)."""


def build_merged(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    adapter_digest: str,
    base_revision: str,
    timeout_s: float = 900,
) -> None:
    """Merge the adapter in `adapter_dir` into the base in `base_dir`, as `out_dir` (which must
    not exist; its parent must). FileExistsError before anything runs if it does; MergeError,
    with nothing left behind, if the worker fails, exceeds `timeout_s` or writes a dir that
    does not check out."""
    if out_dir.exists() or out_dir.is_symlink():
        raise FileExistsError(f"{out_dir.name} already exists")
    staging = out_dir.parent / f".{out_dir.name}.tmp-{secrets.token_hex(8)}"
    staging.mkdir()  # FileNotFoundError if the parent is missing: a caller's mistake
    try:
        _run_worker(base_dir, adapter_dir, staging, adapter_digest, base_revision, timeout_s)
        manifest = verify_merged_dir(staging)
        if (manifest["adapter_digest"], manifest["base_revision"]) != (
            adapter_digest,
            base_revision,
        ):
            raise MergeError("the merge worker wrote the manifest of another merge")
        try:
            os.rename(staging, out_dir)
        except OSError as exc:
            # Created meanwhile by someone else: theirs stays, ours goes.
            raise FileExistsError(f"{out_dir.name} appeared while merging") from exc
        fsync_dir(out_dir.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def verify_merged_dir(path: Path) -> dict[str, Any]:
    """The manifest of the merged dir `path`, once every file it lists has the sha256 listed and
    no unlisted file is there; MergeError when the dir is not whole."""
    try:
        return verify_dir(path)
    except AdapterStoreError as exc:
        raise MergeError(exc.message) from exc


def _run_worker(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    adapter_digest: str,
    base_revision: str,
    timeout_s: float,
) -> None:
    argv = [
        sys.executable, "-m", "server.merging.worker",
        "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out_dir),
        "--adapter-digest", adapter_digest, "--base-revision", base_revision,
    ]  # fmt: skip
    env = dict(os.environ)
    # The worker imports this package, whatever the caller's working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_REPO_ROOT), env.get("PYTHONPATH"))))
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=env, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    tail = _Tail(proc.stdout)
    try:
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise MergeError(f"the merge took longer than {timeout_s:g} s") from None
    finally:
        # Always, and by the group the worker leads: it may have started processes of its own,
        # and a caller interrupted (KeyboardInterrupt) must not leave a merge running.
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=_KILL_WAIT_S)
        tail.join()
    if code == 0:
        return
    output = tail.text()
    logger.warning("merge worker exited with code %s; its output ends:\n%s", code, output)
    for line in reversed(output.splitlines()):
        if line.startswith(FAILED):
            raise MergeError(line.strip())
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        raise MergeError(f"the merge worker was killed by {name} (out of memory?)")
    raise MergeError(f"the merge worker exited with code {code}")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Tail:
    """Reads a pipe to its end on a thread of its own, keeping only its last bytes: the worker
    may log without end, and a full pipe would stall it."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._pipe = pipe
        self._buffer = bytearray()
        self._thread = threading.Thread(target=self._read, name="merge-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with self._pipe:
            while chunk := os.read(self._pipe.fileno(), 65536):
                self._buffer += chunk
                del self._buffer[:-OUTPUT_TAIL_BYTES]

    def join(self) -> None:
        self._thread.join(timeout=_KILL_WAIT_S)

    def text(self) -> str:
        return bytes(self._buffer[-OUTPUT_TAIL_BYTES:]).decode(errors="replace")
