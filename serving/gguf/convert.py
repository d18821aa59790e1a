"""Hugging Face checkpoints -> GGUF files, with llama.cpp's own converter.

``convert_hf_to_gguf(model_dir, out_path, out_type)`` runs ``convert_hf_to_gguf.py``, the
converter the llama.cpp project maintains for every architecture llama.cpp runs (Llama,
Mistral, Gemma 3, Qwen, Phi, ...), as a separate process with this interpreter. The
project keeps no converter of its own: whatever the trainer produces, the conversion
is the one llama.cpp's authors test against their own runtime.

Where the converter comes from
    llama.cpp's converter matching the installed ``llama_cpp_python``, fetched once
    from its pinned source distribution into ``$CORPUSFACTORY_CACHE`` by
    ``serving.gguf.fetch`` (``ensure_converter``; ``python -m serving.gguf.convert
    --fetch``, which ``make models`` runs).

Which ``gguf`` package the converter uses
    Its own. The script puts the ``gguf-py`` folder beside it first on ``sys.path``
    (unless ``NO_LOCAL_GGUF`` is set, which is removed from its environment here). That
    copy carries the same version number as the installed ``gguf`` 0.19.0 but is the
    llama.cpp tree's newer state (architectures, keys and tensor names the release on
    PyPI lacks), and it is the one the converter was written against. The installed
    ``gguf`` stays what the project itself reads GGUF files with (here, the quantizer,
    the benchmarks).

Outputs and failures
    The file is written under a temporary name beside ``out_path`` and renamed into
    place when the converter succeeds, so a reader never sees half a file and a failed
    run leaves none (an earlier file at ``out_path`` stays as it was). The converter's
    output is captured; when it fails (an architecture or tokenizer it does not
    support, a broken checkpoint) the log is kept beside the output as
    ``<name>.convert.log`` and a ``ConversionError`` names its last error line and that
    log. A converter that cannot start because a Python package is missing raises
    ``ConverterUnavailableError`` (a ``SetupError``: the installation, not the
    snapshot, needs fixing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import atomic_path
from corpusfactory.errors import ConversionError, SetupError
from serving.gguf.fetch import (
    DIST,
    SCRIPT,
    SDIST_ENV,
    ConverterUnavailableError,
    ensure_converter,
    last_error_line,
    llama_cpp_version,
)

log = logging.getLogger(__name__)

# --outtype values of the converter that make one file llama.cpp loads as it is.
OUT_TYPES = ("f16", "f32", "bf16", "q8_0")
LOG_SUFFIX = ".convert.log"


# -- running it --------------------------------------------------------------------------


_MISSING_MODULE = re.compile(r"No module named '(?P<module>[\w.]+)'")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use the gguf-py beside it
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing to fetch
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def convert_hf_to_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    out_type: str = "f16",
    *,
    name: str | None = None,
    sdist: str | Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint directory to one GGUF file with llama.cpp's converter.

    ``out_type`` is one of ``OUT_TYPES``: ``f16`` (what the builder quantizes from),
    ``f32``, ``bf16`` or ``q8_0``. ``name`` sets ``general.name`` (default: the
    directory's name); ``sdist`` is passed to ``ensure_converter``; ``timeout`` bounds
    the converter's run in seconds (default: none).

    Returns what was written, read back from the file: ``architecture`` (llama.cpp's,
    e.g. ``llama``, ``gemma3``), ``hf_architecture``, ``n_tensors``, ``n_params``,
    ``vocab_size``, ``tokenizer`` (``tokenizer.ggml.model``), ``tokenizer_pre``,
    ``add_bos``, ``add_eos``, ``chat_template`` (whether one was written), ``out_type``,
    ``size_bytes``, ``path``, ``seconds`` and ``converter`` (its version). Raises
    ``ValueError`` for an unknown ``out_type``, ``ConversionError`` for a checkpoint
    the converter refuses or fails on, ``ConverterUnavailableError`` when the converter
    cannot be fetched or started.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if out_type not in OUT_TYPES:
        raise ValueError(f"unknown out_type {out_type!r} (expected one of {', '.join(OUT_TYPES)})")
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir}: not a model directory")
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConversionError(f"{model_dir}: no config.json (not a Hugging Face model)") from exc
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{config_path}: cannot read the model config: {exc}") from exc
    archs = config.get("architectures") if isinstance(config, dict) else None
    hf_arch = archs[0] if isinstance(archs, list) and archs else None

    version = llama_cpp_version()
    script = ensure_converter(sdist=sdist, version=version) / SCRIPT
    log_path = out_path.with_name(out_path.name + LOG_SUFFIX)
    started = time.perf_counter()
    with atomic_path(out_path) as tmp:
        cmd = [
            sys.executable,
            str(script),
            str(model_dir.resolve()),
            "--outfile",
            str(tmp.resolve()),
            "--outtype",
            out_type,
            "--model-name",
            name or model_dir.resolve().name,
        ]
        log.info(
            "converting %s -> %s (%s) with llama.cpp's converter", model_dir, out_path, out_type
        )
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as output:
            try:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    env=_child_env(),
                    cwd=str(script.parent),
                    timeout=timeout,
                    check=False,
                )
                code: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
            output.seek(0)
            text = output.read()
        if code != 0 or not tmp.is_file():
            log_path.write_text(f"$ {' '.join(cmd)}\n{text}", encoding="utf-8")
            lines = text.splitlines()
            why = (
                f"timed out after {timeout:g} s"
                if code is None
                else last_error_line(lines) or f"exit status {code}"
            )
            missing = _MISSING_MODULE.search(why)
            if missing:
                raise ConverterUnavailableError(
                    f"llama.cpp's converter cannot run: {why} (install the pinned "
                    f"requirements with `make setup`; log: {log_path})"
                )
            raise ConversionError(
                f"{model_dir}: llama.cpp's converter failed: {why} (log: {log_path})"
            )
    log_path.unlink(missing_ok=True)  # a failure log of an earlier attempt
    result = describe_gguf(out_path)
    result.update(
        hf_architecture=hf_arch,
        out_type=out_type,
        seconds=round(time.perf_counter() - started, 3),
        converter=f"llama.cpp {SCRIPT} from {DIST} {version}",
    )
    log.info(
        "converted %s -> %s (%s, %s, %d tensors, %.1f MB, %.1f s)",
        model_dir,
        out_path,
        result["architecture"],
        out_type,
        result["n_tensors"],
        result["size_bytes"] / 1e6,
        result["seconds"],
    )
    return result


def describe_gguf(path: str | Path) -> dict[str, Any]:
    """What a GGUF file holds: architecture, tokenizer, tensor and parameter counts."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))

    def field(key: str, default: Any = None) -> Any:
        f = reader.get_field(key)
        return default if f is None else f.contents()

    tokens = reader.get_field("tokenizer.ggml.tokens")
    return {
        "architecture": field("general.architecture"),
        "n_tensors": len(reader.tensors),
        "n_params": int(sum(int(np.prod(t.shape)) for t in reader.tensors)),
        "vocab_size": len(tokens.data) if tokens is not None else None,
        "tokenizer": field("tokenizer.ggml.model"),
        "tokenizer_pre": field("tokenizer.ggml.pre"),
        "add_bos": field("tokenizer.ggml.add_bos_token"),
        "add_eos": field("tokenizer.ggml.add_eos_token"),
        "chat_template": reader.get_field("tokenizer.chat_template") is not None,
        "size_bytes": Path(path).stat().st_size,
        "path": str(path),
    }


# -- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m serving.gguf.convert --fetch`` or ``... MODEL_DIR OUT.gguf [--outtype]``."""
    parser = argparse.ArgumentParser(
        prog="python -m serving.gguf.convert",
        description="Fetch llama.cpp's converter, or convert a Hugging Face model to GGUF.",
    )
    parser.add_argument("model_dir", nargs="?", help="a Hugging Face model directory")
    parser.add_argument("out", nargs="?", help="the GGUF file to write")
    parser.add_argument("--outtype", default="f16", choices=OUT_TYPES)
    parser.add_argument("--fetch", action="store_true", help="fetch the converter; print its dir")
    parser.add_argument("--sdist", help=f"a local {DIST} sdist (default: ${SDIST_ENV} or pip)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.fetch:
            print(ensure_converter(sdist=args.sdist))
            if args.model_dir is None:
                return 0
        if args.model_dir is None or args.out is None:
            parser.error("give MODEL_DIR and OUT, or --fetch")
        result = convert_hf_to_gguf(args.model_dir, args.out, args.outtype, sdist=args.sdist)
    except (ConversionError, SetupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConversionError) else 3
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
