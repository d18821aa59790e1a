"""Atomic, durable file writes: a reader (or a crash) never sees a half-written file.

One rule for every file the project writes whole (settings, records, predictions,
exports, reports, calibration): the content goes to a uniquely named temporary file
beside the target (so concurrent writers never share one), is flushed and fsynced,
then renamed over the target (atomic within one filesystem), and the directory is
fsynced so the rename itself survives a power loss. On any failure the temporary
file is removed and the target is left as it was. ``mode`` is the new file's
permission bits before the umask: ``0o600`` keeps a file holding secrets readable
by its owner alone from the moment it exists.

Append-only logs (the corpus shards, the decision log) have their own rules in
their modules; this one is for files replaced whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (hidden, unique per process and call)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_dir(path: Path) -> None:
    """Make a rename (or a new file) in directory ``path`` durable; an OSError is
    raised, not swallowed: the corpus store and the snapshot store stop on it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: Path, binary: bool = False, mode: int = 0o666) -> Iterator[IO[Any]]:
    """A file to write ``path`` through: UTF-8 text, or bytes with ``binary=True``.

    What the block writes replaces ``path`` only when the block succeeds."""
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for another program to write (a converter, a
    quantizer); fsynced and renamed onto ``path`` if the block succeeds, removed if not.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, mode: int = 0o666) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    with atomic_open(path, mode=mode) as fh:
        fh.write(text)


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 2) -> None:
    """Write ``data`` as JSON to ``path`` atomically and durably."""
    write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str))


def write_jsonl_atomic(path: Path, rows: Iterable[Any]) -> int:
    """Write one JSON object per line to ``path`` atomically and durably; returns the
    number of lines."""
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
