"""Consumer lag read from the real broker (corpusfactory.metrics.LagCollector).

Run: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_metrics_lag.py``
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from corpusfactory.contract import ACCEPTED
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.metrics import WriterMetrics
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import wait_for
from tests.unit.test_metrics_export import samples

pytestmark = pytest.mark.integration


def test_lag_is_end_minus_committed_and_counts_an_uncommitted_partition_from_its_start(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, kafka_bootstrap, topic_prefix)
    settings.metrics.lag_cache_s = 0.0
    ensure_topics(settings, kafka_bootstrap)
    topic = settings.topic(ACCEPTED)  # 2 partitions
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(7):
        producer.send(topic, value=b"x", partition=i % 2)  # 4 to p0, 3 to p1
    producer.flush(timeout=30)
    producer.close()

    group = f"{topic_prefix}lag-test"
    metrics = WriterMetrics()
    lag = metrics.watch_lag(settings, kafka_bootstrap, group, [topic])
    try:
        key = ("corpusfactory_consumer_lag", (("group", group), ("topic", topic)))
        # A group never seen needs the offsets topic's coordinator: ready within seconds.
        wait_for(lag.refresh, 60, "the group coordinator")
        assert samples(metrics)[key] == 7  # nothing committed: everything is behind

        consumer = KafkaConsumer(
            bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
        )
        consumer.assign([TopicPartition(topic, 0)])
        consumer.commit({TopicPartition(topic, 0): OffsetAndMetadata(3, "", -1)})
        consumer.close(autocommit=False)
        assert lag.refresh()
        assert samples(metrics)[key] == 1 + 3  # p0: 4 - 3; p1: uncommitted, all 3
    finally:
        lag.close()


def test_an_unreachable_broker_never_blocks_a_scrape_and_leaves_the_series_out(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, "127.0.0.1:1", "t.")
    metrics = WriterMetrics()
    lag = metrics.watch_lag(settings, "127.0.0.1:1", "g", ["t.corpus.accepted"])
    try:
        for _ in range(3):  # the reading thread is stuck on the broker meanwhile
            got = samples(metrics)
            assert not any(name == "corpusfactory_consumer_lag" for name, _ in got)
            assert got["corpusfactory_corpus_messages", ()] == 0  # the rest is served
    finally:
        lag.close()
