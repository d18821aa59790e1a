"""The trainer: ``corpus.accepted`` -> DeepSpeed fine-tuning -> published snapshots.

Run it with ``corpusfactory train`` (a service) or ``corpusfactory train --once`` (read
what is there, train once if anything is new, exit).

Offsets are managed explicitly. The trainer assigns itself every partition of
``corpus.accepted`` (one trainer per topic; no group rebalances during a long run) and
positions each at the end offset recorded in the newest complete snapshot's manifest,
or at the beginning when there is none. Conversations are buffered in memory until the
trigger policy (``training.trigger``) fires; then the snapshot is trained in a child
process (``training.fit``), published atomically, announced on ``models.snapshots``,
and only then are the offsets committed to Kafka (group ``training.group_id``; a
mirror of the manifests, for lag monitoring). A crash anywhere before publication
leaves no snapshot, and the next start reads the same conversations again; a crash
after it finds the new manifest and goes on from there. So no conversation is skipped,
and none is trained on twice: ids already in the lineage's ``conversations.txt`` are
dropped (a producer may publish a conversation again after a crash).

``training.init``: ``continue`` trains the previous snapshot on the new conversations
only; ``base`` trains the base model on every conversation from the topic's start.

A window whose training fails (the DeepSpeed child exits non-zero: bad data, out of
memory, a model it cannot load; or writing or publishing the snapshot fails) does not
stop the service and is never trained again as it was. It is recorded in
``<state>/training/failures/<sha256 of its training data>.failure``
(``corpusfactory.failures``: ``reason`` is the step, ``fit``, ``save`` or ``publish``;
the error with the end of the child's log; the offsets, the snapshot it follows and how
many conversations), counted in ``corpusfactory_training_failures_total``, logged in one
line. Its offsets are not committed and its conversations stay pending: the trigger then
counts only conversations that arrive after the failed window (and the timer restarts
at the failure), so the next attempt trains the failed window's conversations together
with the new ones, and a window that fails again is recorded under its own hash. No
conversation is dropped, and a restart reads the records, so it neither retrains the
failed window nor fires early. A snapshot that succeeds clears the records of the
windows it covered. ``train --once`` records a failure too, then exits non-zero.
Deleting a record (after fixing the cause) lets that window train at once. Transient
errors (``errors.is_transient``) are never recorded: they raise, as every error after
publication does (a restart resumes from the published manifest).
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition

from corpusfactory.chatformat import ChatFormat
from corpusfactory.contract import (
    ACCEPTED,
    SCHEMA_VERSION,
    SNAPSHOTS,
    SnapshotPublished,
    decode_accepted,
    encode,
)
from corpusfactory.engines.models.registry import resolve_model
from corpusfactory.errors import ContractError, is_transient
from corpusfactory.failures import FailureRecords, error_line
from corpusfactory.kafka_clients import announce
from corpusfactory.kafka_clients import consumer as kafka_consumer
from corpusfactory.metrics import TrainerMetrics
from corpusfactory.records import SnapshotManifest
from corpusfactory.settings import Settings
from training import dsconfig
from training.data import TrainingConversation, data_hash, write_jsonl
from training.fit import STATS
from training.launch import TrainingError, fit_command, run_fit, write_job
from training.snapshots import CONVERSATIONS, HELDOUT, MANIFEST, Snapshot, SnapshotStore
from training.trigger import TriggerPolicy
from training.window import (
    Pending,
    failures_after,
    manifest_ends,
    read_from_start,
    select_window,
)

log = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self, settings: Settings, bootstrap: str, metrics: TrainerMetrics | None = None
    ) -> None:
        self.s = settings
        self.t = settings.training
        self.metrics = metrics or TrainerMetrics()
        self.bootstrap = bootstrap
        self.store = SnapshotStore(settings.snapshots_path)
        self.policy = TriggerPolicy.from_settings(self.t.trigger)
        self.fmt = ChatFormat(settings.producer.user_tag, settings.producer.assistant_tag)
        self.topic = settings.topic(ACCEPTED)
        self.jobs_dir = settings.state_path / "training" / "jobs"
        self.ds_config = dsconfig.resolve(dsconfig.load(self.t.deepspeed_config), self.t)
        self.group_id = f"{settings.kafka.topic_prefix}{self.t.group_id}"
        self._consumer: KafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self.pending = Pending()
        self.last_snapshot_at = time.time()
        self.failures = FailureRecords(settings.state_path / "training" / "failures")
        # The ends of the last failed window that starts where pending starts: only
        # conversations past them count for the trigger, from the time it failed.
        self.failed_through: dict[int, int] = {}
        self.last_failure_at = 0.0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        removed = self.store.cleanup_partial()
        if removed:
            log.warning("removed incomplete snapshots from an earlier crash: %s", removed)
        if self.jobs_dir.exists():
            shutil.rmtree(self.jobs_dir)
        latest = self.store.latest()
        if latest is not None:
            self.metrics.observe_snapshot(latest.manifest)
            self.last_snapshot_at = float(latest.manifest.get("created_at", time.time()))
        consumer = kafka_consumer(
            self.s.kafka,
            self.bootstrap,
            group_id=self.group_id,
            client_id=f"{self.group_id}-consumer",
            auto_offset_reset="earliest",
            max_poll_records=500,
        )
        parts = consumer.partitions_for_topic(self.topic)
        if not parts:
            consumer.close()
            raise TrainingError(f"topic {self.topic} does not exist (run the workers first)")
        self._tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        consumer.assign(self._tps)
        ends = manifest_ends(latest)
        for tp in self._tps:
            if tp.partition in ends:
                consumer.seek(tp, ends[tp.partition])
            else:
                consumer.seek_to_beginning(tp)
            committed = consumer.committed(tp)
            if latest is not None and committed is not None and committed != ends.get(tp.partition):
                log.warning(
                    "partition %s: committed offset %s differs from snapshot %s's end %s; "
                    "the snapshot wins",
                    tp.partition, committed, latest.id, ends.get(tp.partition),
                )  # fmt: skip
        self._consumer = consumer
        self.pending = Pending(positions={tp.partition: consumer.position(tp) for tp in self._tps})
        self._load_failures(latest)
        if latest is not None:
            # Commit what the manifest says, in case the last run died before committing.
            self._commit(self.pending.positions)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)
            self._consumer = None

    def __enter__(self) -> Trainer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop -------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, max_snapshots: int | None = None) -> int:
        """Consume and train until ``stop`` is set or ``max_snapshots`` were published."""
        made = 0
        while not (stop is not None and stop.is_set()):
            self.poll(self.t.poll_timeout_s)
            reason = self.policy.due(self.new_trainable(), time.time() - self._last_attempt_at())
            if reason is not None and self.snapshot(reason, keep_going=True) is not None:
                made += 1
                if max_snapshots is not None and made >= max_snapshots:
                    break
        return made

    def run_once(self) -> Snapshot | None:
        """Read to the end offsets seen now, then train once on what is new (if anything)."""
        assert self._consumer is not None, "start() first"
        ends = self._consumer.end_offsets(self._tps)
        while any(self.pending.positions[tp.partition] < ends[tp] for tp in self._tps):
            self.poll(1.0)
        if self.new_trainable() == 0:
            if self.failed_through:
                log.info("nothing new to train on since the failed window (%s)", self.failures.root)
            else:
                log.info("nothing new to train on")
            return None
        return self.snapshot("once")

    def new_trainable(self) -> int:
        """Pending trainable conversations the trigger counts: those past a failed window."""
        return self.pending.trainable(self.t, after=self.failed_through)

    def _last_attempt_at(self) -> float:
        return max(self.last_snapshot_at, self.last_failure_at)

    def poll(self, timeout_s: float) -> int:
        assert self._consumer is not None, "start() first"
        batch = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        n = 0
        for tp, records in batch.items():
            for rec in records:
                try:
                    conv = decode_accepted(rec.value)
                except ContractError as exc:
                    # Written by our own workers, so this is a bug upstream: count it in the
                    # manifest and go on; the corpus writer keeps the raw event.
                    log.error("%s[%s]@%s: %s", tp.topic, tp.partition, rec.offset, exc)
                    self.pending.undecodable += 1
                else:
                    self.pending.conversations.append(
                        TrainingConversation.from_accepted(conv, tp.partition, rec.offset)
                    )
                self.pending.positions[tp.partition] = rec.offset + 1
                n += 1
        self.metrics.pending.set(len(self.pending.conversations))
        return n

    # -- one snapshot ---------------------------------------------------------------------

    def snapshot(self, reason: str, keep_going: bool = False) -> Snapshot | None:
        """Train, publish and announce a snapshot of the pending window; None when there
        is nothing to train on. A window that fails at ``fit``, ``save`` or ``publish``
        is recorded, counted and logged (``_failed``), then raised, or with
        ``keep_going`` (the service loop) answered with None."""
        latest = self.store.latest()
        parent = latest if self.t.init == "continue" else None
        window = self._window(latest)
        train, heldout, counts = select_window(
            window, parent, self.store, self.t, self.pending.undecodable
        )
        if not train:
            log.info("trigger %s but no conversation to train on: %s", reason, dict(counts))
            # Keep only what a later snapshot still needs (held-out conversations), so an
            # all-duplicate window does not fire the trigger again and again.
            self.pending.conversations = [
                c
                for c in self.pending.conversations
                if c.conversation_id in {h.conversation_id for h in heldout}
            ]
            return None
        key = data_hash(train)
        if self.failures.failed(key):
            log.info(
                "trigger %s: this window of %d conversations failed before (%s); waiting "
                "for new conversations", reason, len(train), self.failures.path(key),
            )  # fmt: skip
            self.failed_through = dict(self.pending.positions)
            return None
        seq = (latest.seq if latest else 0) + 1
        snap_id = self.store.new_id(seq)
        job_dir = self.jobs_dir / snap_id
        offsets = self._offsets(latest)
        step, init_from = "fit", ""  # the step under way: a failure's reason
        try:
            if self.jobs_dir.exists():  # only the last failed run's job is kept
                shutil.rmtree(self.jobs_dir)
            init_from = (
                str(parent.path)
                if parent
                else resolve_model(self.s.training.base_model, self.s.models.models_dir)
            )
            staging = self.store.staging(snap_id)
            started = time.time()
            stats = self._fit(job_dir, snap_id, init_from, staging, train)
            step = "save"
            manifest = {
                "id": snap_id,
                "seq": seq,
                "parent": parent.id if parent else "",
                "base_model": self.t.base_model,
                "init": self.t.init,
                "init_from": init_from,
                "created_at": time.time(),
                "trigger": reason,
                "topic": self.topic,
                "offsets": offsets,
                "conversations": len(train),
                "conversations_by_source": dict(Counter(c.source for c in train)),
                "heldout_conversations": len(heldout),
                "skipped": dict(counts),
                "data_hash": key,
                "training": self.t.model_dump(mode="json"),
                "deepspeed": self.ds_config,
                "launcher": fit_command(self.t, job_dir)[:-1],
                "wall_seconds": round(time.time() - started, 3),
                **{k: v for k, v in stats.items() if k not in ("loss_curve",)},
                "loss_curve": stats.get("loss_curve", []),
            }
            (staging / CONVERSATIONS).write_text(
                "".join(c.conversation_id + "\n" for c in train), encoding="utf-8"
            )
            write_jsonl(staging / HELDOUT, heldout)
            (staging / STATS).unlink(missing_ok=True)  # its content is in the manifest
            manifest = SnapshotManifest.read(manifest, staging / MANIFEST).as_dict()
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            step = "publish"
            snap = self.store.publish(snap_id)
        except Exception as exc:
            if is_transient(exc):
                raise
            self._failed(key, step, exc, snap_id, latest, init_from, job_dir, offsets, len(train))
            if keep_going:
                return None
            raise
        self._published(snap, latest, job_dir)
        return snap

    def _published(self, snap: Snapshot, latest: Snapshot | None, job_dir: Path) -> None:
        """Announce a published snapshot, commit its offsets, start a new window."""
        self._announce(snap)
        self._commit(self.pending.positions)
        shutil.rmtree(job_dir, ignore_errors=True)
        self.pending = Pending(positions=dict(self.pending.positions))
        self.last_snapshot_at = time.time()
        resolved = failures_after(self.failures, self.topic, latest)
        for item in resolved:  # their conversations are in this snapshot
            self.failures.clear(item)
        if resolved:
            log.info("%s covers %d earlier failed window(s): records cleared", snap.id,
                     len(resolved))  # fmt: skip
        self.failed_through, self.last_failure_at = {}, 0.0
        manifest = snap.manifest
        self.metrics.snapshots.inc()
        self.metrics.observe_snapshot(manifest)
        self.metrics.pending.set(0)
        log.info(
            "published %s: %d conversations, loss %s -> %s",
            snap.id, manifest.get("conversations"), manifest.get("first_loss"),
            manifest.get("final_loss"),
        )  # fmt: skip

    # -- failed windows ---------------------------------------------------------------------

    def _failed(
        self,
        key: str,
        step: str,
        exc: BaseException,
        snap_id: str,
        latest: Snapshot | None,
        init_from: str,
        job_dir: Path,
        offsets: dict[str, dict[str, int]],
        conversations: int,
    ) -> None:
        """Record a failed window, count it, say so in one line; nothing is committed and
        its conversations stay pending, for the next window."""
        removed = self.store.cleanup_partial()  # a staged or unmarked snapshot
        if removed:
            log.warning("removed the partial snapshot of the failed window: %s", removed)
        ends = dict(self.pending.positions)
        self.failures.record(
            key,
            step,
            exc,
            topic=self.topic,
            after_snapshot=latest.id if latest else "",
            ends={str(p): off for p, off in sorted(ends.items())},
            offsets=offsets,
            conversations=conversations,
            snapshot=snap_id,
            init_from=init_from,
            job_dir=str(job_dir),
        )
        self.failed_through, self.last_failure_at = ends, time.time()
        log.error(
            "training window of %d conversations failed at %s (%s, job %s); its "
            "conversations wait for the next window, with new ones: %s",
            conversations, step, self.failures.path(key), job_dir, error_line(exc),
        )  # fmt: skip
        self.metrics.failures.inc()

    def _load_failures(self, latest: Snapshot | None) -> None:
        """After a restart: the failed windows that start where pending starts."""
        self.failed_through, self.last_failure_at = {}, 0.0
        for rec in failures_after(self.failures, self.topic, latest).values():
            for p, end in rec["ends"].items():
                part = int(p)
                self.failed_through[part] = max(self.failed_through.get(part, 0), int(end))
            self.last_failure_at = max(self.last_failure_at, float(rec.get("failed_at", 0.0)))
        if self.failed_through:
            log.warning(
                "a training window failed before (%s): its conversations are trained with "
                "the next new ones", self.failures.root,
            )  # fmt: skip

    def _window(self, latest: Snapshot | None) -> list[TrainingConversation]:
        if self.t.init == "continue":
            return list(self.pending.conversations)
        return read_from_start(
            self.s, self.bootstrap, self.topic, self._tps, self.pending.positions
        )

    def _offsets(self, latest: Snapshot | None) -> dict[str, dict[str, int]]:
        assert self._consumer is not None
        if self.t.init == "base" or latest is None:
            starts = {
                tp.partition: v for tp, v in self._consumer.beginning_offsets(self._tps).items()
            }
        else:
            starts = manifest_ends(latest)
            firsts = self._consumer.beginning_offsets(self._tps)
            for tp in self._tps:
                starts.setdefault(tp.partition, firsts[tp])
        return {
            str(p): {"start": starts[p], "end": self.pending.positions[p]}
            for p in sorted(self.pending.positions)
        }

    # -- the child process ------------------------------------------------------------------

    def _fit(
        self,
        job_dir: Path,
        snap_id: str,
        init_from: str,
        staging: Path,
        train: list[TrainingConversation],
    ) -> dict[str, Any]:
        write_job(job_dir, snap_id, init_from, staging, train, self.t, self.ds_config, self.fmt)
        cmd = fit_command(self.t, job_dir)
        log.info("training %s on %d conversations: %s", snap_id, len(train), " ".join(cmd))
        try:
            return run_fit(cmd, job_dir, staging)
        except TrainingError:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    # -- Kafka out --------------------------------------------------------------------------

    def _announce(self, snap: Snapshot) -> None:
        record = SnapshotPublished(
            schema_version=SCHEMA_VERSION,
            snapshot_id=snap.id,
            parent=snap.parent,
            base_model=str(snap.manifest.get("base_model", "")),
            path=str(snap.path),
            conversations=int(snap.manifest.get("conversations", 0)),
            created_at=float(snap.manifest.get("created_at", 0.0)),
        )
        announce(self.s.kafka, self.bootstrap, self.s.topic(SNAPSHOTS), snap.id, encode(record))

    def _commit(self, positions: dict[int, int]) -> None:
        assert self._consumer is not None
        self._consumer.commit(
            {
                TopicPartition(self.topic, p): OffsetAndMetadata(off, "", -1)
                for p, off in positions.items()
            }
        )
