"""Helpers for the trainer tests: accepted conversations on a real topic, trainer settings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from corpusfactory.chatformat import Message
from corpusfactory.contract import (
    ACCEPTED,
    SCHEMA_VERSION,
    AcceptedConversation,
    AcceptedTurn,
    encode,
)
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import Settings
from tests.integration.conftest import make_settings
from training.data import TrainingConversation, split


def trainer_settings(
    tmp_path: Path,
    bootstrap: str,
    prefix: str,
    evaluation: dict[str, Any] | None = None,
    **training: Any,
) -> Settings:
    values: dict[str, Any] = {
        "base_model": "demo:generator",
        "deepspeed_config": "cpu",
        "seq_len": 128,
        "micro_batch_size": 4,
        "epochs": 2,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "heldout_percent": 10,
        "poll_timeout_s": 0.5,
        "trigger": {"every_conversations": 10},
    }
    values.update(training)
    settings = make_settings(
        tmp_path / "state", bootstrap, prefix, training=values, evaluation=evaluation or {}
    )
    ensure_topics(settings, bootstrap)
    return settings


def seed_conversations(start: int, count: int, tag: str) -> list[tuple[str, list[Message]]]:
    """``count`` distinct conversations (built-in seeds, cycled) with fresh ids."""
    seeds = load_seeds()
    out = []
    for i in range(start, start + count):
        seed = seeds[i % len(seeds)]
        out.append((f"{tag}-{i:04d}", list(seed.messages)))
    return out


def publish(
    bootstrap: str,
    settings: Settings,
    conversations: list[tuple[str, list[Message]]],
    source: str = "selfchat",
) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for conv_id, messages in conversations:
            record = AcceptedConversation(
                schema_version=SCHEMA_VERSION,
                conversation_id=conv_id,
                source=source,
                turns=[
                    AcceptedTurn(
                        turn_id=f"{conv_id}:{i}",
                        role=m.role,
                        text=m.text,
                        nll=1.0,
                        similarity=0.1,
                        neighbour_id="",
                        embedder="e",
                        scorer="s",
                    )
                    for i, m in enumerate(messages)
                ],
                target_length=len(messages),
                finished_at=time.time(),
            )
            producer.send(settings.topic(ACCEPTED), key=conv_id.encode(), value=encode(record))
        producer.flush(timeout=30)
    finally:
        producer.close()


def trainable_ids(settings: Settings, ids: list[str]) -> set[str]:
    t = settings.training
    return {
        i
        for i in ids
        if split(
            TrainingConversation(i, "selfchat", ()),
            heldout_percent=t.heldout_percent,
            sources=t.sources,
            include_truncated=t.include_truncated,
        )
        == "train"
    }


def committed_offsets(bootstrap: str, settings: Settings) -> dict[int, int | None]:
    topic = settings.topic(ACCEPTED)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=f"{settings.kafka.topic_prefix}{settings.training.group_id}",
        enable_auto_commit=False,
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return {p: consumer.committed(TopicPartition(topic, p)) for p in sorted(parts)}
    finally:
        consumer.close(autocommit=False)
