"""Fetching llama.cpp's converter (``convert_hf_to_gguf.py``) once, for ``convert``.

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

``last_error_line`` picks the cause of a failure out of a tool's captured output
(pip's here, the converter's in ``convert``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from corpusfactory.cache import cache_root, file_lock
from corpusfactory.errors import SetupError

log = logging.getLogger(__name__)

DIST = "llama_cpp_python"
SDIST_ENV = "CORPUSFACTORY_LLAMA_CPP_SDIST"
CACHE_SUBDIR = "llama.cpp-converter"
MARKER = "COMPLETE"
SCRIPT = "convert_hf_to_gguf.py"
# What is kept of the sdist's vendor/llama.cpp/: the converter, its model classes, its
# own gguf package, and the licence they come under.
PARTS = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")


class ConverterUnavailableError(SetupError):
    """llama.cpp's converter cannot be fetched or cannot start on this installation."""


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
        why = last_error_line((proc.stderr + "\n" + proc.stdout).splitlines())
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


# "ERROR:hf-to-gguf:Model Foo is not supported", "NotImplementedError: ...",
# "KeyError: 'x'", "safetensors_rust.SafetensorError: ..."
_LOGGED_ERROR = re.compile(r"^(?:ERROR|CRITICAL):[\w.-]+:\s*(?P<msg>.+)$")
_RAISED = re.compile(
    r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))(?::\s*(?P<msg>.*))?$"
)


def last_error_line(lines: Sequence[str]) -> str:
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
