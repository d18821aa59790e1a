"""Hugging Face checkpoints -> GGUF files, with llama.cpp's own converter.

``convert_hf_to_gguf(model_dir, out_path, out_type)`` runs ``convert_hf_to_gguf.py``, the
converter the llama.cpp project maintains for every architecture llama.cpp runs (Llama,
Mistral, Gemma 3, Qwen, Phi, ...), as a separate process with this interpreter. The
project keeps no converter of its own: whatever the trainer produces, the conversion
is the one llama.cpp's authors test against their own runtime.

Where the converter comes from
    The pinned ``llama_cpp_python`` source distribution (its version is the installed
    one, pinned by ``requirements.lock``) vendors the llama.cpp tree that its binding is
    built from, converter included. ``ensure_converter`` fetches that sdist once with
    ``pip download --no-deps --no-binary :all: llama_cpp_python==<version>`` and keeps
    three parts of ``vendor/llama.cpp/`` (``convert_hf_to_gguf.py``, ``conversion/``,
    ``gguf-py/``) and its ``LICENSE`` (MIT) in
    ``$CORPUSFACTORY_CACHE/llama.cpp-converter/<version>/``, so the converter always
    matches the llama.cpp that loads its files. The extraction goes to a temporary
    directory renamed into place, under a file lock, with a marker written last: an
    interrupted fetch is redone, concurrent ones fetch once. On a machine without
    PyPI, point ``CORPUSFACTORY_LLAMA_CPP_SDIST`` (or the ``sdist`` argument) at a copy
    of ``llama_cpp_python-<version>.tar.gz``. ``make models`` fetches it
    (``python -m serving.gguf.convert --fetch``).

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
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from corpusfactory.cache import cache_root, file_lock
from corpusfactory.errors import ConversionError, SetupError

log = logging.getLogger(__name__)

DIST = "llama_cpp_python"
SDIST_ENV = "CORPUSFACTORY_LLAMA_CPP_SDIST"
CACHE_SUBDIR = "llama.cpp-converter"
MARKER = "COMPLETE"
SCRIPT = "convert_hf_to_gguf.py"
# What is kept of the sdist's vendor/llama.cpp/: the converter, its model classes, its
# own gguf package, and the licence they come under.
PARTS = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")
# --outtype values of the converter that make one file llama.cpp loads as it is.
OUT_TYPES = ("f16", "f32", "bf16", "q8_0")
LOG_SUFFIX = ".convert.log"


class ConverterUnavailableError(SetupError):
    """llama.cpp's converter cannot be fetched or cannot start on this installation."""


# -- fetching the converter ------------------------------------------------------------


def llama_cpp_version() -> str:
    """The installed ``llama_cpp_python`` version (the converter's version too)."""
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConverterUnavailableError(
            f"{DIST} is not installed, so the version of llama.cpp's converter is unknown: "
            "run `make setup` (it installs the pinned requirements.lock)"
        ) from exc


def converter_root(cache: str | Path | None = None) -> Path:
    """``<cache>/llama.cpp-converter``; the cache defaults to ``$CORPUSFACTORY_CACHE``."""
    if cache is not None:
        return Path(cache).expanduser() / CACHE_SUBDIR
    return cache_root() / CACHE_SUBDIR


def converter_dir(version: str | None = None, cache: str | Path | None = None) -> Path:
    """Where the converter of ``version`` (default: the installed one) is kept."""
    return converter_root(cache) / (version or llama_cpp_version())


def ensure_converter(
    *,
    sdist: str | Path | None = None,
    version: str | None = None,
    cache: str | Path | None = None,
) -> Path:
    """The directory holding ``convert_hf_to_gguf.py``, fetched on first use.

    ``sdist`` is a local ``llama_cpp_python-<version>.tar.gz`` to extract instead of
    downloading one (default: ``$CORPUSFACTORY_LLAMA_CPP_SDIST``, else ``pip download``
    from the package index pip is configured with). ``version`` defaults to the
    installed ``llama_cpp_python``; ``cache`` to ``$CORPUSFACTORY_CACHE``. Raises
    ``ConverterUnavailableError`` with what to do when neither works.
    """
    version = version or llama_cpp_version()
    root = converter_root(cache)
    final = root / version
    if (final / MARKER).is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConverterUnavailableError(f"cannot create {root} for the converter: {exc}") from exc
    with file_lock(root / f".{version}.lock"):
        if (final / MARKER).is_file():  # fetched by another process meanwhile
            return final
        for stale in root.glob(f".tmp-{version}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted fetch
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=root))
        try:
            started = time.perf_counter()
            local = sdist if sdist is not None else os.environ.get(SDIST_ENV) or None
            if local is not None:
                archive = Path(local).expanduser()
                if not archive.is_file():
                    raise ConverterUnavailableError(
                        f"{archive}: no such file (the llama_cpp_python sdist named by "
                        f"{'the sdist argument' if sdist is not None else SDIST_ENV})"
                    )
                source = str(archive)
            else:
                archive = _download_sdist(version, tmp / "download")
                source = f"pip download {DIST}=={version}"
            files = _extract(archive, version, tmp / "tree")
            (tmp / "tree" / "SOURCE.json").write_text(
                json.dumps(
                    {
                        "distribution": DIST,
                        "version": version,
                        "source": source,
                        "sdist": archive.name,
                        "sdist_sha256": _sha256(archive),
                        "files": files,
                    },
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )
            (tmp / "tree" / MARKER).write_text(f"{version}\n", encoding="utf-8")  # last
            if final.exists():
                shutil.rmtree(final)  # an incomplete earlier fetch
            (tmp / "tree").rename(final)
            log.info(
                "llama.cpp converter %s ready in %s (%d files, %.1f s)",
                version,
                final,
                files,
                time.perf_counter() - started,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_sdist(version: str, dest: Path) -> Path:
    """``pip download`` the sdist of ``llama_cpp_python==version`` into ``dest``."""
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        f"{DIST}=={version}",
    ]
    log.info("downloading the %s %s sdist for llama.cpp's converter", DIST, version)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dest.glob(f"{DIST}-{version}.tar.gz")) or sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or not found:
        why = _last_error_line((proc.stderr + "\n" + proc.stdout).splitlines())
        raise ConverterUnavailableError(
            f"cannot download the {DIST}=={version} sdist that holds llama.cpp's converter "
            f"(pip: {why or f'exit {proc.returncode}'}): connect to PyPI and run "
            f"`make models` again, or download {DIST}-{version}.tar.gz elsewhere and set "
            f"{SDIST_ENV} to its path"
        )
    return found[0]


def _extract(archive: Path, version: str, dest: Path) -> int:
    """Extract ``PARTS`` of ``vendor/llama.cpp/`` from the sdist into ``dest``.

    Only regular files and directories, each checked to stay inside ``dest``.
    Returns the number of files written.
    """
    prefix = f"{DIST}-{version}/vendor/llama.cpp/"
    try:
        with tarfile.open(archive, "r:*") as tf:
            files = _extract_members(tf, prefix, dest)
    except (OSError, tarfile.TarError) as exc:
        raise ConverterUnavailableError(
            f"{archive}: cannot extract llama.cpp's converter ({exc}); point {SDIST_ENV} "
            f"at an intact {DIST}-{version}.tar.gz, or unset it to download one"
        ) from exc
    if not (dest / SCRIPT).is_file() or not (dest / "gguf-py" / "gguf").is_dir():
        raise ConverterUnavailableError(
            f"{archive}: no {prefix}{SCRIPT} with its gguf-py: not the {DIST} {version} "
            f"sdist; point {SDIST_ENV} at {DIST}-{version}.tar.gz"
        )
    return files


def _extract_members(tf: tarfile.TarFile, prefix: str, dest: Path) -> int:
    files = 0
    for member in tf:
        if not member.name.startswith(prefix):
            continue
        rel = member.name[len(prefix) :]
        if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in PARTS):
            continue
        parts = Path(rel).parts
        if not parts or any(p in ("", ".", "..") for p in parts) or Path(rel).is_absolute():
            continue  # never outside dest
        target = dest.joinpath(*parts)
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
        elif member.isfile():  # no links, devices or fifos
            src = tf.extractfile(member)
            if src is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            files += 1
    return files


# -- running it --------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_target(out_path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``out_path``, renamed onto it if the block succeeds.

    The temporary file is created by whoever writes it (so it gets the usual
    permissions); it is removed if the block fails.
    """
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


# "ERROR:hf-to-gguf:Model Foo is not supported", "NotImplementedError: ...",
# "KeyError: 'x'", "safetensors_rust.SafetensorError: ..."
_LOGGED_ERROR = re.compile(r"^(?:ERROR|CRITICAL):[\w.-]+:\s*(?P<msg>.+)$")
_RAISED = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s*(?P<msg>.*))?$"
)
_MISSING_MODULE = re.compile(r"No module named '(?P<module>[\w.]+)'")


def _last_error_line(lines: Sequence[str]) -> str:
    """The last line that reads as an error (a raised exception or an ERROR log line)."""
    for line in reversed(lines):
        text = line.strip()
        if m := _LOGGED_ERROR.match(text):
            return m.group("msg").strip()
        if m := _RAISED.match(text):
            return text
        if text.startswith("error:") or text.startswith("ERROR:"):
            return text
    tail = [ln.strip() for ln in lines if ln.strip()]
    return tail[-1] if tail else ""


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
    with atomic_target(out_path) as tmp:
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
                else _last_error_line(lines) or f"exit status {code}"
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
