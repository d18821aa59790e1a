"""Quantized GGUF builds through llama.cpp's own quantizer (llama-cpp-python's binding).

``quantize(in_path, out_path, quant)`` turns an F16/F32 GGUF file (from
``serving.gguf.convert``) into one of llama.cpp's quantized types with
``llama_model_quantize``: the same code as llama.cpp's ``llama-quantize`` tool, so the
per-tensor choices of the K-quant mixes (``Q4_K_M`` keeps some tensors at higher
precision) are llama.cpp's. Tensors whose rows are not a multiple of a K-quant's
256-value block fall back inside llama.cpp to a compatible type; the resulting file
size is recorded.

``F16`` of an F16 input is a byte copy; of an F32 input it is a conversion by
llama.cpp. The output is written under a temporary name beside ``out_path`` and
renamed into place when llama.cpp reports success.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf

from corpusfactory.atomicio import atomic_path
from corpusfactory.errors import ModelError

log = logging.getLogger(__name__)

_FT = gguf.LlamaFileType
# Quant name -> llama_ftype (the values of llama.h's enum, which gguf mirrors).
QUANT_TYPES: dict[str, int] = {
    "F32": int(_FT.ALL_F32),
    "F16": int(_FT.MOSTLY_F16),
    "BF16": int(_FT.MOSTLY_BF16),
    "Q8_0": int(_FT.MOSTLY_Q8_0),
    "Q6_K": int(_FT.MOSTLY_Q6_K),
    "Q5_K_M": int(_FT.MOSTLY_Q5_K_M),
    "Q5_K_S": int(_FT.MOSTLY_Q5_K_S),
    "Q5_0": int(_FT.MOSTLY_Q5_0),
    "Q5_1": int(_FT.MOSTLY_Q5_1),
    "Q4_K_M": int(_FT.MOSTLY_Q4_K_M),
    "Q4_K_S": int(_FT.MOSTLY_Q4_K_S),
    "Q4_0": int(_FT.MOSTLY_Q4_0),
    "Q4_1": int(_FT.MOSTLY_Q4_1),
    "Q3_K_L": int(_FT.MOSTLY_Q3_K_L),
    "Q3_K_M": int(_FT.MOSTLY_Q3_K_M),
    "Q3_K_S": int(_FT.MOSTLY_Q3_K_S),
    "Q2_K": int(_FT.MOSTLY_Q2_K),
}


def quant_ftype(quant: str) -> int:
    """The llama_ftype of a quant name (case-insensitive), or ValueError listing the known."""
    ftype = QUANT_TYPES.get(quant.upper())
    if ftype is None:
        raise ValueError(f"unknown quant {quant!r} (known: {', '.join(QUANT_TYPES)})")
    return ftype


def gguf_file_type(path: str | Path) -> int | None:
    """``general.file_type`` of a GGUF file, or None when absent."""
    reader = gguf.GGUFReader(str(path))
    field = reader.get_field(gguf.Keys.General.FILE_TYPE)
    return None if field is None else int(field.contents())


_FALLBACK = re.compile(
    r"^warning:\s+(?P<tensor>\S+)\s+-.*required for type\s+(?P<wanted>\w+)\)"
    r"\s+->\s+falling back to\s+(?P<used>\w+)"
)


@contextlib.contextmanager
def _llama_log_captured() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (all levels) instead of printing them.

    llama.cpp logs through one process-wide callback; llama-cpp-python installs its own
    at import, which is put back afterwards.
    """
    import llama_cpp

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", "replace"))

    lines: list[str] = []
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        try:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        except (ImportError, AttributeError):  # pragma: no cover - other binding versions
            llama_cpp.llama_log_set(None, ctypes.c_void_p(0))
        lines.extend("".join(chunks).splitlines())


def _fallbacks(lines: list[str]) -> list[dict[str, str]]:
    """The tensors llama.cpp stored in another type than the quant asked for."""
    return [m.groupdict() for line in lines if (m := _FALLBACK.match(line.strip()))]


def quantize(
    in_path: str | Path,
    out_path: str | Path,
    quant: str,
    *,
    threads: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Quantize a GGUF file with llama.cpp; return what was built.

    ``quant`` is one of ``QUANT_TYPES`` (``F16``, ``Q8_0``, ``Q4_0``, ``Q4_K_M``,
    ``Q5_K_M``, ``Q6_K``, ...); ``threads`` defaults to the CPU count; llama.cpp's log
    goes to this module's logger (debug level; info with ``verbose``).

    Returns ``quant``, ``ftype``, ``path``, ``size_bytes``, ``in_size_bytes``, ``ratio``
    (output/input size), ``seconds``, ``method`` ("copy" or "llama.cpp") and
    ``fallbacks``: the tensors llama.cpp stored in another type than the quant's
    (``{"tensor", "wanted", "used"}``; K-quants need rows that are a multiple of 256
    values). Raises ValueError for an unknown quant or a missing input, ModelError
    when llama.cpp fails.
    """
    ftype = quant_ftype(quant)
    quant = quant.upper()
    src, dst = Path(in_path), Path(out_path)
    if not src.is_file():
        raise ValueError(f"{src}: no such GGUF file")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{src}: input and output are the same file")
    nthread = threads if threads is not None else (os.cpu_count() or 1)
    started = time.perf_counter()
    method = "llama.cpp"
    fallbacks: list[dict[str, str]] = []
    with atomic_path(dst) as tmp:
        if quant == "F16" and gguf_file_type(src) == ftype:
            shutil.copyfile(src, tmp)
            method = "copy"
        else:
            import llama_cpp

            llama_cpp.llama_backend_init()
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = nthread
            with _llama_log_captured() as lines:
                rc = llama_cpp.llama_model_quantize(
                    os.fsencode(src), os.fsencode(tmp), ctypes.byref(params)
                )
            for line in lines:
                (log.info if verbose else log.debug)("llama.cpp: %s", line)
            fallbacks = _fallbacks(lines)
            if rc != 0 or not tmp.is_file():
                tail = "\n".join(lines[-10:])
                raise ModelError(
                    f"llama.cpp could not quantize {src} to {quant} (return code {rc})"
                    + (f":\n{tail}" if tail else "")
                )
    size = dst.stat().st_size
    in_size = src.stat().st_size
    result = {
        "quant": quant,
        "ftype": ftype,
        "path": str(dst),
        "size_bytes": size,
        "in_size_bytes": in_size,
        "ratio": round(size / in_size, 4) if in_size else None,
        "seconds": round(time.perf_counter() - started, 3),
        "method": method,
        "fallbacks": fallbacks,
    }
    log.info("quantized %s -> %s (%s, %.1f MB)", src, dst, quant, size / 1e6)
    return result
