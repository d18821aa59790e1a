"""GGUF builds on disk: one file per (snapshot, quant), with its gate record.

Layout: ``<builds_dir>/<snapshot_id>/<QUANT>.gguf`` and ``<QUANT>.json``. The GGUF file
is written under a temporary name and renamed; the record (snapshot, quant, path, size,
gate figures, ``published``) is written after it, atomically. A GGUF without a record
is an interrupted build: never listed, deleted by ``cleanup_partial`` and rebuilt. A
build that failed its gate keeps its file and record (``published: false``) for
inspection, and is never served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import write_json_atomic
from corpusfactory.errors import ContractError
from corpusfactory.records import BuildRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Build:
    snapshot: str
    quant: str
    path: Path
    record: dict[str, Any]

    @property
    def published(self) -> bool:
        return bool(self.record.get("published"))

    def describe(self) -> dict[str, Any]:
        """What ``builds list --json`` prints."""
        return {
            "snapshot": self.snapshot,
            "quant": self.quant,
            "path": str(self.path),
            "size_bytes": int(self.record.get("size_bytes", 0)),
            "gate": self.record.get("gate", {}),
            "published": self.published,
            "built_at": self.record.get("built_at"),
        }


class BuildStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def gguf_path(self, snapshot: str, quant: str) -> Path:
        d = self.root / snapshot
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{quant}.gguf"

    def record(self, snapshot: str, quant: str, record: dict[str, Any]) -> Build:
        """Write the record that completes a build (its GGUF must exist)."""
        path = self.root / snapshot / f"{quant}.gguf"
        if not path.is_file():
            raise FileNotFoundError(f"build {snapshot}/{quant}: {path} does not exist")
        record = {**record, "snapshot": snapshot, "quant": quant, "path": str(path)}
        record["size_bytes"] = path.stat().st_size
        target = self.root / snapshot / f"{quant}.json"
        record = BuildRecord.read(record, target).as_dict()
        write_json_atomic(target, record)
        return Build(snapshot, quant, path, record)

    def cleanup_partial(self) -> list[str]:
        """Delete GGUF files without a record and temporary files; return their names."""
        removed = []
        for d in self.root.iterdir():
            if not d.is_dir():
                continue
            for f in d.iterdir():
                orphan = f.suffix == ".gguf" and not f.with_suffix(".json").is_file()
                if orphan or f.name.startswith("."):
                    f.unlink()
                    removed.append(f"{d.name}/{f.name}")
        return removed

    def all(self) -> list[Build]:
        out = []
        for rec_path in sorted(self.root.glob("*/*.json")):
            if rec_path.name.startswith("."):
                continue
            try:
                data = json.loads(rec_path.read_text(encoding="utf-8"))
                BuildRecord.read(data, rec_path)  # the file as written, checked
                record = data
            except (OSError, ValueError, ContractError) as exc:
                # One unreadable record hides its build, never the others.
                log.warning("skipping the build record %s: %s", rec_path, exc)
                continue
            gguf = rec_path.with_suffix(".gguf")
            if gguf.is_file():
                out.append(Build(rec_path.parent.name, rec_path.stem, gguf, record))
        return out

    def for_snapshot(self, snapshot: str) -> dict[str, Build]:
        return {b.quant: b for b in self.all() if b.snapshot == snapshot}

    def newest_published(self, quant: str) -> Build | None:
        """The published build of ``quant`` of the newest snapshot that has one.

        Snapshot ids sort by sequence number (``snap-00001-...``)."""
        ok = [b for b in self.all() if b.quant == quant and b.published]
        return max(ok, key=lambda b: b.snapshot) if ok else None
