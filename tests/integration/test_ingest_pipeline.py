"""``corpusfactory ingest`` end to end: the real broker, scorer, admitter and Milvus Lite.

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_ingest_pipeline.py``

The session's default stack (one admitter, one scorer; ``default_stack``, shared
with ``test_pipeline.py`` and ``test_poison_pills.py``) decides the turns of two team
fixtures, ``fauno.json`` and ``chats.jsonl``, ingested once through
``corpusfactory.cli.main.main`` (``ingest --json``); chats.jsonl with
``producer.min_truncated_messages: 1``, so that a prefix cut after one accepted
turn is published (fauno.json keeps 2: such a prefix is not). Each check is about
the conversations of these two fixtures (their ingest namespaces). The tests run in
file order; the last one pauses the admitter to check I1-I4 (Milvus Lite allows one
process per file).
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from collections import defaultdict
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from corpusfactory import contract
from corpusfactory.cli.main import main
from corpusfactory.settings import Settings
from corpusfactory.tools.stack import write_settings
from producers.ingest import refine_file
from producers.ingest.publish import IngestPublisher, run_identity
from tests.integration.pipeline_util import Stack as WorkerStack
from tests.integration.pipeline_util import check_all_invariants, decisions_by_turn, read_topic
from tests.unit.test_ingest import FAUNO_REPORT, JSONL_REPORT

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ingest"
CASES = {
    "fauno": (FIXTURES / "fauno.json", FAUNO_REPORT),
    "jsonl": (FIXTURES / "chats.jsonl", JSONL_REPORT),
}


NAMESPACES = {
    fmt: run_identity(path, fmt, language="it", min_chars=20, drop_non_target=False)[0]
    for fmt, (path, _) in CASES.items()
}


def ours(conversation_id: str) -> bool:
    """A conversation of one of the two fixtures (its id is ``<namespace>:<id>``)."""
    return conversation_id.split(":", 1)[0] in NAMESPACES.values()


@dataclass
class Stack:
    workers: WorkerStack
    configs: dict[str, tuple[Path, Settings]]  # format -> its settings file, settings
    first: dict[str, dict[str, Any]] = field(default_factory=dict)  # format -> publish counts

    @property
    def settings(self) -> Settings:
        return self.workers.settings

    @property
    def bootstrap(self) -> str:
        return self.workers.bootstrap


def ingest(stack: Stack, path: Path, fmt: str, *flags: str) -> tuple[int, Any, str]:
    """``corpusfactory ingest PATH --format FMT --json FLAGS``: (exit code, JSON, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    config = stack.configs[fmt][0]
    argv = ["ingest", str(path), "--format", fmt, "--json", "--config", str(config)]
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([*argv, "--in-flight", "4", *flags])  # 4 < 7 conversations: slots refill
    return rc, json.loads(out.getvalue()) if rc == 0 else None, err.getvalue()


def end_offsets(stack: Stack) -> dict[str, list[int]]:
    consumer = KafkaConsumer(bootstrap_servers=stack.bootstrap)
    try:
        out = {}
        for name in contract.ALL_TOPICS:
            topic = stack.settings.topic(name)
            tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
            ends = consumer.end_offsets(tps)
            out[name] = [ends[tp] for tp in tps]
        return out
    finally:
        consumer.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_stack: WorkerStack) -> Stack:
    state = tmp_path_factory.mktemp("ingest-configs")
    settings = default_stack.settings
    loose = settings.model_copy(deep=True)
    loose.producer.min_truncated_messages = 1
    configs = {
        fmt: (write_settings(s, state / f"ingest-{fmt}.yaml"), s)
        for fmt, s in (("fauno", settings), ("jsonl", loose))
    }
    s = Stack(default_stack, configs)
    for fmt, (path, report) in CASES.items():
        rc, out, err = ingest(s, path, fmt)
        assert rc == 0, err
        assert {k: v for k, v in out.items() if k != "publish"} == report
        s.first[fmt] = out["publish"]
    return s


def test_dry_run_and_bad_input_send_nothing(stack: Stack, tmp_path: Path) -> None:
    before = end_offsets(stack)
    rc, out, _ = ingest(stack, FIXTURES / "fauno.json", "fauno", "--dry-run")
    assert rc == 0 and out == FAUNO_REPORT  # the report only: no "publish" key
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"input": "[|Umano|] a\\n[|AI|] b"},\n  {"input": 3}\n]\n', "utf-8")
    rc, _, err = ingest(stack, bad, "fauno")
    assert rc == 2
    assert f"{bad}:3: " in err and "'input'" in err
    assert end_offsets(stack) == before


@pytest.mark.parametrize("fmt", list(CASES))
def test_turns_are_admitted_one_at_a_time_and_prefixes_published(stack: Stack, fmt: str) -> None:
    s, stats = stack.configs[fmt][1], stack.first[fmt]
    path, report = CASES[fmt]
    kept, _ = refine_file(path, fmt)
    namespace, run_id = run_identity(path, fmt, language="it", min_chars=20, drop_non_target=False)
    refined = {f"{namespace}:{c.id}": c for c in kept}
    decisions = decisions_by_turn(stack.bootstrap, s)
    sent: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in read_topic(stack.bootstrap, s.topic(contract.CANDIDATES)):
        cand = json.loads(rec.value)
        if cand["conversation_id"] in refined:
            assert cand["source"] == fmt and cand["producer_id"] == run_id
            assert rec.key == cand["conversation_id"].encode()
            sent[cand["conversation_id"]].append(cand)
    published = {}
    for rec in read_topic(stack.bootstrap, s.topic(contract.ACCEPTED)):
        acc = contract.decode_accepted(rec.value)
        if acc.conversation_id in refined:
            assert acc.conversation_id not in published
            published[acc.conversation_id] = acc

    assert set(sent) == set(refined)  # every refined conversation was offered
    assert stats["conversations_sent"] == report["output_conversations"]
    assert stats["turns_sent"] == sum(map(len, sent.values()))
    assert stats["accepted"] + stats["rejected"] == stats["turns_sent"]
    assert stats["complete"] + stats["truncated"] == len(refined)
    assert stats["published"] == len(published) and stats["turns_resent"] == 0
    assert stats["replayed"] == 0 and stats["already_done"] == 0
    for cid, conv in refined.items():
        cands = sent[cid]
        # in order from the first message, each sent once, the next only after the
        # previous one was decided
        assert [c["index"] for c in cands] == list(range(len(cands)))
        assert [c["turn_id"] for c in cands] == [f"{cid}:{i}:0" for i in range(len(cands))]
        assert [(c["role"], c["text"]) for c in cands] == [
            (m.role, m.text) for m in conv.messages[: len(cands)]
        ]
        ds = [decisions[c["turn_id"]] for c in cands]
        assert all(len(d) == 1 for d in ds), "a sent turn without exactly one decision"
        for c, d in zip(cands[1:], ds, strict=False):
            assert c["created_at"] >= d[0].decided_at
        verdicts = [d[0].accepted for d in ds]
        assert all(verdicts[:-1]), "a turn was sent after a rejection"
        complete = len(cands) == len(conv.messages) and verdicts[-1]
        n_accepted = len(cands) if complete else len(cands) - 1
        pub = published.get(cid)
        if not complete and n_accepted < s.producer.min_truncated_messages:
            assert pub is None
            continue
        assert pub is not None and pub.source == fmt and pub.producer_id == run_id
        assert pub.truncated is not complete and pub.target_length == len(conv.messages)
        assert [t.turn_id for t in pub.turns] == [c["turn_id"] for c in cands[:n_accepted]]
        assert [(t.role, t.text) for t in pub.turns] == [
            (m.role, m.text) for m in conv.messages[:n_accepted]
        ]
        for turn in pub.turns:
            d = decisions[turn.turn_id][0]
            assert d.accepted and turn.nll == pytest.approx(d.nll)


def accepted_ids(stack: Stack) -> set[str]:
    decisions = decisions_by_turn(stack.bootstrap, stack.settings)
    return {t for t, ds in decisions.items() if ds[0].accepted and ours(ds[0].conversation_id)}


def publications(stack: Stack) -> dict[str, list[tuple[bool, list[str]]]]:
    """Conversation id -> every publication of it: (truncated, turn ids)."""
    out: dict[str, list[tuple[bool, list[str]]]] = defaultdict(list)
    for rec in read_topic(stack.bootstrap, stack.settings.topic(contract.ACCEPTED)):
        conv = contract.decode_accepted(rec.value)
        if ours(conv.conversation_id):
            out[conv.conversation_id].append((conv.truncated, [t.turn_id for t in conv.turns]))
    return out


def test_rerun_with_its_state_sends_and_publishes_nothing(stack: Stack) -> None:
    before = end_offsets(stack)
    for fmt, (path, report) in CASES.items():
        rc, out, err = ingest(stack, path, fmt)
        assert rc == 0, err
        stats = out["publish"]
        assert stats["already_done"] == report["output_conversations"]
        assert stats["turns_sent"] == stats["published"] == stats["conversations_sent"] == 0
    assert end_offsets(stack) == before


def test_rerun_without_state_interrupted_then_resumed_accepts_nothing_new(stack: Stack) -> None:
    """The state is lost; a new run stops after a few decisions (turns saved as pending,
    some not sent yet, as in a crash) and is run again. It resumes where it stopped,
    every decision is a replay of the first run's, and the same conversations come out."""
    path, _ = CASES["fauno"]
    s = stack.configs["fauno"][1]
    accepted_before, published_before = accepted_ids(stack), publications(stack)
    shutil.rmtree(s.state_path / "ingest")
    kept, _ = refine_file(path, "fauno")
    namespace, run_id = run_identity(
        path, "fauno", language="it", min_chars=20, drop_non_target=False
    )
    publisher = IngestPublisher(s, stack.bootstrap, "fauno", namespace, run_id, in_flight=4)

    async def interrupted() -> dict[str, Any]:
        stop = asyncio.Event()

        async def stop_after_three_decisions() -> None:
            while publisher.stats.accepted + publisher.stats.rejected < 3:
                await asyncio.sleep(0.01)
            stop.set()

        stopper = asyncio.create_task(stop_after_three_decisions())
        try:
            return (await publisher.run(kept, stop)).as_dict()
        finally:
            stopper.cancel()

    part = asyncio.run(interrupted())
    left = len(publisher.active)  # each with a pending turn, sent or not
    assert left >= 1
    rc, out, err = ingest(stack, path, "fauno")
    assert rc == 0, err
    rest, first = out["publish"], stack.first["fauno"]
    assert rest["already_done"] == part["complete"] + part["truncated"]
    assert rest["resumed"] == rest["turns_resent"] == left
    for key in ("accepted", "rejected", "complete", "truncated", "published"):
        assert part[key] + rest[key] == first[key], key
    for run in (part, rest):
        assert run["replayed"] == run["accepted"] + run["rejected"]
    assert accepted_ids(stack) == accepted_before
    after = publications(stack)
    assert set(after) == set(published_before)
    for cid, pubs in after.items():  # the same conversation each time it was published
        assert all(p == pubs[0] for p in pubs), cid


def test_invariants_hold_and_the_corpus_holds_each_conversation_once(
    stack: Stack, embedder: Any
) -> None:
    """Runs last: pauses the admitter (the index is read directly)."""
    with stack.workers.admitter_paused():
        stored = check_all_invariants(stack.bootstrap, stack.settings, embedder, ours)
    corpus = [conv for conv in stored if ours(conv["conversation_id"])]
    by_source: dict[str, int] = defaultdict(int)
    for conv in corpus:
        by_source[conv["source"]] += 1
    assert corpus, "nothing reached the corpus: the prefix checks had nothing to check"
    assert set(by_source) <= set(CASES)
    for fmt in CASES:  # fauno's were published twice (the run without state), stored once
        assert by_source[fmt] == stack.first[fmt]["published"]
