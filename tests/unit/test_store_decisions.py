"""``CorpusStore.iter_decisions``: every stored decision record, corrupt lines skipped."""

from __future__ import annotations

from pathlib import Path

from consumers.store import CorpusStore
from corpusfactory.contract import SCHEMA_VERSION, Decision


def decision(turn_id: str, reason: str, *, replayed: bool = False, at: float = 1.0) -> Decision:
    return Decision(
        schema_version=SCHEMA_VERSION,
        turn_id=turn_id,
        conversation_id="c",
        index=0,
        accepted=reason == "accepted",
        reason=reason,
        neighbour_id="n",
        similarity=0.25,
        nll=1.5,
        tokens=5,
        embedder="emb",
        scorer="sc",
        similarity_threshold=0.9,
        nll_threshold=2.0,
        replayed=replayed,
        decided_at=at,
        source="fauno",
    )


def test_iter_decisions_yields_every_record_in_order(tmp_path: Path) -> None:
    with CorpusStore(tmp_path / "c") as store:
        store.write_batch(decisions=[decision("a", "accepted"), decision("b", "duplicate")])
        # A replay of a's decision is a new record; an identical one is not stored twice.
        store.write_batch(
            decisions=[decision("a", "accepted", replayed=True, at=2.0), decision("b", "duplicate")]
        )
        got = list(store.iter_decisions())
    assert [(d["turn_id"], d["replayed"]) for d in got] == [("a", False), ("b", False), ("a", True)]
    first = got[0]
    assert first["reason"] == "accepted" and first["accepted"] is True
    assert first["source"] == "fauno" and first["similarity"] == 0.25 and first["decided_at"] == 1.0
    # The read-only view of the same shards yields the same records.
    assert list(CorpusStore(tmp_path / "c", read_only=True).iter_decisions()) == got


def test_iter_decisions_skips_corrupt_and_torn_lines(tmp_path: Path) -> None:
    root = tmp_path / "c"
    with CorpusStore(root) as store:
        store.write_batch(decisions=[decision("a", "accepted")])
    shard = root / "decisions-00000.jsonl"
    with shard.open("ab") as fh:
        fh.write(b"not json\n")
        fh.write(b'{"turn_id": "x", "accepted": "yes", "reason": "accepted", "nll": 1}\n')
        fh.write(b"[1, 2]\n")
    with CorpusStore(root) as store:  # a writer keeps the bad lines (they are complete)
        store.write_batch(decisions=[decision("b", "low_quality")])
    with shard.open("ab") as fh:
        fh.write(b'{"turn_id": "torn", "accep')  # a write in progress
    reader = CorpusStore(root, read_only=True)
    assert [d["turn_id"] for d in reader.iter_decisions()] == ["a", "b"]
    assert reader.stats()["corrupt_lines"] == 3


def test_iter_decisions_of_an_empty_store(tmp_path: Path) -> None:
    with CorpusStore(tmp_path / "c") as store:
        assert list(store.iter_decisions()) == []
