"""The corpus store on its own: shards, dedupe, crash repair, export, statistics."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from consumers.store import (
    CorpusStore,
    CorpusStoreError,
    Undecodable,
    corpus_dir,
    export_record,
    quantiles,
)
from corpusfactory.contract import (
    SCHEMA_VERSION,
    AcceptedConversation,
    AcceptedTurn,
    Decision,
    Reason,
)
from corpusfactory.records import ExportLine
from corpusfactory.settings import Settings


def conv(
    cid: str,
    n_turns: int = 2,
    *,
    truncated: bool = False,
    source: str = "selfchat",
    nll: float = 1.0,
) -> AcceptedConversation:
    turns = [
        AcceptedTurn(
            turn_id=f"{cid}-t{i}",
            role="user" if i % 2 == 0 else "assistant",
            text=f"Messaggio {i} di {cid}: perché sì, è così.",
            nll=nll + i / 10,
            similarity=0.5,
            neighbour_id="" if i == 0 else f"{cid}-t{i - 1}",
            embedder="emb",
            scorer="sc",
        )
        for i in range(n_turns)
    ]
    return AcceptedConversation(
        schema_version=SCHEMA_VERSION,
        conversation_id=cid,
        source=source,
        turns=turns,
        target_length=n_turns + (2 if truncated else 0),
        truncated=truncated,
        producer_id="p0",
        generator="gen",
        finished_at=1700000000.5,
    )


def decision(
    turn_id: str,
    accepted: bool,
    reason: str,
    nll: float,
    at: float = 1.0,
    replayed: bool = False,
) -> Decision:
    return Decision(
        replayed=replayed,
        schema_version=SCHEMA_VERSION,
        turn_id=turn_id,
        conversation_id="c",
        index=0,
        accepted=accepted,
        reason=reason,
        neighbour_id="",
        similarity=0.1,
        nll=nll,
        tokens=5,
        embedder="emb",
        scorer="sc",
        similarity_threshold=0.9,
        nll_threshold=2.0,
        decided_at=at,
    )


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_export_record_schema_and_order() -> None:
    rec = export_record(conv("a", 1))
    assert ExportLine.read(rec).as_dict() == rec  # the typed export line, version 1
    assert list(rec) == [
        "record_version",
        "conversation_id",
        "source",
        "truncated",
        "target_length",
        "producer_id",
        "generator",
        "finished_at",
        "turns",
    ]
    assert list(rec["turns"][0]) == [
        "turn_id",
        "role",
        "text",
        "nll",
        "similarity",
        "neighbour_id",
        "embedder",
        "scorer",
        "judge_score",
    ]
    assert rec["turns"][0]["judge_score"] is None  # not judged
    assert rec["turns"][0]["text"] == "Messaggio 0 di a: perché sì, è così."


def test_corpus_dir_from_settings(tmp_path: Path) -> None:
    s = Settings(state_dir=str(tmp_path / "st"))
    assert corpus_dir(s) == (tmp_path / "st" / "corpus").resolve()
    with CorpusStore.from_settings(s) as store:
        store.write_batch([conv("a")])
    assert (tmp_path / "st" / "corpus" / "accepted-00000.jsonl").is_file()


def test_shards_roll_after_n_lines(tmp_path: Path) -> None:
    with CorpusStore(tmp_path, shard_lines=2) as store:
        store.write_batch([conv("a"), conv("b"), conv("c")])
        store.write_batch([conv("d"), conv("e")])
        names = [p.name for p in store.shard_paths()["accepted"]]
    assert names == ["accepted-00000.jsonl", "accepted-00001.jsonl", "accepted-00002.jsonl"]
    assert [r["conversation_id"] for r in lines(tmp_path / "accepted-00002.jsonl")] == ["e"]
    # Reopening continues the last shard where it stopped, then rolls.
    with CorpusStore(tmp_path, shard_lines=2) as store:
        store.write_batch([conv("f"), conv("g")])
        names = [p.name for p in store.shard_paths()["accepted"]]
    assert names[-1] == "accepted-00003.jsonl"
    assert [r["conversation_id"] for r in lines(tmp_path / "accepted-00002.jsonl")] == ["e", "f"]
    assert [r["conversation_id"] for r in lines(tmp_path / "accepted-00003.jsonl")] == ["g"]


def test_decision_shards_roll_too(tmp_path: Path) -> None:
    with CorpusStore(tmp_path, shard_lines=3) as store:
        store.write_batch(decisions=[decision(f"t{i}", True, "accepted", 1.0) for i in range(7)])
    assert sorted(p.name for p in tmp_path.glob("decisions-*.jsonl")) == [
        "decisions-00000.jsonl",
        "decisions-00001.jsonl",
        "decisions-00002.jsonl",
    ]


def test_dedupe_within_batch_across_batches_and_reopen(tmp_path: Path) -> None:
    with CorpusStore(tmp_path) as store:
        r = store.write_batch([conv("a"), conv("a"), conv("b")])
        assert (r.accepted_written, r.accepted_skipped) == (2, 1)
        r = store.write_batch([conv("b"), conv("c")])
        assert (r.accepted_written, r.accepted_skipped) == (1, 1)
        assert "a" in store and len(store) == 3
    with CorpusStore(tmp_path) as store:
        r = store.write_batch([conv("a"), conv("c"), conv("d")])
        assert (r.accepted_written, r.accepted_skipped) == (1, 2)
        assert len(store) == 4
    got = [r["conversation_id"] for r in lines(tmp_path / "accepted-00000.jsonl")]
    assert got == ["a", "b", "c", "d"]


def test_identical_decisions_are_not_stored_twice(tmp_path: Path) -> None:
    d1 = decision("t1", False, "low_quality", 3.0, at=1.0)
    d2 = decision("t1", True, "accepted", 1.0, at=2.0)
    with CorpusStore(tmp_path) as store:
        r = store.write_batch(decisions=[d1, d1, d2])
        assert (r.decisions_written, r.decisions_skipped) == (2, 1)
    with CorpusStore(tmp_path) as store:
        r = store.write_batch(decisions=[d1, d2])
        assert (r.decisions_written, r.decisions_skipped) == (0, 2)
        st = store.stats()
    assert st["decision_records"] == 2
    assert st["turns"]["decided"] == 1
    # The first non-replayed decision counts (contract.count_decisions), as the
    # producer applied it and the report counts it.
    assert st["turns"]["accepted"] == 0


def test_torn_last_line_is_repaired_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with CorpusStore(tmp_path) as store:
        store.write_batch([conv("a"), conv("b")], decisions=[decision("t1", True, "accepted", 1)])
    shard = tmp_path / "accepted-00000.jsonl"
    good = shard.read_bytes()
    whole = json.dumps(export_record(conv("c")), ensure_ascii=False).encode()
    with shard.open("ab") as fh:
        fh.write(whole[: len(whole) // 2])
    dshard = tmp_path / "decisions-00000.jsonl"
    dgood = dshard.read_bytes()
    with dshard.open("ab") as fh:
        fh.write(b'{"turn_id": "t9", "acc')

    # A reader ignores the torn line and changes nothing.
    ro = CorpusStore(tmp_path, read_only=True)
    assert len(ro) == 2 and ro.stats()["corrupt_lines"] == 0
    assert shard.read_bytes() != good

    with caplog.at_level(logging.WARNING, logger="consumers.store"):
        store = CorpusStore(tmp_path)
    try:
        assert shard.read_bytes() == good
        assert dshard.read_bytes() == dgood
        assert {r.path.name for r in store.repairs} == {shard.name, dshard.name}
        assert [r.removed_bytes for r in store.repairs if r.path == shard] == [len(whole) // 2]
        assert "torn line" in caplog.text
        assert len(store) == 2 and "c" not in store
        # The conversation that was torn is written again when redelivered.
        r = store.write_batch([conv("c")])
        assert r.accepted_written == 1
    finally:
        store.close()
    assert [r["conversation_id"] for r in lines(shard)] == ["a", "b", "c"]


def test_torn_line_that_is_the_whole_file(tmp_path: Path) -> None:
    (tmp_path / "accepted-00000.jsonl").write_bytes(b'{"conversation_id": "x", "tu')
    with CorpusStore(tmp_path) as store:
        assert len(store) == 0
        assert store.repairs[0].kept_bytes == 0
    assert (tmp_path / "accepted-00000.jsonl").read_bytes() == b""


def test_corrupt_interior_line_is_skipped_and_counted(tmp_path: Path) -> None:
    with CorpusStore(tmp_path) as store:
        store.write_batch([conv("a")])
    shard = tmp_path / "accepted-00000.jsonl"
    with shard.open("ab") as fh:
        fh.write(b"not json\n")
    with CorpusStore(tmp_path) as store:
        store.write_batch([conv("b")])
        assert store.stats()["corrupt_lines"] == 1
        assert [c["conversation_id"] for c in store.iter_conversations()] == ["a", "b"]


def test_export_order_filter_and_exact_content(tmp_path: Path) -> None:
    store_dir = tmp_path / "corpus"
    batches = [[conv("z"), conv("m", truncated=True)], [conv("a", 3)], [conv("k", truncated=True)]]
    with CorpusStore(store_dir, shard_lines=2) as store:
        for b in batches:
            store.write_batch(b)
        out = tmp_path / "out" / "corpus.jsonl"
        assert store.export(out) == 4
        expected = "".join(
            json.dumps(export_record(c), ensure_ascii=False, separators=(",", ":")) + "\n"
            for b in batches
            for c in b
        )
        assert out.read_text(encoding="utf-8") == expected
        assert store.export(out, include_truncated=False) == 2
        assert [r["conversation_id"] for r in lines(out)] == ["z", "a"]
        assert not list(out.parent.glob(".*tmp*"))
    # A read-only store exports the same.
    assert CorpusStore(store_dir, read_only=True).export(tmp_path / "ro.jsonl") == 4


def test_stats_math(tmp_path: Path) -> None:
    decs = [
        decision("t1", True, "accepted", 1.0),
        decision("t2", True, "accepted", 2.0),
        decision("t3", False, "duplicate", 3.0),
        decision("t4", False, "low_quality", 4.0),
        # Only a replay of t5 came first: its first non-replayed decision counts.
        decision("t5", False, "low_quality", 5.0, replayed=True),
        decision("t5", True, "accepted", 0.5, at=2.0),
        decision("t2", False, "duplicate", 2.0, at=3.0),  # a re-decision: the first counts
        decision("t6", False, "empty", 0.0),
    ]
    bad = Undecodable("corpus.accepted", 0, 7, b"k", b"\xff garbage", "not UTF-8")
    with CorpusStore(tmp_path) as store:
        store.write_batch(
            [conv("a", 2, nll=1.0), conv("b", 4, source="oasst"), conv("c", 3, truncated=True)],
            decs,
            [bad, bad],
        )
        store.write_batch(undecodable=[bad])
        st = store.stats()
    assert st["conversations"] == {
        "total": 3,
        "truncated": 1,
        "complete": 2,
        "by_source": {"oasst": 1, "selfchat": 2},
        "messages": 9,
        "mean_messages": 3.0,
    }
    turns = st["turns"]
    assert turns["decided"] == 6
    assert turns["accepted"] == 3
    assert turns["rejected"] == 3
    assert turns["acceptance_rate"] == pytest.approx(0.5)
    # every contract reason, zeros included
    assert turns["by_reason"] == {
        **{r.value: 0 for r in Reason},
        "accepted": 3,
        "duplicate": 1,
        "low_quality": 1,
        "empty": 1,
    }
    # accepted NLLs: 0.5, 1, 2 -> p10 = 0.5 + 0.2*0.5, p25 = 0.75, p50 = 1, p75 = 1.5, p90 = 1.8
    assert turns["nll_accepted"] == pytest.approx(
        {"p10": 0.6, "p25": 0.75, "p50": 1.0, "p75": 1.5, "p90": 1.8}
    )
    # all NLLs: 0, 0.5, 1, 2, 3, 4 (positions q*5)
    assert turns["nll_decided"] == pytest.approx(
        {"p10": 0.25, "p25": 0.625, "p50": 1.5, "p75": 2.75, "p90": 3.5}
    )
    assert st["undecodable"] == 1
    assert st["decision_records"] == 8
    # The same figures after reopening (rebuilt from the shards).
    with CorpusStore(tmp_path) as store:
        assert store.stats() == st
    rec = lines(tmp_path / "undecodable-00000.jsonl")
    assert rec == [
        {
            "topic": "corpus.accepted",
            "partition": 0,
            "offset": 7,
            "key": "k",
            "value": "\ufffd garbage",
            "error": "not UTF-8",
        }
    ]


def test_empty_store_stats(tmp_path: Path) -> None:
    with CorpusStore(tmp_path) as store:
        st = store.stats()
    assert st["conversations"]["mean_messages"] is None
    assert st["turns"]["acceptance_rate"] is None
    assert st["turns"]["nll_accepted"] == dict.fromkeys(("p10", "p25", "p50", "p75", "p90"))


def test_quantiles_single_value() -> None:
    assert quantiles([2.5]) == dict.fromkeys(("p10", "p25", "p50", "p75", "p90"), 2.5)


def test_single_writer_lock(tmp_path: Path) -> None:
    with CorpusStore(tmp_path):
        with pytest.raises(CorpusStoreError, match="open for writing elsewhere"):
            CorpusStore(tmp_path)
        CorpusStore(tmp_path, read_only=True)  # readers are welcome
    with CorpusStore(tmp_path):
        pass


def test_read_only_refuses_writes_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CorpusStoreError, match="no corpus store"):
        CorpusStore(tmp_path / "nope", read_only=True)
    CorpusStore(tmp_path).close()
    with pytest.raises(CorpusStoreError, match="read-only"):
        CorpusStore(tmp_path, read_only=True).write_batch([conv("a")])


def test_failed_write_blocks_the_store_until_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CorpusStore(tmp_path)
    real_fsync = os.fsync

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("consumers.store.shards.os.fsync", boom)
    with pytest.raises(CorpusStoreError, match="No space left"):
        store.write_batch([conv("a")])
    monkeypatch.setattr("consumers.store.shards.os.fsync", real_fsync)
    assert "a" not in store  # not indexed: a redelivery will write it
    with pytest.raises(CorpusStoreError, match="reopen"):
        store.write_batch([conv("b")])
    store.close()
    with CorpusStore(tmp_path) as store:
        # The line did reach the page cache, so it is there after reopening; no dupes.
        store.write_batch([conv("a"), conv("b")])
        assert [c["conversation_id"] for c in store.iter_conversations()] == ["a", "b"]
