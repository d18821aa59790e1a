"""The evaluator: ``models.snapshots`` -> evaluation results -> ``models.evaluations``.

Run it with ``corpusfactory evaluate`` (a service) or ``corpusfactory evaluate --once``.
On start it evaluates the base model once (``evaluation.evaluate_base``) and every
complete snapshot that lacks a result (so nothing announced while it was down is
missed), then follows ``models.snapshots``. Each task's result is stored with the
snapshot (``eval/<task>.json``) and announced on ``models.evaluations`` (key: the model
id); the announcement offset is committed once all of a snapshot's tasks are done, and
finished tasks are never redone, so a crash costs at most the task in progress.

A task that fails (a task file in an unknown layout, a model that cannot be loaded) does
not stop the service: it is recorded in ``eval/<task>.failure`` beside the results
(``corpusfactory.failures``), counted in ``corpusfactory_evaluation_failures_total{task}``,
logged in one line, and the next task runs. A restart skips recorded tasks, so a bad
input cannot make the service fail in a loop; ``corpusfactory eval run --model ID`` (or
deleting the record) tries them again. Transient errors (an engine down) still raise.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata

from corpusfactory.contract import (
    EVALUATIONS,
    SCHEMA_VERSION,
    SNAPSHOTS,
    EvaluationPublished,
    decode_snapshot,
    encode,
)
from corpusfactory.errors import ContractError
from corpusfactory.failures import error_line
from corpusfactory.kafka_clients import assign, kafka_python_producer_kwargs
from corpusfactory.kafka_clients import consumer as kafka_consumer
from corpusfactory.metrics import EvaluatorMetrics
from corpusfactory.settings import Settings
from training.evaluation.runner import Evaluator
from training.snapshots import BASE_ID, SnapshotError

log = logging.getLogger(__name__)


class EvaluatorService:
    def __init__(
        self, settings: Settings, bootstrap: str, metrics: EvaluatorMetrics | None = None
    ) -> None:
        self.s = settings
        self.bootstrap = bootstrap
        self.evaluator = Evaluator(settings)
        self.metrics = metrics or EvaluatorMetrics()
        for task in settings.evaluation.tasks:  # exported at 0 from the start
            self.metrics.failures.labels(task)
        self.topic = settings.topic(SNAPSHOTS)
        self.group_id = f"{settings.kafka.topic_prefix}{settings.evaluation.group_id}"
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None

    def start(self) -> None:
        self._producer = KafkaProducer(**kafka_python_producer_kwargs(self.s.kafka, self.bootstrap))
        self._consumer = kafka_consumer(
            self.s.kafka, self.bootstrap, group_id=self.group_id, auto_offset_reset="earliest"
        )
        (self._tp,) = assign(self._consumer, self.topic, "committed", partitions=[0])
        # What earlier runs evaluated is exported too: a restart keeps the dashboards whole.
        store, base = self.evaluator.store, self.s.training.base_model
        self.metrics.observe(BASE_ID, store.evaluations(BASE_ID, base), counted=False)
        for snap in store.all():
            self.metrics.observe(snap.id, store.evaluations(snap.id), counted=False)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
        if self._producer is not None:
            self._producer.close()
        self._consumer = self._producer = None

    def __enter__(self) -> EvaluatorService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def catch_up(self) -> list[str]:
        """Evaluate the base model and every complete snapshot still missing a result."""
        done = []
        pending = partial(self.evaluator.pending_tasks, skip_failed=True)
        if self.s.evaluation.evaluate_base and pending(BASE_ID):
            self.evaluate(BASE_ID)
            done.append(BASE_ID)
        for snap in self.evaluator.store.all():
            if pending(snap.id):
                self.evaluate(snap.id)
                done.append(snap.id)
        return done

    def evaluate(self, model_id: str) -> dict[str, Any]:
        assert self._producer is not None, "start() first"
        out: dict[str, Any] = {}
        tasks = self.evaluator.evaluate(
            model_id, on_error=partial(self._failed, model_id), skip_failed=True
        )
        for task, results, path in tasks:
            record = EvaluationPublished(
                schema_version=SCHEMA_VERSION,
                model_id=model_id,
                task=task,
                results=results,
                path=str(path),
                evaluated_at=float(results["evaluated_at"]),
            )
            self._producer.send(
                self.s.topic(EVALUATIONS), key=model_id.encode(), value=encode(record)
            )
            out[task] = results
            log.info("%s %s: %s", model_id, task, _headline(results))
        self._producer.flush(timeout=30)
        if out:
            self.metrics.observe(model_id, out)
        return out

    def _failed(self, model_id: str, task: str, exc: Exception) -> None:
        """Record a failed task, count it, say so in one line; the evaluation goes on."""
        failures = self.evaluator.failures(model_id)
        failures.record(task, task, exc, model_id=model_id)
        self.metrics.failures.labels(task).inc()
        log.error(
            "%s %s failed, skipped from now on (%s; `corpusfactory eval run --model %s "
            "--tasks %s` tries again): %s",
            model_id, task, failures.path(task), model_id, task, error_line(exc),
        )  # fmt: skip

    def run(self, stop: threading.Event | None = None, once: bool = False) -> int:
        """Catch up, then follow announcements; ``once``: stop at the current end."""
        assert self._consumer is not None, "start() first"
        count = len(self.catch_up())
        end = self._consumer.end_offsets([self._tp])[self._tp]
        while not (stop is not None and stop.is_set()):
            if once and self._consumer.position(self._tp) >= end:
                break
            for records in self._consumer.poll(timeout_ms=1000).values():
                for rec in records:
                    count += self._handle(rec.value, rec.offset)
                    self._consumer.commit({self._tp: OffsetAndMetadata(rec.offset + 1, "", -1)})
        return count

    def _handle(self, raw: bytes | None, offset: int) -> int:
        try:
            ann = decode_snapshot(raw)
        except ContractError as exc:
            log.error("%s@%s: %s", self.topic, offset, exc)
            return 0
        try:
            if not self.evaluator.pending_tasks(ann.snapshot_id, skip_failed=True):
                return 0
            self.evaluate(ann.snapshot_id)
        except SnapshotError as exc:  # announced but gone (deleted by hand): say so, go on
            log.error("snapshot %s announced but not found: %s", ann.snapshot_id, exc)
            return 0
        return 1


def _headline(results: dict[str, Any]) -> str:
    keys = ("f1", "em", "macro_f1", "accuracy", "perplexity", "mean", "n")
    return ", ".join(f"{k}={results[k]:.4g}" if isinstance(results[k], float) else
                     f"{k}={results[k]}" for k in keys if k in results)  # fmt: skip
