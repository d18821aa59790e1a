"""The versioned on-disk records: old files read, newer ones and broken ones refused."""

from __future__ import annotations

import json

import pytest

from corpusfactory.errors import ContractError
from corpusfactory.records import BuildRecord, ExportLine, SnapshotManifest

MANIFEST = {
    "id": "snap-00001-20261205T070000Z",
    "seq": 1,
    "parent": "",
    "base_model": "demo:generator",
    "created_at": 1.5,
    "conversations": 3,
    "offsets": {"0": {"start": 0, "end": 3}},
    "final_loss": 2.5,  # a training figure: kept as it is
}


def test_a_manifest_without_a_version_reads_as_version_1_and_keeps_its_extras() -> None:
    back = SnapshotManifest.read(json.loads(json.dumps(MANIFEST))).as_dict()
    assert back["record_version"] == 1
    assert {k: back[k] for k in MANIFEST} == MANIFEST
    assert SnapshotManifest.read(back).as_dict() == back


def test_a_newer_version_is_refused_with_the_version_named() -> None:
    with pytest.raises(ContractError, match=r"record_version 2 is newer .*\(1\)"):
        SnapshotManifest.read({**MANIFEST, "record_version": 2}, "x/manifest.json")


def test_missing_or_mistyped_fields_are_named() -> None:
    with pytest.raises(ContractError, match=r"snapshot manifest \(m\): id: .*; seq: "):
        SnapshotManifest.read({**{k: v for k, v in MANIFEST.items() if k != "id"},
                               "seq": "one"}, "m")  # fmt: skip
    with pytest.raises(ContractError, match="not a JSON object"):
        BuildRecord.read([1, 2])
    with pytest.raises(ContractError, match="build record: gate"):
        BuildRecord.read(
            {
                "snapshot": "s",
                "quant": "Q8_0",
                "path": "/x.gguf",
                "size_bytes": 10,
                "gate": "passed",
                "published": True,
                "built_at": 1.0,
            }
        )


def test_an_export_line_checks_its_turns() -> None:
    line = {
        "record_version": 1,
        "conversation_id": "c",
        "source": "selfchat",
        "truncated": False,
        "target_length": 2,
        "producer_id": "p",
        "generator": "g",
        "finished_at": 1.0,
        "turns": [
            {
                "turn_id": "c:0:0",
                "role": "user",
                "text": "Ciao",
                "nll": 1.0,
                "similarity": 0.1,
                "neighbour_id": "",
                "embedder": "e",
                "scorer": "s",
            }
        ],
    }
    assert ExportLine.read(line).turns[0].judge_score is None
    del line["turns"][0]["text"]  # type: ignore[index]
    with pytest.raises(ContractError, match=r"turns\.0\.text"):
        ExportLine.read(line)
