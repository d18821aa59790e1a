"""Fault scenarios from reliability.md, each on its own real stack.

* SIGKILL the admitter, the scorer and the producer mid-stream, restart them:
  I1-I4 hold and every conversation still finishes.
* Near-duplicate pairs sent at the same moment to different partitions, with
  two scorer workers: at most one of each pair is accepted (exactly one here,
  since both would pass every other check).
"""

from __future__ import annotations

import json
import uuid

import pytest

from corpusfactory import contract
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.tools.stack import ProducerProcess, WorkerProcess
from producers.state import ConversationStore
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import (
    DecisionLog,
    candidate,
    check_all_invariants,
    producer,
    wait_assigned,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_sigkill_workers_and_producer_mid_stream(
    tmp_path, kafka_bootstrap, built_models, embedder
) -> None:
    s = make_settings(
        tmp_path / "state",
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        producer={"in_flight": 3, "decision_timeout_s": 20.0},
        # A fixed NLL threshold near the toy generator's 85th percentile (the seeds' p95,
        # 6.46, rejects about 70 % of its turns): the run then reliably publishes
        # conversations for I2-I4 to check, and still rejects some. With p95, all 21
        # turns of one run were rejected, and nothing was stored.
        admission={"nll_threshold_percentile": None, "nll_threshold": 7.0},
    )
    ensure_topics(s, kafka_bootstrap)
    admitter = WorkerProcess(s, "admitter").start()
    scorer = WorkerProcess(s, "scorer").start()
    prod = ProducerProcess(s, conversations=5)
    try:
        admitter.wait_ready()
        scorer.wait_ready()
        prod.start()
        with DecisionLog(kafka_bootstrap, s) as log:
            wait_for(lambda: log.count() >= 4, 180, "first decisions")
            admitter.kill()
            admitter.start().wait_ready()
            wait_for(lambda: log.count() >= 10, 180, "decisions after restart")
        scorer.kill()
        scorer.start().wait_ready()
        prod.kill()
        # What the killed producer had started, from its own state (nobody writes it now).
        with ConversationStore(s.state_path / "producer" / "producer-0.sqlite") as st:
            before = st.counts()
        started_before = before["active"] + before["finished"] + before["truncated"]
        assert started_before >= 1
        prod.start()
        assert prod.wait(timeout=600) == 0, prod.log_text()[-3000:]
        log = prod.log_text()
        summary = json.loads(log[log.rindex("\n{\n") + 1 :])
        # It resumed, not restarted: it started only the conversations still missing,
        # and closed the ones left active by the kill as well.
        assert summary["started"] == 5 - started_before, (before, summary)
        assert (
            summary["finished"] + summary["truncated"]
            == 5 - before["finished"] - before["truncated"]
        ), (before, summary)
    finally:
        prod.stop()
        scorer.stop()
        admitter.stop()

    corpus = check_all_invariants(kafka_bootstrap, s, embedder)
    assert len(corpus) >= 1
    # the producer's state agrees: 5 conversations closed, none left active
    with ConversationStore(s.state_path / "producer" / "producer-0.sqlite") as st:
        counts = st.counts()
    assert counts["active"] == 0
    assert counts["finished"] + counts["truncated"] == 5


PAIRS = [
    (
        "Il mio gatto arancione dorme sempre sul termosifone della cucina d'inverno.",
        "Il mio gatto arancione dorme sempre sul termosifone in cucina d'inverno.",
    ),
    (
        "Per riparare la bicicletta ho comprato una camera d'aria nuova e due leve.",
        "Per riparare la bici ho comprato una camera d'aria nuova e due leve.",
    ),
    (
        "Domani mattina prendo il treno delle sette per andare a Bologna dalla nonna.",
        "Domani mattina prendo il treno delle sette e vado a Bologna dalla nonna.",
    ),
]


def test_concurrent_near_duplicates_on_two_partitions(
    tmp_path, kafka_bootstrap, built_models, embedder
) -> None:
    for a, b in PAIRS:  # the precondition: each pair is a near-duplicate for this embedder
        va, vb = embedder.encode([a, b])
        assert float(va @ vb) > 0.9
    s = make_settings(
        tmp_path / "state",
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        # quality is not what this test is about: only the diversity filter may reject
        admission={"nll_threshold_percentile": None, "nll_threshold": 1000.0},
    )
    ensure_topics(s, kafka_bootstrap)
    admitter = WorkerProcess(s, "admitter").start()
    scorers = [WorkerProcess(s, "scorer", name=f"scorer-{i}").start() for i in range(2)]
    try:
        admitter.wait_ready()
        for w in scorers:
            w.wait_ready()
        # each scorer holds one partition, so that each pair is decided by two workers
        held = wait_assigned(kafka_bootstrap, s, "scorer", members=2)
        assert sorted(len(h) for h in held) == [1, 1]
        wait_assigned(kafka_bootstrap, s, "admitter")
        prod = producer(kafka_bootstrap)
        topic = s.topic(contract.CANDIDATES)
        run = uuid.uuid4().hex[:6]
        for i, (a, b) in enumerate(PAIRS):
            ca, cb = candidate(f"{run}-a{i}", 0, a), candidate(f"{run}-b{i}", 0, b)
            prod.send(
                topic, key=ca.conversation_id.encode(), value=contract.encode(ca), partition=0
            )
            prod.send(
                topic, key=cb.conversation_id.encode(), value=contract.encode(cb), partition=1
            )
        prod.flush()
        prod.close()
        want = {f"{run}-{x}{i}:0:0" for i in range(len(PAIRS)) for x in "ab"}

        def all_decided() -> dict:
            ds = log.by_turn()
            return ds if want <= set(ds) else {}

        with DecisionLog(kafka_bootstrap, s) as log:
            decisions = wait_for(all_decided, 180, "decisions for every pair")
    finally:
        for w in scorers:
            w.stop()
        admitter.stop()
    for i in range(len(PAIRS)):
        da = decisions[f"{run}-a{i}:0:0"][0]
        db = decisions[f"{run}-b{i}:0:0"][0]
        assert [da.accepted, db.accepted].count(True) == 1, (da, db)
        loser = db if da.accepted else da
        winner = da if da.accepted else db
        assert loser.reason == "duplicate"
        assert loser.neighbour_id == winner.turn_id
        assert loser.similarity > 0.9
