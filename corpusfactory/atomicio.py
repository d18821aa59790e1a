"""Atomic, durable file writes: a reader (or a crash) never sees a half-written file.

The text goes to a uniquely named temporary file beside the target (so concurrent
writers never share one), is fsynced, then renamed over the target, which is
atomic within one filesystem. ``mode`` is the new file's permission bits before
the umask: ``0o600`` keeps a file holding secrets readable by its owner alone
from the moment it exists.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str, mode: int = 0o666) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically and durably."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))
