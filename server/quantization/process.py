"""Run one step of a quantized build (pip, the quantizer) as a bounded subprocess: its own process
group, killed whole when it ends, times out or the caller is interrupted; every byte it prints
goes to a log file, and each line it prints to `on_line` (for a status display)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from server.quantization import QuantizeError

_KILL_WAIT_S = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LINE_BREAK = re.compile(rb"[\r\n]")


def run_bounded(
    argv: Sequence[str],
    *,
    log_path: Path,
    timeout_s: float,
    what: str,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] = lambda _line: None,
) -> None:
    """Run `argv` to its end; QuantizeError naming `what` and the log when it fails or takes
    longer than `timeout_s`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        assert proc.stdout is not None
        reader = threading.Thread(
            target=_copy_lines, args=(proc.stdout, log, on_line), name="quantize-output",
            daemon=True,
        )  # fmt: skip
        reader.start()
        try:
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise QuantizeError(
                    f"{what} took longer than {timeout_s:g} s "
                    f"(LORAGATE_MODEL__QUANTIZE_TIMEOUT_S); its output is in {log_path}"
                ) from None
        finally:
            # Always the whole group: the step may have started processes of its own (pip's
            # builds, torch's workers), and an interrupted caller must leave nothing running.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_KILL_WAIT_S)
            reader.join(timeout=_KILL_WAIT_S)
    if code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise QuantizeError(f"{what} {how}; its output is in {log_path}{_last_words(log_path)}")


def _copy_lines(pipe: IO[bytes], log: IO[bytes], on_line: Callable[[str], None]) -> None:
    # Bytes to the log as they come; lines (tqdm redraws with \r) to the status display.
    pending = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(pipe.fileno(), 65536):
            log.write(chunk)
            pending += chunk
            *lines, pending = _LINE_BREAK.split(pending)
            for line in lines:
                text = _ANSI.sub("", line.decode(errors="replace")).strip()
                if text:
                    on_line(text)


def _last_words(log_path: Path, lines: int = 3) -> str:
    """The end of the log, for the error message: usually where the reason is."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    kept = [_ANSI.sub("", t).strip() for t in re.split(r"[\r\n]", tail)]
    kept = [t for t in kept if t][-lines:]
    return (":\n  " + "\n  ".join(kept)) if kept else ""
