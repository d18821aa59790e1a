"""The per-user cache: where it is, its lock, and the one way a thing is built into it.

Everything the project downloads or builds once (the broker's jars, the demo models,
Gemma 3 270M's two forms, the Italian scorer, llama.cpp's converter, calibrations)
lives under ``$CORPUSFACTORY_CACHE``, by default ``~/.cache/corpusfactory``. Builds are
shared by every process of the user, so each one is made under an exclusive file lock,
into a temporary folder beside its target, and renamed into place with a ``COMPLETE``
marker last: a reader never sees half a build, an interrupted build leaves only a
temporary folder that the next build removes, and two processes never build the same
thing twice. No heavy import here (no torch): the CLI and the stack use it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from corpusfactory.errors import ModelError

CACHE_ENV = "CORPUSFACTORY_CACHE"
MARKER = "COMPLETE"


def cache_root() -> Path:
    """``$CORPUSFACTORY_CACHE`` (``~`` expanded), by default ``~/.cache/corpusfactory``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corpusfactory"


def models_root(models_dir: Path | str | None = None) -> Path:
    """``models_dir`` (``~`` expanded), by default ``<cache>/models``."""
    return Path(models_dir).expanduser() if models_dir is not None else cache_root() / "models"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created, with its folder, if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_complete(target: Path) -> bool:
    return (target / MARKER).is_file()


def cached_build(
    target: Path,
    build: Callable[[Path], None],
    *,
    force: bool = False,
    error: type[Exception] = ModelError,
) -> Path:
    """``target``, built by ``build(tmp)`` unless complete already (or ``force``).

    ``build`` fills a fresh temporary folder beside ``target``; when it returns, the
    marker is written (unless ``build`` wrote its own) and the folder renamed to
    ``target``. Concurrent callers wait on the lock and reuse the finished build. A
    folder that cannot be created raises ``error``; ``build``'s own errors propagate,
    and its temporary folder is removed.
    """
    if not force and is_complete(target):
        return target
    base = target.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(f"cannot create the cache folder {base}: {exc}") from exc
    with file_lock(base / f".{target.name}.lock"):
        # Another process may have finished this build while we waited for the lock.
        if not force and is_complete(target):
            return target
        for stale in base.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted build
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=base))
        try:
            build(tmp)
            if not (tmp / MARKER).exists():
                (tmp / MARKER).write_text("", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)  # incomplete, or force=True
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
