"""End to end through the real broker, real Milvus Lite and the real models.

The session's default stack (one admitter, one scorer; ``default_stack``) serves the
self-chat run, the poison events and the replay. Other modules share it, so each
test checks its own conversations; the replay runs last here and replays every
candidate of the shared topic, and pauses the admitter to read the index (Milvus
Lite allows one process per file).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import pytest

from consumers.store import CorpusStore
from consumers.writer import CorpusWriter
from corpusfactory import contract
from corpusfactory.engines.index import VectorIndex
from corpusfactory.engines.models.demo import resolve_model
from corpusfactory.seeds import load_seeds, seed_messages
from corpusfactory.settings import Settings
from corpusfactory.tools.stack import WorkerProcess
from producers.generators.factory import make_generator
from producers.service import SelfChatProducer
from tests.integration.pipeline_util import (
    DecisionLog,
    Stack,
    TopicTail,
    candidate,
    check_i1,
    check_i2,
    check_i3,
    check_i4,
    dead_letters,
    producer,
    read_topic,
    wait_dead_letters,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(default_stack: Stack) -> Stack:
    return default_stack


def producer_scope(producer_id: str):
    """The conversations of one producer (its ids start with the producer id)."""
    return lambda conversation_id: conversation_id.startswith(f"{producer_id}-")


def run_producer(settings: Settings, bootstrap: str, conversations: int, producer_id: str):
    settings = settings.model_copy(deep=True)
    settings.producer.conversations = conversations
    settings.producer.producer_id = producer_id  # its own state file and decision group
    gen = make_generator(settings.producer, resolve_model(settings.models.generator), "cpu")
    try:
        # A producer waits on each turn's decision: bounded, so that a stack that stopped
        # deciding fails this test in minutes, not at the suite's per-test timeout.
        return asyncio.run(asyncio.wait_for(SelfChatProducer(settings, bootstrap, gen).run(), 300))
    finally:
        gen.close()


def export(settings: Settings, bootstrap: str, tmp_path) -> list[dict]:
    with CorpusWriter(settings, bootstrap) as writer:
        assert writer.run_once(60.0).drained
    out = tmp_path / "corpus.jsonl"
    CorpusStore(settings.state_path / "corpus", read_only=True).export(out)
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_selfchat_conversations_reach_the_accepted_corpus(stack, embedder, tmp_path) -> None:
    s = stack.settings
    mine = producer_scope("p-main")
    stats = run_producer(s, stack.bootstrap, conversations=6, producer_id="p-main")
    assert stats.finished + stats.truncated == 6
    assert stats.published >= 1
    assert sum(stats.decisions.values()) >= stats.candidates_sent - stats.resent

    published = [
        (rec, conv)
        for rec in read_topic(stack.bootstrap, s.topic(contract.ACCEPTED))
        if mine((conv := contract.decode_accepted(rec.value)).conversation_id)
    ]
    assert len(published) == stats.published
    for rec, conv in published:
        assert rec.key == conv.conversation_id.encode()
        roles = [t.role for t in conv.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        if not conv.truncated:
            assert len(conv.turns) == conv.target_length
            assert 4 <= conv.target_length <= 5

    decisions = check_i1(stack.bootstrap, s, mine)
    stored = export(s, stack.bootstrap, tmp_path)
    check_i2(stored)  # I2 and I3 hold for everything stored, whoever sent it
    check_i3(stored, embedder, s.admission.similarity_threshold)
    corpus = [conv for conv in stored if mine(conv["conversation_id"])]
    assert len(corpus) == stats.published
    for conv in corpus:
        assert conv["source"] == "selfchat"
        for turn in conv["turns"]:
            d = decisions[turn["turn_id"]][0]
            assert d.accepted
            assert turn["nll"] == pytest.approx(d.nll)
            assert turn["nll"] < d.nll_threshold
            assert turn["similarity"] <= s.admission.similarity_threshold
            assert turn["neighbour_id"] == d.neighbour_id
            assert turn["embedder"].endswith("model") and turn["scorer"]
    # every decision carries its evidence and the thresholds in force
    for ds in decisions.values():
        d = ds[0]
        assert d.similarity_threshold == s.admission.similarity_threshold
        assert d.nll_threshold > 0 and d.embedder and d.scorer
        if d.reason in ("accepted", "duplicate", "low_quality"):
            assert d.neighbour_id and d.tokens > 0 and d.nll > 0
        # the LLM judge is off (the default): nothing is judged
        assert (d.judge_score, d.judge_threshold, d.judge) == (None, None, "")
    assert all(t["judge_score"] is None for conv in corpus for t in conv["turns"])
    # each assistant candidate carries the accepted user turn it answers, for a judge
    cands = [  # a candidate's key is its conversation id
        contract.decode_candidate(r.value, s.admission.max_event_chars)
        for r in read_topic(stack.bootstrap, s.topic(contract.CANDIDATES))
        if r.key is not None and mine(r.key.decode("utf-8", "replace"))
    ]
    assert {c.turn_id for c in cands} == set(decisions)
    accepted_text = {
        (c.conversation_id, c.index): c.text for c in cands if decisions[c.turn_id][0].accepted
    }
    assistants = [c for c in cands if c.role == "assistant"]
    assert assistants
    for c in cands:
        if c.role == "assistant":
            assert c.prompt == accepted_text[(c.conversation_id, c.index - 1)], c.turn_id
        else:
            assert c.prompt == "", c.turn_id


POISON = {
    "invalid_json": b'{"schema_version": 1, "turn_id": ',
    "wrong_schema": json.dumps({"schema_version": 99, "turn_id": "x"}).encode(),
    "not_utf8": b'{"schema_version": 1, "text": "\xff\xfe"}',
    "null_value": None,
    "not_an_object": b"[1, 2, 3]",
}


def test_poison_events_land_on_the_dead_letter_topic(stack) -> None:
    s = stack.settings
    topic = s.topic(contract.CANDIDATES)
    conv = f"poison-{uuid.uuid4().hex[:6]}"
    empty = contract.encode(candidate(conv, 0, "x")).replace(b'"text": "x"', b'"text": ""')
    oversized = contract.encode(candidate(conv, 0, "parola " * 20_000, attempt=1))
    missing = json.loads(contract.encode(candidate(conv, 0, "ciao")))
    del missing["role"]
    poison = {
        **POISON,
        "empty_text": empty,
        "oversized": oversized,
        "missing_field": json.dumps(missing).encode(),
    }
    prod = producer(stack.bootstrap)
    sent = {}
    for i, (name, value) in enumerate(poison.items()):
        meta = prod.send(topic, key=conv.encode(), value=value).get(timeout=30)
        sent[name] = (meta.partition, meta.offset)
        good = candidate(f"{conv}-ok{i}", 0, f"Domanda numero {i}: come si prepara il pane?")
        prod.send(topic, key=good.conversation_id.encode(), value=contract.encode(good))
    prod.flush()
    prod.close()

    letters = wait_dead_letters(stack.bootstrap, s, topic, set(sent.values()), len(poison), 120)
    got = {(d.origin_partition, d.origin_offset): d for d in letters}
    assert len(letters) == len(poison)  # each poison event once
    for name, where in sent.items():
        d = got[where]
        assert d.origin_topic == topic and d.stage == "decode" and d.error, name
    assert "not UTF-8" in got[sent["not_utf8"]].error
    assert got[sent["null_value"]].value is None
    assert "schema_version" in got[sent["wrong_schema"]].error
    assert "empty" in got[sent["empty_text"]].error

    # the valid events on the same partitions kept flowing
    with DecisionLog(stack.bootstrap, s) as log:
        wait_for(
            lambda: all(f"{conv}-ok{i}:0:0" in log.by_turn() for i in range(len(poison))),
            120,
            "decisions for the valid events",
        )


def test_poison_decisions_are_dead_lettered_by_the_producer(stack) -> None:
    s = stack.settings
    candidates = TopicTail(stack.bootstrap, s.topic(contract.CANDIDATES))
    letters = TopicTail(stack.bootstrap, s.topic(contract.DEADLETTER))
    n_candidates, n_letters = len(candidates.read()), len(letters.read())
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            stats=run_producer(s, stack.bootstrap, conversations=1, producer_id="p-poison")
        )
    )
    try:
        worker.start()
        # once the producer has sent a candidate it holds its decision partitions
        wait_for(
            lambda: len(candidates.read()) > n_candidates, 120, "the producer's first candidate"
        )
        prod = producer(stack.bootstrap)
        bad_reason = json.dumps({"schema_version": 1, "turn_id": "x", "reason": "meh"}).encode()
        for value in (b"{not json", bad_reason):
            prod.send(s.topic(contract.DECISIONS), key=b"poison", value=value, partition=0)
        prod.flush()
        prod.close()
        worker.join(timeout=300)
        assert not worker.is_alive() and result["stats"].finished + result["stats"].truncated == 1
        new = dead_letters(letters.read()[n_letters:])
    finally:
        candidates.close()
        letters.close()
    mine = [d for d in new if d.stage == "producer"]
    assert len(mine) == 2
    assert all(d.origin_topic == s.topic(contract.DECISIONS) for d in mine)
    assert {d.value for d in mine} == {"{not json", bad_reason.decode()}


def test_replay_from_the_beginning_accepts_nothing_new(stack) -> None:
    """Runs last: a second scorer group replays every candidate, then the index is checked."""
    s = stack.settings
    topic = s.topic(contract.CANDIDATES)
    with DecisionLog(stack.bootstrap, s) as log:
        n_before = log.count()
        # Every candidate is decided again, but those dead-lettered (poison, the other
        # modules' pills and conflicts), which are dead-lettered again.
        dead = {
            (d.origin_partition, d.origin_offset)
            for d in dead_letters(read_topic(stack.bootstrap, s.topic(contract.DEADLETTER)))
            if d.origin_topic == topic
        }
        n_candidates = len(read_topic(stack.bootstrap, topic)) - len(dead)
        replay_settings = s.model_copy(deep=True)
        replay_settings.worker.app_id = s.worker.app_id + "-replay"  # a fresh group: offset 0
        replayer = WorkerProcess(replay_settings, "scorer", name="scorer-replay").start()

        def replayed() -> dict:
            ds = log.by_turn()
            return ds if sum(map(len, ds.values())) >= n_before + n_candidates else {}

        try:
            replayer.wait_ready()
            after = wait_for(replayed, 240, "replayed decisions")
        finally:
            replayer.stop()
    for turn_id, ds in after.items():
        first, rest = ds[0], ds[1:]
        for d in rest:
            assert d.accepted == first.accepted and d.reason == first.reason, turn_id
            if d.accepted:
                assert d.replayed
    accepted = {t for t, ds in after.items() if ds[0].accepted}
    with stack.admitter_paused():
        index = VectorIndex.from_settings(s, 384)
        try:
            n_seeds = len(seed_messages(load_seeds(s.producer.seed_file)))
            check_i4(index, accepted, n_seeds)
        finally:
            index.close()
