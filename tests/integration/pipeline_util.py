"""Helpers for the end-to-end tests: read topics, wait on groups, check invariants I1-I4."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import KafkaAdminClient, KafkaProducer

from corpusfactory import contract
from corpusfactory.kafka_clients import assign, consumer, ensure_topics, topic_partitions
from corpusfactory.settings import KafkaSettings, Settings
from corpusfactory.tools.stack import WorkerProcess
from streams.app import app_id_for


@dataclass
class Stack:
    settings: Settings
    bootstrap: str
    admitter: WorkerProcess
    scorer: WorkerProcess

    @contextmanager
    def admitter_paused(self) -> Iterator[None]:
        """The admitter stopped for the block (Milvus Lite opens a file in one process
        only, so the tests read the index this way), then started again and ready."""
        self.admitter.stop()
        try:
            yield
        finally:
            self.admitter.start().wait_ready()
            wait_assigned(self.bootstrap, self.settings, "admitter")


@contextmanager
def worker_stack(settings: Settings, bootstrap: str) -> Iterator[Stack]:
    """The topics, one admitter and one scorer, ready and holding every partition of
    their input topics; both stopped on exit."""
    ensure_topics(settings, bootstrap)
    admitter = WorkerProcess(settings, "admitter").start()
    scorer = WorkerProcess(settings, "scorer").start()
    try:
        admitter.wait_ready()
        scorer.wait_ready()
        wait_assigned(bootstrap, settings, "admitter")
        wait_assigned(bootstrap, settings, "scorer")
        yield Stack(settings, bootstrap, admitter, scorer)
    finally:
        scorer.stop()
        admitter.stop()


class TopicTail:
    """A topic read from its beginning, keeping its place: each ``read()`` polls only
    what arrived since the one before (up to the end offsets at the time of the call)
    and returns every record read so far, in arrival order. A wait loop polls with one
    of these instead of reading the whole topic again on each try."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self._consumer = consumer(KafkaSettings(), bootstrap)
        self._tps = assign(self._consumer, topic, start="beginning")
        self.records: list[Any] = []

    def read(self, timeout: float = 60.0) -> list[Any]:
        ends = self._consumer.end_offsets(self._tps)
        deadline = time.monotonic() + timeout
        while any(self._consumer.position(tp) < ends[tp] for tp in self._tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self.topic} to its end")
            for recs in self._consumer.poll(timeout_ms=500).values():
                self.records.extend(recs)
        return self.records

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record now in a topic, in partition order (no consumer group)."""
    with TopicTail(bootstrap, topic) as tail:
        return tail.read()


class DecisionLog:
    """The decisions topic read incrementally (see TopicTail): turn id -> decisions."""

    def __init__(self, bootstrap: str, settings: Settings) -> None:
        self._tail = TopicTail(bootstrap, settings.topic(contract.DECISIONS))
        self._by_turn: dict[str, list[contract.Decision]] = defaultdict(list)
        self._seen = 0

    def by_turn(self) -> dict[str, list[contract.Decision]]:
        records = self._tail.read()
        for rec in records[self._seen :]:
            if rec.key == b"poison":
                continue  # planted by the producer's dead-letter test
            d = contract.decode_decision(rec.value)
            self._by_turn[d.turn_id].append(d)
        self._seen = len(records)
        return {turn: list(ds) for turn, ds in self._by_turn.items()}

    def count(self) -> int:
        return sum(map(len, self.by_turn().values()))

    def close(self) -> None:
        self._tail.close()

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dead_letters(records: list[Any]) -> list[contract.DeadLetter]:
    """The records of the dead-letter topic, decoded."""
    return [contract.DeadLetter(**json.loads(r.value)) for r in records]


def wait_dead_letters(
    bootstrap: str,
    settings: Settings,
    origin_topic: str,
    origins: set[tuple[int, int]],
    n: int,
    timeout: float,
) -> list[contract.DeadLetter]:
    """The dead letters of the events at ``origins`` ((partition, offset) in
    ``origin_topic``), once at least ``n`` of them are there; the dead-letter topic
    is read incrementally meanwhile."""
    with TopicTail(bootstrap, settings.topic(contract.DEADLETTER)) as tail:

        def arrived() -> list[contract.DeadLetter]:
            letters = [
                d
                for d in dead_letters(tail.read())
                if d.origin_topic == origin_topic
                and (d.origin_partition, d.origin_offset) in origins
            ]
            return letters if len(letters) >= n else []

        return wait_for(arrived, timeout, f"{n} dead letters from {origin_topic}")


def wait_decided(
    bootstrap: str,
    settings: Settings,
    turn_ids: set[str],
    times: int = 1,
    timeout: float = 180.0,
) -> dict[str, list[contract.Decision]]:
    """Decisions by turn (all of them), once each of ``turn_ids`` has at least
    ``times`` decisions; the decisions topic is read incrementally meanwhile."""
    with DecisionLog(bootstrap, settings) as log:

        def ready() -> dict[str, list[contract.Decision]]:
            ds = log.by_turn()
            return ds if all(len(ds.get(t, [])) >= times for t in turn_ids) else {}

        return wait_for(ready, timeout, f"decisions for {len(turn_ids)} turns")


def group_assignment(admin: KafkaAdminClient, group: str) -> tuple[str, list[set[tuple[str, int]]]]:
    """A consumer group's state and, per member, the (topic, partition)s it holds."""
    info = admin.describe_groups([group])[group]
    members = []
    for member in info.get("members") or []:
        held: set[tuple[str, int]] = set()
        assignment = member.get("member_assignment") or {}
        for entry in assignment.get("assigned_partitions") or []:
            held.update((entry["topic"], p) for p in entry["partitions"])
        members.append(held)
    return str(info.get("group_state", "")), members


def wait_assigned(
    bootstrap: str, settings: Settings, role: str, members: int = 1, timeout: float = 120.0
) -> list[set[tuple[str, int]]]:
    """Wait until the group of a worker ``role`` is stable with ``members`` members,
    each holding some partitions of its input topic and all of them held together;
    returns what each member holds. A worker is "ready" once its models are loaded;
    this is the moment it can take events, which the tests wait on instead of
    sleeping."""
    source = contract.CANDIDATES if role == "scorer" else contract.SCORED
    topic = settings.topic(source)
    want = {(topic, p) for p in range(topic_partitions(settings)[topic])}
    group = app_id_for(settings, role)

    seen: list[Any] = []

    def assigned() -> list[set[tuple[str, int]]] | None:
        state, held = group_assignment(admin, group)
        on_topic = [{tp for tp in h if tp[0] == topic} for h in held]
        seen[:] = [state, on_topic]
        stable = state == "Stable" and len(on_topic) == members and all(on_topic)
        return on_topic if stable and set().union(*on_topic) == want else None

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)  # one for the whole wait
    try:
        return wait_for(assigned, timeout, f"group {group} to hold {topic} with {members} members")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last seen: state {seen[0]!r}, members hold {seen[1]}") from None
    finally:
        admin.close()


def wait_for(predicate: Any, timeout: float, what: str, every: float = 0.25) -> Any:
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
    with DecisionLog(bootstrap, settings) as log:
        return log.by_turn()


Scope = Callable[[str], bool]  # conversation id -> is it one the check is about


def _everything(conversation_id: str) -> bool:
    return True


def candidate_ids(bootstrap: str, settings: Settings, scope: Scope = _everything) -> set[str]:
    ids = set()
    for rec in read_topic(bootstrap, settings.topic(contract.CANDIDATES)):
        cand = json.loads(rec.value)
        if scope(cand["conversation_id"]):
            ids.add(cand["turn_id"])
    return ids


def _conversation_of(value: str | None) -> str | None:
    try:
        found = json.loads(value or "")
    except ValueError:
        return None
    return found.get("conversation_id") if isinstance(found, dict) else None


def check_i1(
    bootstrap: str,
    settings: Settings,
    scope: Scope = _everything,
    all_decisions: dict[str, list[contract.Decision]] | None = None,
) -> dict[str, list[contract.Decision]]:
    """I1: every candidate has decisions, all agreeing, and none is dead-lettered.

    ``scope`` limits the check to some conversations (on a stack shared with tests
    that plant poison on purpose); the decisions returned are those of the scope.
    ``all_decisions``: the decisions topic by turn, when the caller has read it.
    """
    if all_decisions is None:
        all_decisions = decisions_by_turn(bootstrap, settings)
    decisions = {turn: ds for turn, ds in all_decisions.items() if scope(ds[0].conversation_id)}
    cands = candidate_ids(bootstrap, settings, scope)
    dead = [
        letter
        for letter in dead_letters(read_topic(bootstrap, settings.topic(contract.DEADLETTER)))
        if scope(letter.key or _conversation_of(letter.value) or "")
    ]
    assert not dead, f"valid events were dead-lettered: {[d.value for d in dead][:5]}"
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


def check_all_invariants(
    bootstrap: str, settings: Settings, embedder: Any, scope: Scope = _everything
) -> list[dict[str, Any]]:
    """After a fault scenario, with the admitter stopped: drain the corpus, check I1-I4.

    I1 holds for the conversations in ``scope``; I2-I4 for everything stored.
    Returns the stored conversations.
    """
    from consumers.store import CorpusStore
    from consumers.writer import CorpusWriter
    from corpusfactory.engines.index import VectorIndex
    from corpusfactory.seeds import load_seeds, seed_messages

    decisions = decisions_by_turn(bootstrap, settings)
    check_i1(bootstrap, settings, scope, decisions)
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
