"""Typed, versioned records the project writes to disk (the events on Kafka are in
:mod:`corpusfactory.contract`):

* :class:`SnapshotManifest`, a snapshot's ``manifest.json`` (``training.snapshots``);
* :class:`BuildRecord`, a GGUF build's ``<quant>.json`` (``serving.builds``);
* :class:`ExportLine`, one line of ``corpus export`` (``consumers.store``).

Each carries a ``record_version``. A file written before versions existed has none
and reads as version 1; a version newer than this code knows is refused with a
ContractError naming the file's version, as is a record that lacks a required field
or has one of the wrong type. Fields beyond the required ones (a manifest's training
statistics, a build's timing) are kept as they are, so a newer writer's additions
survive a read and a write by an older reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from corpusfactory.errors import ContractError


class _VersionedRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    VERSION: ClassVar[int] = 1
    KIND: ClassVar[str] = "record"

    record_version: int = 1

    @classmethod
    def read(cls, data: Any, where: str | Path = "") -> Any:
        """Validate ``data`` (a parsed JSON object); ContractError names ``where``."""
        at = f" ({where})" if where else ""
        if not isinstance(data, dict):
            raise ContractError(f"{cls.KIND}{at}: not a JSON object")
        version = data.get("record_version", 1)
        if not isinstance(version, int) or version > cls.VERSION:
            raise ContractError(
                f"{cls.KIND}{at}: record_version {version!r} is newer than this "
                f"corpusfactory reads ({cls.VERSION}); upgrade it"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(record)'}: {e['msg']}" for e in exc.errors()
            )
            raise ContractError(f"{cls.KIND}{at}: {problems}") from None

    def as_dict(self) -> dict[str, Any]:
        """The record to write: its version, then the fields it was given (defaults
        of fields it was not given are not added)."""
        data = self.model_dump(mode="json", exclude_unset=True)
        data.pop("record_version", None)
        return {"record_version": self.record_version, **data}


class SnapshotManifest(_VersionedRecord):
    """What a snapshot is: id, lineage, the data it was trained on, the run's figures."""

    KIND: ClassVar[str] = "snapshot manifest"

    id: str
    seq: int
    parent: str = ""
    base_model: str = ""
    created_at: float = 0.0
    conversations: int = 0
    offsets: dict[str, dict[str, int]] = {}


class BuildRecord(_VersionedRecord):
    """A gated GGUF build of a snapshot: where it is, its gate figures, whether it was
    published (passed its gate)."""

    KIND: ClassVar[str] = "build record"

    snapshot: str
    quant: str
    path: str
    size_bytes: int
    gate: dict[str, Any]
    published: bool
    built_at: float


class ExportTurn(BaseModel):
    turn_id: str
    role: str
    text: str
    nll: float
    similarity: float
    neighbour_id: str
    embedder: str
    scorer: str
    judge_score: float | None = None


class ExportLine(_VersionedRecord):
    """One accepted conversation in the export file (``corpus export``)."""

    KIND: ClassVar[str] = "export line"

    conversation_id: str
    source: str
    truncated: bool
    target_length: int
    producer_id: str
    generator: str
    finished_at: float
    turns: list[ExportTurn]
