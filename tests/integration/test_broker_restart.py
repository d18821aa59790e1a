"""Fault scenario 5: the broker restarts under load; producer and workers resume."""

from __future__ import annotations

import uuid

import pytest

from consumers.store import CorpusStore
from consumers.writer import CorpusWriter
from corpusfactory.broker import EmbeddedBroker
from corpusfactory.index import VectorIndex
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.seeds import load_seeds, seed_messages
from corpusfactory.stack import ProducerProcess, WorkerProcess
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import check_i1, check_i2, check_i3, check_i4, wait_for
from tests.integration.test_faults import n_decisions

pytestmark = pytest.mark.integration


def test_broker_restart_under_load(tmp_path, built_models, embedder) -> None:
    broker = EmbeddedBroker(tmp_path / "broker")  # its own broker: the session's stays up
    bootstrap = broker.start(timeout=120)
    try:
        s = make_settings(tmp_path / "state", bootstrap, f"t{uuid.uuid4().hex[:8]}.")
        ensure_topics(s, bootstrap)
        admitter = WorkerProcess(s, "admitter").start()
        scorer = WorkerProcess(s, "scorer").start()
        prod = ProducerProcess(s, conversations=4)
        try:
            admitter.wait_ready()
            scorer.wait_ready()
            prod.start()
            wait_for(lambda: n_decisions(bootstrap, s) >= 5, 180, "first decisions")
            broker.stop()
            assert broker.start(timeout=120) == bootstrap  # same ports, same data
            assert prod.wait(timeout=600) == 0, prod.log_text()[-3000:]
        finally:
            prod.stop()
            scorer.stop()
            admitter.stop()
        decisions = check_i1(bootstrap, s)
        with CorpusWriter(s, bootstrap) as writer:
            assert writer.run_once(60.0).drained
        corpus = list(CorpusStore(s.state_path / "corpus", read_only=True).iter_conversations())
        check_i2(corpus)
        check_i3(corpus, embedder, s.admission.similarity_threshold)
        index = VectorIndex.from_settings(s, embedder.dim)
        try:
            accepted = {t for t, ds in decisions.items() if ds[0].accepted}
            check_i4(index, accepted, len(seed_messages(load_seeds(s.producer.seed_file))))
        finally:
            index.close()
    finally:
        broker.stop()
