"""Fault scenario 5: the broker restarts under load; producer and workers resume."""

from __future__ import annotations

import uuid

import pytest

from corpusfactory.engines.broker import EmbeddedBroker
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.tools.stack import ProducerProcess, WorkerProcess
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import DecisionLog, check_all_invariants, wait_for

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
            with DecisionLog(bootstrap, s) as log:  # closed before the broker stops
                wait_for(lambda: log.count() >= 5, 180, "first decisions")
            broker.stop()
            assert broker.start(timeout=120) == bootstrap  # same ports, same data
            assert prod.wait(timeout=600) == 0, prod.log_text()[-3000:]
        finally:
            prod.stop()
            scorer.stop()
            admitter.stop()
        check_all_invariants(bootstrap, s, embedder)
    finally:
        broker.stop()
