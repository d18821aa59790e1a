"""Helpers for the end-to-end tests: read topics, check invariants I1-I4."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from corpusfactory import contract
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.settings import Settings
from corpusfactory.tools.stack import WorkerProcess


@dataclass
class Stack:
    settings: Settings
    bootstrap: str
    admitter: WorkerProcess
    scorer: WorkerProcess


@contextmanager
def worker_stack(settings: Settings, bootstrap: str) -> Iterator[Stack]:
    """The topics, one admitter and one scorer, ready; both stopped on exit."""
    ensure_topics(settings, bootstrap)
    admitter = WorkerProcess(settings, "admitter").start()
    scorer = WorkerProcess(settings, "scorer").start()
    try:
        admitter.wait_ready()
        scorer.wait_ready()
        yield Stack(settings, bootstrap, admitter, scorer)
    finally:
        scorer.stop()
        admitter.stop()


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record now in a topic, in partition order (no consumer group)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end")
            for recs in consumer.poll(timeout_ms=500).values():
                out.extend(recs)
        return out
    finally:
        consumer.close()


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all")


def candidate(
    conv: str, index: int, text: str, attempt: int = 0, prompt: str = ""
) -> contract.CandidateTurn:
    return contract.CandidateTurn(
        schema_version=contract.SCHEMA_VERSION,
        turn_id=f"{conv}:{index}:{attempt}",
        conversation_id=conv,
        index=index,
        role="user" if index % 2 == 0 else "assistant",
        text=text,
        source="test",
        attempt=attempt,
        created_at=time.time(),
        prompt=prompt,
    )


def decisions_by_turn(bootstrap: str, settings: Settings) -> dict[str, list[contract.Decision]]:
    out: dict[str, list[contract.Decision]] = defaultdict(list)
    for rec in read_topic(bootstrap, settings.topic(contract.DECISIONS)):
        if rec.key == b"poison":
            continue  # planted by the producer's dead-letter test
        d = contract.decode_decision(rec.value)
        out[d.turn_id].append(d)
    return out


def candidate_ids(bootstrap: str, settings: Settings) -> set[str]:
    ids = set()
    for rec in read_topic(bootstrap, settings.topic(contract.CANDIDATES)):
        ids.add(json.loads(rec.value)["turn_id"])
    return ids


def check_i1(bootstrap: str, settings: Settings) -> dict[str, list[contract.Decision]]:
    """I1: every candidate has decisions, all agreeing, and none is dead-lettered."""
    decisions = decisions_by_turn(bootstrap, settings)
    cands = candidate_ids(bootstrap, settings)
    dead = read_topic(bootstrap, settings.topic(contract.DEADLETTER))
    assert not dead, f"valid events were dead-lettered: {[r.value[:200] for r in dead]}"
    missing = cands - set(decisions)
    assert not missing, f"candidates without a decision: {sorted(missing)[:5]}"
    for turn_id, ds in decisions.items():
        verdicts = {(d.accepted, d.reason) for d in ds}
        assert len(verdicts) == 1, f"{turn_id} decided differently: {verdicts}"
    return decisions


def check_i2(conversations: list[dict[str, Any]]) -> None:
    """I2: no turn id and no identical text twice in the accepted corpus."""
    turns = [t for c in conversations for t in c["turns"]]
    ids = [t["turn_id"] for t in turns]
    texts = [t["text"] for t in turns]
    assert len(ids) == len(set(ids)), "a turn id appears twice"
    assert len(texts) == len(set(texts)), "an identical text appears twice"
    conv_ids = [c["conversation_id"] for c in conversations]
    assert len(conv_ids) == len(set(conv_ids)), "a conversation appears twice"


def check_i3(conversations: list[dict[str, Any]], embedder: Any, threshold: float) -> float:
    """I3: brute force over all accepted turns; returns the largest cosine seen."""
    texts = [t["text"] for c in conversations for t in c["turns"]]
    if len(texts) < 2:
        return 0.0
    v = embedder.encode(texts)
    sims = v @ v.T
    np.fill_diagonal(sims, -1.0)
    worst = float(sims.max())
    assert worst <= threshold + 1e-5, f"two accepted turns have cosine {worst:.4f} > {threshold}"
    return worst


def check_i4(index: Any, accepted_turn_ids: set[str], seed_count: int) -> None:
    """I4: one vector per accepted turn plus the seeds, unique keys."""
    refs = index.refs()
    assert len(refs) == len(set(refs)), "duplicate references in the index"
    turn_refs = {r for r in refs if not r.startswith("seed:")}
    assert turn_refs == accepted_turn_ids
    assert len(refs) - len(turn_refs) == seed_count


def n_decisions(bootstrap: str, settings: Settings) -> int:
    return sum(len(v) for v in decisions_by_turn(bootstrap, settings).values())


def check_all_invariants(bootstrap: str, settings: Settings, embedder: Any) -> list[dict[str, Any]]:
    """After a fault scenario, with every worker stopped: drain the corpus, check I1-I4.

    Returns the stored conversations.
    """
    from consumers.store import CorpusStore
    from consumers.writer import CorpusWriter
    from corpusfactory.engines.index import VectorIndex
    from corpusfactory.seeds import load_seeds, seed_messages

    decisions = check_i1(bootstrap, settings)
    with CorpusWriter(settings, bootstrap) as writer:
        assert writer.run_once(60.0).drained
    store = CorpusStore(settings.state_path / "corpus", read_only=True)
    corpus = list(store.iter_conversations())
    check_i2(corpus)
    check_i3(corpus, embedder, settings.admission.similarity_threshold)
    accepted = {t for t, ds in decisions.items() if ds[0].accepted}
    index = VectorIndex.from_settings(settings, embedder.dim)  # the admitter is stopped
    try:
        check_i4(index, accepted, len(seed_messages(load_seeds(settings.producer.seed_file))))
    finally:
        index.close()
    return corpus
