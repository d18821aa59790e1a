"""``LagCollector``: a component's consumer lag, read from Kafka in a daemon thread and
exported when Prometheus scrapes, never on a component's event loop."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corpusfactory.metrics.constants import PREFIX

if TYPE_CHECKING:
    from corpusfactory.settings import Settings

log = logging.getLogger(__name__)


class LagCollector(Collector):
    """``corpusfactory_consumer_lag{group,topic}``: end offsets minus committed offsets.

    A daemon thread reads them from Kafka every ``metrics.lag_cache_s`` seconds
    (from the first scrape on, or ``start()``); a scrape only reads the last
    figures, so it never waits on Kafka (a scrape blocked on a broker that is down
    would time out and mark the whole component down). A partition without a
    committed offset counts from its start. Figures older than ``STALE_S`` (Kafka
    unreachable since) are left out: Prometheus shows a gap, not a stale number.
    """

    STALE_S = 60.0

    def __init__(
        self, settings: Settings, bootstrap: str, group: str, topics: Iterable[str]
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.group = group
        self.topics = list(topics)
        self.every_s = max(settings.metrics.lag_cache_s, 0.5)
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._at = -math.inf
        self._lag: dict[str, int] = {}
        self._admin: Any = None
        self._consumer: Any = None

    def _read(self) -> dict[str, int]:
        from kafka import KafkaAdminClient, TopicPartition

        from corpusfactory.kafka_clients import consumer, kafka_python_kwargs

        kafka = self.settings.kafka
        if self._admin is None:
            self._admin = KafkaAdminClient(
                **kafka_python_kwargs(kafka, self.bootstrap), client_id=f"{self.group}-lag"
            )
            self._consumer = consumer(kafka, self.bootstrap, group_id=None)
        # kafka-python 3: {group: {TopicPartition: OffsetAndMetadata}}; a group that
        # never committed has no entry.
        committed = self._admin.list_group_offsets([self.group]).get(self.group) or {}
        lag: dict[str, int] = {}
        for topic in self.topics:
            parts = self._consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            if not tps:
                continue
            ends = self._consumer.end_offsets(tps)
            begins = self._consumer.beginning_offsets(tps)
            total = 0
            for tp in tps:
                meta = committed.get(tp)
                pos = meta.offset if meta is not None and meta.offset >= 0 else begins[tp]
                total += max(0, ends[tp] - pos)
            lag[topic] = total
        return lag

    def refresh(self) -> bool:
        """Read the lag now (blocking); False when Kafka could not be read."""
        with self._io:  # the thread and a caller never share the clients at once
            try:
                lag = self._read()
            except Exception as exc:  # Kafka down or restarting: a gap, logged
                log.warning("consumer lag of %s unavailable: %s", self.group, exc)
                self._close_clients()
                return False
        with self._lock:
            self._lag, self._at = lag, time.monotonic()
        return True

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name=f"lag-{self.group}", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.every_s)
        with self._io:
            self._close_clients()

    def collect(self) -> Iterator[Metric]:
        self.start()
        family = GaugeMetricFamily(
            f"{PREFIX}_consumer_lag",
            "Messages behind the end of the topic, for the component's consumer group.",
            labels=["group", "topic"],
        )
        with self._lock:
            if time.monotonic() - self._at <= self.STALE_S:
                for topic, n in self._lag.items():
                    family.add_metric([self.group, topic], n)
        yield family

    def _close_clients(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                try:
                    client.close()
                except Exception as exc:  # closing a broken connection: nothing to keep
                    log.debug("closing a lag client: %s", exc)
        self._admin = self._consumer = None

    def close(self) -> None:
        """Stop the reading thread and close the Kafka clients."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            # A read stuck on an unreachable broker is not waited for: the daemon
            # thread closes its clients itself when the read gives up.
            thread.join(timeout=5)
            if thread.is_alive():
                return
        with self._io:
            self._close_clients()
