"""The trainer's window: the conversations read since the last snapshot (``Pending``),
which of them a snapshot trains on and which it holds out (``select_window``), the
conversations from the topic's start (``init: base``), and the records of failed
windows that start where the window starts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kafka.structs import TopicPartition

from corpusfactory.contract import decode_accepted
from corpusfactory.failures import FailureRecords
from corpusfactory.kafka_clients import assign, read_until
from corpusfactory.kafka_clients import consumer as kafka_consumer
from corpusfactory.settings import Settings, TrainingSettings
from training.data import TrainingConversation, read_jsonl, split
from training.snapshots import HELDOUT, Snapshot, SnapshotStore


@dataclass
class Pending:
    """Conversations read since the last snapshot, and how far each partition was read."""

    conversations: list[TrainingConversation] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)
    undecodable: int = 0

    def trainable(self, t: Any, after: dict[int, int] | None = None) -> int:
        """Trainable conversations; with ``after``, only those at or past its offsets."""
        after = after or {}
        return sum(
            1
            for c in self.conversations
            if c.offset >= after.get(c.partition, 0)
            and split(
                c,
                heldout_percent=t.heldout_percent,
                sources=t.sources,
                include_truncated=t.include_truncated,
            )
            == "train"
        )


def select_window(
    window: list[TrainingConversation],
    parent: Snapshot | None,
    store: SnapshotStore,
    t: TrainingSettings,
    undecodable: int,
) -> tuple[list[TrainingConversation], list[TrainingConversation], Counter[str]]:
    """(to train on, held out, counts of the rest by kind) of ``window``, after ``parent``:
    conversations ``parent``'s lineage trained on are skipped, its held-out ones kept."""
    seen = store.trained_ids(parent) if parent else set()
    heldout: dict[str, TrainingConversation] = {}
    if parent is not None and (parent.path / HELDOUT).is_file():
        heldout = {c.conversation_id: c for c in read_jsonl(parent.path / HELDOUT)}
    counts: Counter[str] = Counter()
    if undecodable:
        counts["undecodable"] = undecodable
    train: list[TrainingConversation] = []
    for conv in window:
        kind = split(
            conv,
            heldout_percent=t.heldout_percent,
            sources=t.sources,
            include_truncated=t.include_truncated,
        )
        if kind == "heldout":
            heldout.setdefault(conv.conversation_id, conv)
        elif kind != "train":
            counts[kind] += 1
        elif conv.conversation_id in seen:
            counts["already_trained"] += 1
        else:
            seen.add(conv.conversation_id)
            train.append(conv)
    return train, list(heldout.values()), counts


def read_from_start(
    settings: Settings,
    bootstrap: str,
    topic: str,
    tps: list[TopicPartition],
    positions: dict[int, int],
) -> list[TrainingConversation]:
    """Every conversation from the topic's start to ``positions`` (init: base)."""
    consumer = kafka_consumer(settings.kafka, bootstrap, group_id=None)
    try:
        parts = [tp.partition for tp in tps]
        assign(consumer, topic, "beginning", partitions=parts)
        goal = {tp: positions[tp.partition] for tp in tps}
        # An undecodable record is skipped (it was counted when first read).
        return [
            TrainingConversation.from_accepted(conv, tp.partition, offset)
            for tp, offset, conv in read_until(consumer, goal, decode_accepted)
        ]
    finally:
        consumer.close(autocommit=False)


def failures_after(
    failures: FailureRecords, topic: str, latest: Snapshot | None
) -> dict[str, dict[str, Any]]:
    """Records of failed windows of ``topic`` that started after ``latest``."""
    after = latest.id if latest else ""
    return {
        item: rec
        for item, rec in failures.all().items()
        if rec.get("topic") == topic
        and rec.get("after_snapshot") == after
        and isinstance(rec.get("ends"), dict)
    }


def manifest_ends(snap: Snapshot | None) -> dict[int, int]:
    """The end offset of each partition in ``snap``'s manifest (none without a snapshot)."""
    if snap is None:
        return {}
    parts = snap.manifest.get("offsets", {})
    return {int(p): int(v["end"]) for p, v in parts.items()}
