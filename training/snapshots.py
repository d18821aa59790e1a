"""Snapshots on disk: published atomically, listed with their manifests and evaluations.

A snapshot is a directory in Hugging Face format (weights, tokenizer, generation
config) plus:

* ``manifest.json``: id, parent, base model, the Kafka offset range per partition it
  trained on, conversation counts, a hash of the training data, the training
  configuration, the loss curve, tokens/s and wall time;
* ``conversations.txt``: the ids of the conversations it trained on, one per line;
* ``heldout.jsonl``: the held-out conversations seen up to this snapshot (never trained
  on by it or its ancestors), for perplexity;
* ``eval/<task>.json`` and per-item predictions, added by the evaluator;
* ``COMPLETE``: written last.

Publication: everything is written under ``.tmp-<id>``, which is renamed to ``<id>``,
and only then is ``COMPLETE`` written and the parent directory fsynced. Readers ignore
any directory without the marker, and ``cleanup_partial`` (run when a trainer starts)
deletes them, so a crash at any point leaves either a complete snapshot or nothing.
Base-model evaluations live under ``base/<slug>/eval``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corpusfactory.atomicio import fsync_dir
from corpusfactory.errors import ContractError, CorpusFactoryError
from corpusfactory.faults import pause_point
from corpusfactory.records import SnapshotManifest

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
CONVERSATIONS = "conversations.txt"
HELDOUT = "heldout.jsonl"
BASE_ID = "base"
_ID = re.compile(r"snap-(\d{5})-\d{8}T\d{6}Z")


class SnapshotError(CorpusFactoryError):
    """A snapshot is missing, incomplete or malformed."""


@dataclass(frozen=True)
class Snapshot:
    id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def seq(self) -> int:
        return int(self.manifest.get("seq", 0))

    @property
    def parent(self) -> str:
        return str(self.manifest.get("parent") or "")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


class SnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing --------------------------------------------------------------------

    def new_id(self, seq: int) -> str:
        return f"snap-{seq:05d}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"

    def staging(self, snapshot_id: str) -> Path:
        """A fresh staging directory for ``snapshot_id`` (emptied if it exists)."""
        if not _ID.fullmatch(snapshot_id):
            raise SnapshotError(f"bad snapshot id {snapshot_id!r}")
        tmp = self.root / f".tmp-{snapshot_id}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def publish(self, snapshot_id: str) -> Snapshot:
        """Move a staged snapshot into place and mark it complete."""
        tmp = self.root / f".tmp-{snapshot_id}"
        if not (tmp / MANIFEST).is_file():
            raise SnapshotError(f"staged snapshot {tmp} has no {MANIFEST}")
        if not any(tmp.glob("*.safetensors")) and not any(tmp.glob("*.bin")):
            raise SnapshotError(f"staged snapshot {tmp} has no weights")
        final = self.root / snapshot_id
        if final.exists():
            raise SnapshotError(f"snapshot {snapshot_id} already exists")
        for child in tmp.iterdir():
            if child.is_file():
                with child.open("rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(self.root)
        pause_point("snapshot.publish")
        marker = final / MARKER
        with marker.open("w", encoding="utf-8") as f:
            f.write(f"{time.time()}\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(final)
        return self.get(snapshot_id)

    def cleanup_partial(self) -> list[str]:
        """Delete staging directories and snapshots without a marker; return their names.

        Only snapshot-named entries are touched (``snap-…``, ``.tmp-snap-…``)."""
        removed: list[str] = []
        for child in sorted(self.root.iterdir()):
            # Only our own names: the directory may be shared with other things.
            name = child.name.removeprefix(".tmp-")
            if not child.is_dir() or not _ID.fullmatch(name):
                continue
            if child.name.startswith(".tmp-") or not (child / MARKER).is_file():
                shutil.rmtree(child)
                removed.append(child.name)
        return removed

    # -- reading --------------------------------------------------------------------

    def all(self) -> list[Snapshot]:
        """Complete snapshots, oldest first."""
        out = []
        for child in self.root.iterdir():
            if child.is_dir() and _ID.fullmatch(child.name) and (child / MARKER).is_file():
                out.append(self._load(child))
        return sorted(out, key=lambda s: (s.seq, s.id))

    def latest(self) -> Snapshot | None:
        snaps = self.all()
        return snaps[-1] if snaps else None

    def get(self, snapshot_id: str) -> Snapshot:
        path = self.root / snapshot_id
        if not _ID.fullmatch(snapshot_id) or not (path / MARKER).is_file():
            known = ", ".join(s.id for s in self.all()) or "none"
            raise SnapshotError(f"no complete snapshot {snapshot_id!r} (known: {known})")
        return self._load(path)

    def _load(self, path: Path) -> Snapshot:
        try:
            data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            SnapshotManifest.read(data, path / MANIFEST)  # the file as written, checked
            manifest = data
        except (OSError, json.JSONDecodeError, ContractError) as exc:
            raise SnapshotError(f"snapshot {path.name}: unreadable manifest: {exc}") from exc
        return Snapshot(path.name, path, manifest)

    def lineage(self, snapshot: Snapshot) -> list[Snapshot]:
        """The snapshot and its ancestors, newest first."""
        chain = [snapshot]
        while chain[-1].parent:
            chain.append(self.get(chain[-1].parent))
        return chain

    def trained_ids(self, snapshot: Snapshot) -> set[str]:
        """Ids of every conversation the snapshot's weights have seen (with ancestors)."""
        ids: set[str] = set()
        for snap in self.lineage(snapshot):
            path = snap.path / CONVERSATIONS
            if path.is_file():
                ids.update(x for x in path.read_text(encoding="utf-8").split("\n") if x)
        return ids

    # -- evaluations ------------------------------------------------------------------

    def eval_dir(self, model_id: str, base_model: str = "") -> Path:
        if model_id == BASE_ID:
            path = self.root / BASE_ID / _slug(base_model) / "eval"
        else:
            path = self.get(model_id).path / "eval"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def evaluations(self, model_id: str, base_model: str = "") -> dict[str, Any]:
        """Task -> results stored for a snapshot (or the base model)."""
        if model_id == BASE_ID:
            path = self.root / BASE_ID / _slug(base_model) / "eval"
        else:
            path = self.root / model_id / "eval"
        out: dict[str, Any] = {}
        if path.is_dir():
            for f in sorted(path.glob("*.json")):
                out[f.stem] = json.loads(f.read_text(encoding="utf-8"))
        return out

    def describe(self, snapshot: Snapshot) -> dict[str, Any]:
        """What ``snapshots list --json`` prints for one snapshot."""
        return {
            "id": snapshot.id,
            "path": str(snapshot.path),
            "manifest": snapshot.manifest,
            "eval": self.evaluations(snapshot.id),
        }
