"""The corpus writer: Kafka ``corpus.accepted`` + ``turns.decisions`` -> the corpus store.

At-least-once from Kafka, exactly-once in the store: each polled batch is decoded,
appended to the store and fsynced, and only then are its offsets committed. A crash
between the fsync and the commit redelivers the batch, and the store skips what it
already holds (conversations by id, decisions by content, undecodable events by
topic/partition/offset).

An event that cannot be decoded is logged with its topic, partition and offset and
recorded in the store's ``undecodable`` shards (counted in ``stats()``), then its
offset is committed like any other: it is never retried forever, and never lost
silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers.store import DEFAULT_SHARD_LINES, CorpusStore, Undecodable
from corpusfactory.contract import (
    ACCEPTED,
    DECISIONS,
    AcceptedConversation,
    Decision,
    decode_accepted,
    decode_decision,
)
from corpusfactory.errors import ContractError
from corpusfactory.kafka_clients import consumer as kafka_consumer
from corpusfactory.metrics import WriterMetrics
from corpusfactory.settings import Settings

log = logging.getLogger(__name__)

GROUP_SUFFIX = "corpus-writer"


@dataclass
class WriterReport:
    """What a ``run`` / ``run_once`` call consumed and wrote."""

    records: int = 0
    batches: int = 0
    accepted_written: int = 0
    accepted_skipped: int = 0
    decisions_written: int = 0
    decisions_skipped: int = 0
    undecodable: int = 0
    commit_failures: int = 0
    drained: bool = False  # run_once: every assigned partition was read to its end


def default_group_id(settings: Settings) -> str:
    return f"{settings.kafka.topic_prefix}{GROUP_SUFFIX}"


class CorpusWriter:
    """Consume accepted conversations and decisions into a ``CorpusStore``.

    ``store``: an open store to write to (it is left open by ``close``); by default
    the writer opens ``<state_dir>/corpus`` itself and closes it on ``close``.
    ``group_id``: the consumer group (default ``<prefix>corpus-writer``).
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        *,
        store: CorpusStore | None = None,
        group_id: str | None = None,
        shard_lines: int = DEFAULT_SHARD_LINES,
        max_poll_records: int = 500,
        poll_timeout_s: float = 0.5,
        metrics: WriterMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.group_id = group_id or default_group_id(settings)
        self.accepted_topic = settings.topic(ACCEPTED)
        self.decisions_topic = settings.topic(DECISIONS)
        self.max_poll_records = max_poll_records
        self.poll_timeout_s = poll_timeout_s
        self._owns_store = store is None
        if store is None:
            store = CorpusStore.from_settings(settings, shard_lines=shard_lines)
        self.store = store
        self.metrics = metrics or WriterMetrics()
        self.metrics.set_counts(*store.counts())
        self._consumer: KafkaConsumer | None = None
        self.total = WriterReport()

    # -- lifecycle ---------------------------------------------------------------

    def _ensure_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            consumer = kafka_consumer(
                self.settings.kafka,
                self.bootstrap,
                group_id=self.group_id,
                client_id=f"corpusfactory-{GROUP_SUFFIX}",
                auto_offset_reset="earliest",
                isolation_level="read_committed",
                max_poll_records=self.max_poll_records,
                max_partition_fetch_bytes=max(1_048_576, self.settings.kafka.max_message_bytes),
            )
            consumer.subscribe([self.accepted_topic, self.decisions_topic])
            self._consumer = consumer
            log.info(
                "corpus writer: group %s reading %s, %s from %s into %s",
                self.group_id,
                self.accepted_topic,
                self.decisions_topic,
                self.bootstrap,
                self.store.root,
            )
        return self._consumer

    def close(self) -> None:
        """Close the consumer (without committing anything) and an owned store."""
        try:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
                self._consumer = None
        finally:
            if self._owns_store:
                self.store.close()

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one batch ---------------------------------------------------------------

    def _decode(
        self, records: Mapping[TopicPartition, Sequence[Any]]
    ) -> tuple[list[AcceptedConversation], list[Decision], list[Undecodable]]:
        accepted: list[AcceptedConversation] = []
        decisions: list[Decision] = []
        bad: list[Undecodable] = []
        for tp, msgs in records.items():
            for m in msgs:
                try:
                    if tp.topic == self.accepted_topic:
                        conv = decode_accepted(m.value)
                        if not conv.conversation_id.strip():
                            raise ContractError("accepted conversation: empty conversation_id")
                        accepted.append(conv)
                    elif tp.topic == self.decisions_topic:
                        dec = decode_decision(m.value)
                        if not dec.turn_id.strip():
                            raise ContractError("decision: empty turn_id")
                        decisions.append(dec)
                    else:  # pragma: no cover - we subscribe to these two topics only
                        raise ContractError(f"unexpected topic {tp.topic!r}")
                except (ContractError, TypeError, ValueError) as exc:
                    error = str(exc)
                    if not isinstance(exc, ContractError):
                        error = f"{type(exc).__name__}: {error}"
                    log.warning(
                        "corpus writer: undecodable event at %s[%d]@%d skipped and recorded: %s",
                        tp.topic,
                        tp.partition,
                        m.offset,
                        error,
                    )
                    bad.append(Undecodable(tp.topic, tp.partition, m.offset, m.key, m.value, error))
        return accepted, decisions, bad

    def _process(
        self, records: Mapping[TopicPartition, Sequence[Any]], report: WriterReport
    ) -> None:
        consumer = self._ensure_consumer()
        n = sum(len(msgs) for msgs in records.values())
        if n == 0:
            return
        accepted, decisions, bad = self._decode(records)
        # Durable first (raises on failure: then nothing is committed) ...
        result = self.store.write_batch(accepted, decisions, bad)
        # ... then the offsets.
        offsets = {
            tp: OffsetAndMetadata(msgs[-1].offset + 1, "", -1)
            for tp, msgs in records.items()
            if msgs
        }
        try:
            consumer.commit(offsets=offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The batch is stored; a redelivery is skipped by the store's dedupe.
            report.commit_failures += 1
            log.warning("corpus writer: offset commit failed (the batch is stored): %s", exc)
        report.records += n
        report.batches += 1
        report.accepted_written += result.accepted_written
        report.accepted_skipped += result.accepted_skipped
        report.decisions_written += result.decisions_written
        report.decisions_skipped += result.decisions_skipped
        report.undecodable += len(bad)
        self.metrics.undecodable.inc(len(bad))
        self.metrics.set_counts(*self.store.counts())
        log.debug(
            "corpus writer: batch of %d: %d conversation(s) stored, %d already stored, "
            "%d decision(s), %d undecodable",
            n,
            result.accepted_written,
            result.accepted_skipped,
            result.decisions_written,
            len(bad),
        )

    def _poll(self) -> Mapping[TopicPartition, Sequence[Any]]:
        consumer = self._ensure_consumer()
        return consumer.poll(
            timeout_ms=int(self.poll_timeout_s * 1000), max_records=self.max_poll_records
        )

    def _merge(self, report: WriterReport) -> None:
        for name in (
            "records",
            "batches",
            "accepted_written",
            "accepted_skipped",
            "decisions_written",
            "decisions_skipped",
            "undecodable",
            "commit_failures",
        ):
            setattr(self.total, name, getattr(self.total, name) + getattr(report, name))

    def _summary(self, what: str, report: WriterReport) -> None:
        log.info(
            "corpus writer %s: %d record(s), %d conversation(s) stored, %d already stored, "
            "%d decision(s), %d undecodable, %d commit failure(s)",
            what,
            report.records,
            report.accepted_written,
            report.accepted_skipped,
            report.decisions_written,
            report.undecodable,
            report.commit_failures,
        )

    # -- loops -------------------------------------------------------------------

    def run(
        self, stop_event: threading.Event | None = None, max_idle_s: float | None = None
    ) -> WriterReport:
        """Consume until ``stop_event`` is set or ``max_idle_s`` pass with no records.

        The idle clock starts when the writer starts and restarts on every record
        and when the consumer first gets its partitions (joining the group may
        take a few seconds). With neither argument it runs until interrupted.
        """
        report = WriterReport()
        consumer = self._ensure_consumer()
        last = time.monotonic()
        assigned = bool(consumer.assignment())
        try:
            while stop_event is None or not stop_event.is_set():
                records = self._poll()
                now = time.monotonic()
                if not assigned and consumer.assignment():
                    assigned = True
                    last = now
                if records:
                    self._process(records, report)
                    last = now
                elif max_idle_s is not None and now - last >= max_idle_s:
                    break
        finally:
            self._merge(report)
            self._summary("stopped", report)
        return report

    def run_once(self, timeout_s: float = 30.0) -> WriterReport:
        """Drain what is in the topics now, then return (at the latest after ``timeout_s``).

        Waits for the group assignment, takes the end offsets of the assigned
        partitions and consumes until every one is reached. ``drained`` in the
        report says whether that happened before the timeout.
        """
        report = WriterReport()
        consumer = self._ensure_consumer()
        deadline = time.monotonic() + timeout_s
        try:
            existing = consumer.topics()
            if not {self.accepted_topic, self.decisions_topic} & existing:
                log.warning(
                    "corpus writer: neither %s nor %s exists; nothing to drain",
                    self.accepted_topic,
                    self.decisions_topic,
                )
                report.drained = True
                return report
            targets: dict[TopicPartition, int] = {}
            while time.monotonic() < deadline:
                records = self._poll()
                if records:
                    self._process(records, report)
                assignment = consumer.assignment()
                if not assignment:
                    continue
                missing = [tp for tp in assignment if tp not in targets]
                if missing:
                    targets.update(consumer.end_offsets(missing))
                if all(consumer.position(tp) >= targets[tp] for tp in assignment):
                    report.drained = True
                    break
            else:
                log.warning("corpus writer: not drained after %.1f s", timeout_s)
        finally:
            self._merge(report)
            self._summary("drained" if report.drained else "run_once", report)
        return report
