"""The builder: every new snapshot -> GGUF builds that pass their quality gate.

Run it with ``corpusfactory build`` (a service following ``models.snapshots``) or
``corpusfactory build --once [--snapshot ID]``. For each complete snapshot without
builds it converts the weights to GGUF f16 (``serving.gguf.convert``), quantizes them
to every ``serving.quants`` type with llama.cpp's quantizer (``serving.gguf.quantize``),
and gates every build against the full-precision snapshot (``serving.gguf.gate``) on
held-out text: the snapshot's held-out conversations, topped up with seed conversations
to ``serving.gate_texts``. Each build is recorded (``builds.BuildStore``) and announced on
``models.builds``, published only if it passed; the serving processes follow that topic.

A snapshot whose build fails (the converter refuses it: ``ConversionError``; the quantizer
or the gate fails) does not stop the service: ``build_all`` and ``follow`` record it in
``<builds_dir>/<snapshot>.failure`` (``corpusfactory.failures``, with the step that failed
and the error), count it in ``corpusfactory_build_failures_total{reason}``, log one line
and go on with the next snapshot. The builds it completed before the failure stay. A
restart skips recorded snapshots, so one bad snapshot cannot make the builder fail in a
loop; ``corpusfactory build --snapshot ID`` (or deleting the record) tries again, and a
build that then succeeds clears the record. Transient errors (an engine down) raise.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from kafka.structs import OffsetAndMetadata

from corpusfactory.chatformat import ChatFormat
from corpusfactory.contract import (
    BUILDS,
    SCHEMA_VERSION,
    SNAPSHOTS,
    BuildPublished,
    decode_snapshot,
    encode,
)
from corpusfactory.errors import ContractError, is_transient
from corpusfactory.failures import FailureRecords, error_line
from corpusfactory.kafka_clients import announce, assign
from corpusfactory.kafka_clients import consumer as kafka_consumer
from corpusfactory.metrics import BuilderMetrics
from corpusfactory.seeds import load_seeds
from corpusfactory.settings import Settings
from serving.builds import Build, BuildStore
from training.data import read_jsonl
from training.snapshots import HELDOUT, Snapshot, SnapshotError, SnapshotStore

log = logging.getLogger(__name__)


class Builder:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str | None = None,
        metrics: BuilderMetrics | None = None,
    ) -> None:
        self.s = settings
        self.bootstrap = bootstrap
        self.snapshots = SnapshotStore(settings.snapshots_path)
        self.builds = BuildStore(settings.builds_path)
        self.failures = FailureRecords(settings.builds_path)
        self.metrics = metrics or BuilderMetrics()
        # Builds made by earlier runs are exported too (not counted as made here).
        for described in list_builds(settings):
            self.metrics.observe_build(described, counted=False)
        self.fmt = ChatFormat(settings.producer.user_tag, settings.producer.assistant_tag)

    def quants(self) -> list[str]:
        return ["F16", *[q for q in self.s.serving.quants if q != "F16"]]

    def missing(self, snap: Snapshot) -> list[str]:
        have = self.builds.for_snapshot(snap.id)
        return [q for q in self.quants() if q not in have]

    def gate_texts(self, snap: Snapshot) -> tuple[list[str], str]:
        """Up to ``serving.gate_texts`` texts: the snapshot's held-out conversations first,
        topped up with seed conversations (a young corpus holds out only a few)."""
        n = self.s.serving.gate_texts
        held = snap.path / HELDOUT
        convs = [c.messages for c in read_jsonl(held)][:n] if held.is_file() else []
        texts = [self.fmt.render(m) for m in convs]
        p = self.s.producer
        seeds = load_seeds(p.seed_file, p.seed_format)[: n - len(texts)]
        texts += [self.fmt.render(c.messages) for c in seeds]
        return texts, f"heldout:{len(convs)}+seeds:{len(seeds)}"

    def build(self, snap: Snapshot, keep_going: bool = False) -> list[Build]:
        """Convert, quantize and gate what is missing for ``snap``; return the new builds.

        The files are gated together, in one pass of the full model. A failure raises;
        with ``keep_going`` it is recorded, counted and logged instead (transient errors
        and a failed announcement still raise), and the builds announced before it are
        returned. Success clears an earlier failure record."""
        from serving.gguf.convert import convert_hf_to_gguf
        from serving.gguf.fetch import ConverterUnavailableError
        from serving.gguf.quantize import quantize

        todo = self.missing(snap)
        if not todo:
            self.failures.clear(snap.id)
            return []
        out: list[Build] = []
        step = "gate"  # the step under way: a failure's reason (gate texts come first)
        try:
            texts, text_source = self.gate_texts(snap)
            f16 = self.builds.gguf_path(snap.id, "F16")
            if not f16.is_file():
                step = "convert"
                log.info("converting %s to GGUF f16", snap.id)
                convert_hf_to_gguf(snap.path, f16, out_type="f16")
            started = time.perf_counter()
            paths: dict[str, Path] = {}
            for quant in todo:
                paths[quant] = f16 if quant == "F16" else self.builds.gguf_path(snap.id, quant)
                if quant != "F16":
                    step = "quantize"
                    quantize(f16, paths[quant], quant)
            # One gate pass for all the files: the full model runs once per gate text.
            step = "gate"
            figures = self._gate(snap, paths, texts, text_source)
            for quant in todo:
                build = self._record(snap, quant, figures[quant], started)
                step = "announce"
                self._announce(build)
                out.append(build)
        except Exception as exc:
            # A converter that cannot be fetched or run is the installation's problem,
            # not the snapshot's: never recorded as the snapshot's failure.
            if (
                not keep_going
                or step == "announce"
                or is_transient(exc)
                or isinstance(exc, ConverterUnavailableError)
            ):
                raise
            self._failed(snap, step, exc)
            return out
        self.failures.clear(snap.id)
        return out

    def _gate(
        self, snap: Snapshot, paths: dict[str, Path], texts: list[str], text_source: str
    ) -> dict[str, dict[str, Any]]:
        """Gate the GGUF files of ``snap`` (quant -> path) against it in one pass."""
        from serving.gguf.gate import gate_many

        budgets = self.s.serving.gate_budgets
        figures = gate_many(
            snap.path,
            {quant: (path, budgets[quant]) for quant, path in paths.items()},
            texts,
            max_tokens=self.s.serving.gate_max_tokens,
        )
        for f in figures.values():
            f["text_source"] = text_source
        return figures

    def _record(self, snap: Snapshot, quant: str, figures: dict[str, Any], started: float) -> Build:
        """Record one gated GGUF file as a build (published when it passed its gate)."""
        build = self.builds.record(
            snap.id,
            quant,
            {
                "gate": figures,
                "published": bool(figures["passed"]),
                "built_at": time.time(),
                # quantizing and gating are shared by the snapshot's files: the time
                # from the first quantization to this record
                "build_seconds": round(time.perf_counter() - started, 3),
            },
        )
        log.info(
            "%s %s: %d bytes, KL %.4g, top-1 %.3f, ppl %+.2f%% -> %s",
            snap.id, quant, build.record["size_bytes"], figures["kl_mean"],
            figures["top1_agreement"], figures["ppl_delta_pct"],
            "published" if build.published else "HELD BACK (outside its gate budget)",
        )  # fmt: skip
        self.metrics.observe_build(build.describe())
        return build

    def _failed(self, snap: Snapshot, step: str, exc: Exception) -> None:
        """Record a snapshot whose build failed, count it, say so in one line."""
        self.failures.record(snap.id, step, exc, snapshot=snap.id)
        self.metrics.failures.labels(step).inc()
        log.error(
            "%s: build failed at %s, skipped from now on (%s; `corpusfactory build "
            "--snapshot %s` tries again): %s",
            snap.id, step, self.failures.path(snap.id), snap.id, error_line(exc),
        )  # fmt: skip

    def build_all(self) -> list[Build]:
        """Builds for every complete snapshot that lacks some (oldest first); a snapshot
        that fails is recorded and the next one is built; recorded ones are skipped."""
        self.builds.cleanup_partial()
        out: list[Build] = []
        for snap in self.snapshots.all():
            if not self._skipped(snap.id):
                out += self.build(snap, keep_going=True)
        return out

    def _skipped(self, snapshot_id: str) -> bool:
        record = self.failures.get(snapshot_id)
        if record is None:
            return False
        log.info("%s: skipped, its build failed at %s before (%s)",
                 snapshot_id, record.get("reason"), self.failures.path(snapshot_id))  # fmt: skip
        return True

    def _announce(self, build: Build) -> None:
        if self.bootstrap is None:
            return
        record = BuildPublished(
            schema_version=SCHEMA_VERSION,
            snapshot_id=build.snapshot,
            quant=build.quant,
            path=str(build.path),
            size_bytes=int(build.record["size_bytes"]),
            gate=build.record["gate"],
            published=build.published,
            built_at=float(build.record["built_at"]),
        )
        announce(self.s.kafka, self.bootstrap, self.s.topic(BUILDS), build.snapshot, encode(record))

    def follow(self, stop: threading.Event) -> int:
        """Catch up, then build each snapshot announced on ``models.snapshots``."""
        assert self.bootstrap is not None, "following needs Kafka"
        made = len(self.build_all())
        group = f"{self.s.kafka.topic_prefix}{self.s.serving.builder_group_id}"
        consumer = kafka_consumer(self.s.kafka, self.bootstrap, group_id=group)
        # Earlier snapshots were caught up above: a group that never committed starts at
        # the end.
        (tp,) = assign(consumer, self.s.topic(SNAPSHOTS), partitions=[0], fallback="end")
        try:
            while not stop.is_set():
                for records in consumer.poll(timeout_ms=1000).values():
                    for rec in records:
                        made += self._handle(rec.value)
                        consumer.commit({tp: OffsetAndMetadata(rec.offset + 1, "", -1)})
        finally:
            consumer.close(autocommit=False)
        return made

    def _handle(self, raw: bytes | None) -> int:
        try:
            ann = decode_snapshot(raw)
            snap = self.snapshots.get(ann.snapshot_id)
        except (ContractError, SnapshotError) as exc:
            log.error("skipping a snapshot announcement: %s", exc)
            return 0
        if self._skipped(snap.id):
            return 0
        return len(self.build(snap, keep_going=True))


def list_builds(settings: Settings) -> list[dict[str, Any]]:
    return [b.describe() for b in BuildStore(settings.builds_path).all()]
