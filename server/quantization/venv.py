"""The Python that runs the quantizer: LORAGATE_MODEL__QUANTIZE_PYTHON as given, or the venv
`<cache_dir>/quantize-venv`, created on first use with this same Python and the pins of
`requirements.txt` (about 1.5 minutes, 1.5 GB).

A stamp holding the requirements' sha256 is written only once pip has finished and the
quantizer imports: a venv without it (a pip run that failed or was interrupted) is completed by
running pip again, and one made from other pins is brought to these.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from server.quantization import QuantizeError
from server.quantization.process import run_bounded

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
STAMP = ".loragate-requirements.sha256"
VENV_DIR = "quantize-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def requirements_sha256() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def venv_is_ready(venv: Path) -> bool:
    try:
        stamp = (venv / STAMP).read_text().strip()
    except OSError:
        return False
    return venv_python(venv).is_file() and stamp == requirements_sha256()


def clean_env() -> dict[str, str]:
    """Our environment minus what would mix loragate's venv into the other one's Python."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _prefixed(progress: Callable[[str], None], what: str) -> Callable[[str], None]:
    return lambda line: progress(f"{what}: {line[:80]}")


def ensure_quantize_python(
    configured: Path | None,
    cache_dir: Path,
    *,
    log_path: Path,
    timeout_s: float,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[Path, bool]:
    """The quantizer's Python, and whether its venv was set up just now."""
    if configured is not None:
        # The operator's own interpreter: used as it is, never installed into.
        if not configured.is_file():
            raise QuantizeError(f"LORAGATE_MODEL__QUANTIZE_PYTHON={configured} does not exist")
        return configured, False
    venv = cache_dir / VENV_DIR
    if venv_is_ready(venv):
        return venv_python(venv), False
    if venv.exists() and not venv_python(venv).is_file():
        shutil.rmtree(venv)  # no interpreter: an interrupted `python -m venv`, start over
    env = clean_env()
    if not venv.exists():
        progress(f"creating the quantize venv {venv}")
        run_bounded(
            [sys.executable, "-m", "venv", str(venv)], log_path=log_path, timeout_s=timeout_s,
            what="creating the quantize venv", env=env,
        )  # fmt: skip
    python = str(venv_python(venv))
    steps = [
        ("upgrading pip in the quantize venv", ["-m", "pip", "install", "--upgrade", "pip"]),
        (
            f"pip install -r {REQUIREMENTS.name} (torch, llmcompressor: about 1.5 minutes)",
            ["-m", "pip", "install", "--progress-bar", "off", "-r", str(REQUIREMENTS)],
        ),
        ("checking the quantize venv", ["-c", "import llmcompressor, compressed_tensors, torch"]),
    ]
    for what, args in steps:
        progress(what)
        run_bounded(
            [python, *args], log_path=log_path, timeout_s=timeout_s, what=what, env=env,
            on_line=_prefixed(progress, what),
        )  # fmt: skip
    (venv / STAMP).write_text(requirements_sha256() + "\n")
    return venv_python(venv), True
