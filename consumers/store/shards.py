"""The numbered shard files ``<prefix>-NNNNN.jsonl`` of one record kind: listing,
reading, appending with fsync, rolling to a new shard, and the repair of a torn last
line left by a crash."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import fsync_dir

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Repair:
    """A torn last line removed from a shard when the store was opened."""

    path: Path
    removed_bytes: int
    kept_bytes: int


class ShardSet:
    """The numbered shards ``<prefix>-NNNNN.jsonl`` of one record kind."""

    def __init__(self, root: Path, prefix: str, shard_lines: int) -> None:
        self.root = root
        self.prefix = prefix
        self.shard_lines = shard_lines
        self._pattern = re.compile(rf"^{re.escape(prefix)}-(\d{{5,}})\.jsonl$")
        self._fh: Any = None  # the open current shard (binary append), writers only
        self._index = 0
        self._lines = 0  # lines in the current shard
        self._dirty = False

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.jsonl"

    def shards(self) -> list[Path]:
        found: list[tuple[int, Path]] = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = self._pattern.match(p.name)
                if m and p.is_file():
                    found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def repair(self) -> list[Repair]:
        """Truncate a torn (unterminated) last line away in every shard."""
        repairs = []
        for path in self.shards():
            r = _repair_tail(path)
            if r is not None:
                repairs.append(r)
        return repairs

    def read(self) -> Iterator[tuple[Path, int, bytes, dict[str, Any] | None]]:
        """(path, line number, raw line, parsed object or None if corrupt), in order.

        A torn last line (no newline) is not yielded: it is a write in progress, or
        a crash the writer repairs when it opens the store.
        """
        for path in self.shards():
            with path.open("rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    if not raw.endswith(b"\n"):
                        break
                    yield path, lineno, raw, _parse(raw)

    def open_for_append(self) -> None:
        shards = self.shards()
        if shards:
            last = shards[-1]
            m = self._pattern.match(last.name)
            assert m is not None
            self._index = int(m.group(1))
            self._lines = _count_lines(last)
            self._fh = last.open("ab")
        else:
            self._index = 0
            self._lines = 0
            self._fh = (self.root / self.name(0)).open("ab")
            fsync_dir(self.root)

    def append(self, lines: list[bytes]) -> None:
        for line in lines:
            if self._lines >= self.shard_lines:
                self._roll()
            self._fh.write(line)
            self._lines += 1
            self._dirty = True

    def _roll(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._index += 1
        self._lines = 0
        self._fh = (self.root / self.name(self._index)).open("ab")
        fsync_dir(self.root)
        log.info("corpus store: started shard %s", self.name(self._index))

    def sync(self) -> None:
        if self._fh is not None and self._dirty:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._dirty = False

    def close(self) -> None:
        if self._fh is not None:
            try:
                self.sync()
            finally:
                self._fh.close()
                self._fh = None


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            n += chunk.count(b"\n")
    return n


def _repair_tail(path: Path) -> Repair | None:
    """If the file does not end with a newline, cut it after its last newline."""
    size = path.stat().st_size
    if size == 0:
        return None
    with path.open("r+b") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return None
        keep = 0
        end = size
        while end > 0:
            start = max(0, end - _CHUNK)
            fh.seek(start)
            chunk = fh.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            end = start
        fh.seek(keep)
        torn = fh.read(min(size - keep, 200))
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    log.warning(
        "corpus store: %s ended with a torn line (%d bytes, starting %r); truncated it "
        "away (the event it held was not committed and is read again from Kafka)",
        path,
        size - keep,
        torn[:80],
    )
    return Repair(path=path, removed_bytes=size - keep, kept_bytes=keep)
