"""What the machine's hardware computes fast: native bfloat16 on this CPU or GPU, and
the scorer precision chosen from it."""

from __future__ import annotations

from typing import Literal

Precision = Literal["float32", "bfloat16", "int8"]


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def fastest_precision(device: str) -> Precision:
    """The precision ``precision: auto`` picks for the scorer on ``device``.

    bfloat16 where the hardware multiplies it natively (a CUDA GPU that supports it,
    a CPU with AVX512-BF16 or AMX); float32 elsewhere. int8 is never picked by
    itself: it changes the NLL more than bfloat16 does, so it is asked for
    explicitly (``admission.scorer_precision: int8``) after checking the
    tolerance (``corpusfactory bench scorer``)."""
    import torch

    if device.startswith("cuda"):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bfloat16" if ok else "float32"
    return "bfloat16" if cpu_has_native_bf16() else "float32"
