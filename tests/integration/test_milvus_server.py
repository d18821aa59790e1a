"""Admission against a real Milvus standalone server (2.3.5), not Milvus Lite.

One module-wide stack (an admitter and a scorer, ``milvus.uri`` set to the session's
server, a collection of its own, decontamination on with the small evaluation
fixtures) runs the representative admission paths: accept, duplicate rejection,
a replay getting its first decision back, contamination. Unlike Lite, a server can
be read while the admitter runs, so the tests look into the index as they go.

The last test is fault scenario 6 of ``reliability.md``: under a steady load of
candidates the server is stopped for 30 s. No turn may be decided without its
similarity check (no decision while the server is down, apart from the batch whose
check was done before it went), the backlog drains once it is back, every
candidate is decided exactly once, and I1-I4 hold over everything the module sent.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from corpusfactory import contract
from corpusfactory.engines.index import KIND_EVAL, KIND_TURN, VectorIndex
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.seeds import load_seeds, seed_messages
from corpusfactory.settings import Settings
from corpusfactory.tools.stack import WorkerProcess, stop_all
from tests.integration.conftest import make_settings
from tests.integration.milvus_server import MilvusStandalone
from tests.integration.pipeline_util import (
    DecisionLog,
    candidate,
    check_i1,
    check_i2,
    check_i3,
    check_i4,
    producer,
    read_topic,
    wait_for,
)
from tests.integration.pipeline_util import wait_decided as wait_all_decided
from training.evaluation.items import evaluation_items
from training.evaluation.squad_it import load_squad

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

OUTAGE_S = 30.0
LOAD_TURNS = 240  # distinct candidate texts, sent at a steady rate through the outage
LOAD_PER_S = 4.0
# A decision published while the server was down must have been decided (its
# similarity check and writes done) before the server went: at most this long before
# ``decided_at`` was stamped after the batch's last Milvus call returned.
SLACK_S = 1.0


@dataclass
class ServerStack:
    settings: Settings
    bootstrap: str
    server: MilvusStandalone
    admitter: WorkerProcess
    scorer: WorkerProcess
    index: VectorIndex  # opened on the server beside the running admitter


@pytest.fixture(scope="module")
def server_stack(
    tmp_path_factory, kafka_bootstrap, built_models, embedder, milvus_server
) -> Iterator[ServerStack]:
    settings = make_settings(
        tmp_path_factory.mktemp("server-stack"),
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        milvus={"uri": milvus_server.uri, "collection": f"c{uuid.uuid4().hex[:12]}"},
        # quality is not what this module is about: only the index's checks reject
        admission={
            "nll_threshold_percentile": None,
            "nll_threshold": 1000.0,
            "decontaminate": True,
            "contamination_threshold": 0.9,
        },
        evaluation={"tasks": ["squad_it"], "squad_it_path": str(FIXTURES / "squad_it_small.json")},
    )
    ensure_topics(settings, kafka_bootstrap)
    admitter = WorkerProcess(settings, "admitter").start()
    scorer = WorkerProcess(settings, "scorer").start()
    index = None
    try:
        t0 = time.monotonic()
        admitter.wait_ready()
        scorer.wait_ready()
        log.info("stack on the Milvus server ready in %.1fs", time.monotonic() - t0)
        index = VectorIndex.from_settings(settings, embedder.dim)
        yield ServerStack(settings, kafka_bootstrap, milvus_server, admitter, scorer, index)
    finally:
        if index is not None:
            index.close()
        stop_all([scorer, admitter])


def send(stack: ServerStack, cands: list[contract.CandidateTurn]) -> None:
    prod = producer(stack.bootstrap)
    try:
        for c in cands:
            prod.send(
                stack.settings.topic(contract.CANDIDATES),
                key=c.conversation_id.encode(),
                value=contract.encode(c),
            )
        prod.flush()
    finally:
        prod.close()


def wait_decided(
    stack: ServerStack, turn_ids: set[str], times: int = 1, timeout: float = 180
) -> dict[str, list[contract.Decision]]:
    """Decisions by turn, once each of these turns has at least ``times`` of them."""
    return wait_all_decided(stack.bootstrap, stack.settings, turn_ids, times, timeout)


ORIGINAL = "La biblioteca comunale resta aperta fino alle dieci di sera durante gli esami."
NEAR = "La biblioteca comunale rimane aperta fino alle dieci di sera durante gli esami."
OTHER = "Per la marmellata di albicocche servono frutta matura, zucchero e mezzo limone."


def test_server_accepts_then_rejects_copies_and_near_duplicates(server_stack, embedder) -> None:
    o, n, x = embedder.encode([ORIGINAL, NEAR, OTHER])
    assert float(o @ n) > 0.9 and float(o @ x) < 0.9  # the precondition, for this embedder
    run = uuid.uuid4().hex[:6]
    first = [candidate(f"{run}-orig", 0, ORIGINAL), candidate(f"{run}-other", 0, OTHER)]
    send(server_stack, first)
    ds = wait_decided(server_stack, {c.turn_id for c in first})
    for c in first:
        d = ds[c.turn_id][0]
        assert (d.accepted, d.reason, d.replayed) == (True, "accepted", False), c.turn_id
    orig_id = first[0].turn_id
    index = server_stack.index
    # read while the admitter runs: both vectors are there, under their turn ids
    assert index.existing([c.turn_id for c in first]) == {c.turn_id for c in first}

    second = [candidate(f"{run}-copy", 0, ORIGINAL), candidate(f"{run}-near", 0, NEAR)]
    send(server_stack, second)
    ds = wait_decided(server_stack, {c.turn_id for c in second})
    copy, near = (ds[c.turn_id][0] for c in second)
    for d in (copy, near):
        assert (d.accepted, d.reason) == (False, "duplicate"), d.turn_id
        assert d.neighbour_id == orig_id and d.similarity > 0.9, d.turn_id
    assert copy.similarity == pytest.approx(1.0, abs=1e-3)
    assert index.existing([c.turn_id for c in second]) == set()


def test_server_replay_returns_the_first_decision(server_stack) -> None:
    run = uuid.uuid4().hex[:6]
    text = "Ieri sera al concerto in piazza la banda ha suonato fino a mezzanotte passata."
    cands = [candidate(f"{run}-a", 0, text), candidate(f"{run}-b", 0, text)]
    for c in cands:  # one after the other: the first is accepted, its copy rejected
        send(server_stack, [c])
        first = wait_decided(server_stack, {c.turn_id})
    a, b = (first[c.turn_id][0] for c in cands)
    assert (a.accepted, b.accepted, b.reason) == (True, False, "duplicate")
    turns = server_stack.index.count(KIND_TURN)

    send(server_stack, cands)  # the same turn ids again (a redelivery, a replay)
    again = wait_decided(server_stack, {c.turn_id for c in cands}, times=2)
    for c, d0 in zip(cands, (a, b), strict=True):
        ds = again[c.turn_id]
        assert len(ds) == 2, c.turn_id
        d1 = ds[1]
        assert (d1.accepted, d1.reason, d1.neighbour_id) == (
            d0.accepted,
            d0.reason,
            d0.neighbour_id,
        )
        assert d1.similarity == pytest.approx(d0.similarity)
        assert d1.replayed and not d0.replayed, c.turn_id
    assert server_stack.index.count(KIND_TURN) == turns  # no second vector


def test_server_rejects_contaminated_turns(server_stack) -> None:
    s = server_stack.settings
    items = evaluation_items(s)
    index = server_stack.index
    assert index.count(KIND_EVAL, reserved=True) == len(items)
    assert index.count(KIND_EVAL) == 0  # the reserved items sit apart from the corpus
    squad = load_squad(FIXTURES / "squad_it_small.json")
    sentence = next(t for r, t in items if r.startswith("eval:squad_it:c:"))
    run = uuid.uuid4().hex[:6]
    cands = [candidate(f"{run}-q", 0, squad[1].question), candidate(f"{run}-c", 0, sentence)]
    send(server_stack, cands)
    ds = wait_decided(server_stack, {c.turn_id for c in cands})
    q, c = (ds[x.turn_id][0] for x in cands)
    for d in (q, c):
        assert (d.accepted, d.reason) == (False, "contaminated"), d.turn_id
        assert d.neighbour_id.startswith("eval:squad_it:") and d.similarity > 0.9, d.turn_id
    assert q.neighbour_id == f"eval:squad_it:q:{squad[1].id}"


# Distinct Italian sentences for the load: every combination is a different text;
# some are close enough to be rejected as duplicates, most are not.
_WHO = [
    "Mia sorella",
    "Il vicino di casa",
    "La professoressa di storia",
    "Un turista tedesco",
    "Il panettiere sotto casa",
    "Mio nonno",
    "La squadra di pallavolo",
    "Un vecchio amico",
    "La bibliotecaria",
    "Il sindaco del paese",
]
_WHAT = [
    "ha comprato una bicicletta rossa",
    "ha scritto una lettera lunghissima",
    "ha perso le chiavi della macchina",
    "ha cucinato le lasagne della domenica",
    "ha dipinto un ritratto del gatto",
    "ha riparato la vecchia radio",
    "ha piantato tre alberi di limone",
    "ha letto un romanzo di Calvino",
]
_WHERE = [
    "a Torino",
    "in montagna",
    "al mercato del sabato",
    "vicino al porto",
    "in un paesino della Puglia",
]
_WHEN = [
    "la settimana scorsa",
    "prima di Natale",
    "durante lo sciopero dei treni",
    "in una mattina di nebbia",
]


def load_texts(n: int) -> list[str]:
    combos = itertools.product(_WHO, _WHAT, _WHERE, _WHEN)
    texts = [f"{who} {what} {where} {when}." for who, what, where, when in combos]
    return random.Random(6).sample(texts, n)


def test_server_outage_decides_nothing_and_the_backlog_drains(
    server_stack, milvus_server, embedder
) -> None:
    """Fault scenario 6: the vector store is down for 30 s under a steady load."""
    s = server_stack.settings
    run = uuid.uuid4().hex[:6]
    cands = [candidate(f"{run}-{i:03d}", 0, t) for i, t in enumerate(load_texts(LOAD_TURNS))]
    ids = {c.turn_id for c in cands}

    def n_decided() -> int:
        ds = decisions_log.by_turn()
        return sum(t in ds for t in ids)

    sent_at: dict[str, float] = {}

    def steady_load() -> None:  # through the outage and after it
        prod = producer(server_stack.bootstrap)
        try:
            for c in cands:
                sent_at[c.turn_id] = time.time()
                prod.send(
                    s.topic(contract.CANDIDATES),
                    key=c.conversation_id.encode(),
                    value=contract.encode(c),
                )
                time.sleep(1.0 / LOAD_PER_S)
            prod.flush()
        finally:
            prod.close()

    sender = threading.Thread(target=steady_load, name="steady-load", daemon=True)
    sender.start()
    try:
        with DecisionLog(server_stack.bootstrap, s) as decisions_log:
            wait_for(lambda: n_decided() >= 20, 180, "decisions under load before the outage")
        down_from = time.time()
        milvus_server.stop()
        down_at = time.time()  # the server process is gone
        time.sleep(OUTAGE_S)
        up_from = time.time()
        start_s = milvus_server.start()
        up_at = time.time()  # healthy again
    finally:
        if not milvus_server.running:  # later tests need the server
            milvus_server.start()
    sender.join(timeout=300)
    assert not sender.is_alive() and len(sent_at) == len(cands)
    wait_decided(server_stack, ids, timeout=600)

    records = [
        (rec.timestamp / 1000.0, contract.decode_decision(rec.value))
        for rec in read_topic(server_stack.bootstrap, s.topic(contract.DECISIONS))
    ]
    mine = [d for _, d in records if d.turn_id in ids]
    # Every load candidate decided exactly once: none lost, none decided twice. A turn
    # whose event came again (a consumer-group rebalance under load) would get its first
    # decision back, marked replayed: that is a second message, not a second decision.
    counts = Counter(d.turn_id for d in mine)
    assert set(counts) == ids
    fresh = Counter(d.turn_id for d in mine if not d.replayed)
    assert {t: n for t, n in fresh.items() if n > 1} == {}
    # No turn decided without its similarity check: nothing decided while the server
    # was down, and whatever was published then had been decided before it went (the
    # batch whose Milvus calls returned before the process was gone).
    while_down = [d for _, d in records if down_at + SLACK_S < d.decided_at < up_from]
    assert while_down == []
    published_down = [d for ts, d in records if down_at < ts < up_from]
    assert all(d.decided_at <= down_at + SLACK_S for d in published_down), published_down
    # the outage hit the load: decisions before it, and a backlog that waited for it
    decided_at: dict[str, float] = {}
    for d in mine:  # a turn's decisions share a partition: the first read is the first
        decided_at.setdefault(d.turn_id, d.decided_at)
    before = [t for t in ids if decided_at[t] <= down_at + SLACK_S]
    backlog = [t for t in ids if sent_at[t] < up_at and decided_at[t] >= up_from]
    assert len(before) >= 20 and backlog

    # Measured, not asserted. The scorer kept working while the server was down: the
    # turns it had scored by the restart are the admitter's own backlog.
    scored_at: dict[str, float] = {}
    for rec in read_topic(server_stack.bootstrap, s.topic(contract.SCORED)):
        t = contract.decode_scored(rec.value, s.admission.max_event_chars).candidate.turn_id
        scored_at.setdefault(t, rec.timestamp / 1000.0)
    waiting = [t for t in backlog if scored_at[t] < up_at]
    first_back = min(decided_at[t] for t in ids if decided_at[t] >= up_from)
    log.info(
        "outage of %.0fs: stop took %.2fs; %d load turns decided before it (%d of them "
        "during the stop itself, %d published after the server was gone); restart took "
        "%.1fs until healthy; first decision %.1fs after the restart began, %.1fs after "
        "healthy; the admitter's backlog (%d turns scored by then) decided %.1fs after "
        "healthy, the whole backlog (%d turns sent by then) %.1fs after; the last of %d "
        "turns (sent until %.1fs after healthy) %.1fs after; admitter retry lines: %d; "
        "decisions published again: %d",
        up_from - down_at,
        down_at - down_from,
        len(before),
        sum(down_from < decided_at[t] for t in before),
        len(published_down),
        start_s,
        first_back - up_from,
        first_back - up_at,
        len(waiting),
        max((decided_at[t] for t in waiting), default=up_at) - up_at,
        len(backlog),
        max(decided_at[t] for t in backlog) - up_at,
        len(ids),
        max(sent_at.values()) - up_at,
        max(decided_at.values()) - up_at,
        server_stack.admitter.log_text().count("vector index unavailable"),
        len(mine) - len(ids),
    )

    # I1-I4 over everything this module sent, read from the running server
    decisions = check_i1(server_stack.bootstrap, s)
    texts = {
        c.turn_id: c.text
        for c in (
            contract.decode_candidate(r.value, s.admission.max_event_chars)
            for r in read_topic(server_stack.bootstrap, s.topic(contract.CANDIDATES))
        )
    }
    accepted = {t for t, ds in decisions.items() if ds[0].accepted}
    assert accepted & ids and accepted != ids  # the load had both outcomes
    corpus = [
        {"conversation_id": t, "turns": [{"turn_id": t, "text": texts[t]}]}
        for t in sorted(accepted)
    ]
    check_i2(corpus)
    check_i3(corpus, embedder, s.admission.similarity_threshold)
    n_seeds = len(seed_messages(load_seeds(s.producer.seed_file)))
    check_i4(server_stack.index, accepted, n_seeds)
