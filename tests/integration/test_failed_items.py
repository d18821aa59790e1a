"""A bad item never stops a follow-mode service (issue 10): the builder and the evaluator
record it with its reason, count it, and go on with the next one; a restart skips it.

Snapshots here are the demo generator copied into the snapshot store (no training): one
as it is, and ones whose ``config.json`` names an architecture the GGUF converter
refuses. The converter, quantizer, gate, evaluator and broker are the real ones.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition

from corpusfactory.cli.main import main
from corpusfactory.contract import (
    BUILDS,
    EVALUATIONS,
    SCHEMA_VERSION,
    SNAPSHOTS,
    SnapshotPublished,
    decode_build,
    decode_evaluation,
    encode,
)
from corpusfactory.engines.models.demo import DemoModels
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.metrics import BuilderMetrics, EvaluatorMetrics
from corpusfactory.settings import Settings
from corpusfactory.tools.stack import write_settings
from serving.builder import Builder
from serving.builds import BuildStore
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import read_topic, wait_for
from training.evaluation.service import EvaluatorService
from training.snapshots import BASE_ID, MANIFEST, Snapshot, SnapshotStore

pytestmark = pytest.mark.integration

EVALITA = Path(__file__).resolve().parent.parent / "fixtures" / "evalita"


def opt(config: dict[str, Any]) -> None:
    config.update(architectures=["OPTForCausalLM"], model_type="opt")


def add_snapshot(
    store: SnapshotStore,
    seq: int,
    model_dir: Path,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Snapshot:
    """Publish a copy of ``model_dir`` as snapshot ``seq`` (``edit`` changes its config)."""
    snap_id = f"snap-{seq:05d}-20250101T{seq:06d}Z"
    staging = store.staging(snap_id)
    shutil.copytree(model_dir, staging, dirs_exist_ok=True)
    if edit is not None:
        config = json.loads((staging / "config.json").read_text())
        edit(config)
        (staging / "config.json").write_text(json.dumps(config))
    manifest = {"id": snap_id, "seq": seq, "parent": "", "base_model": "demo:generator"}
    (staging / MANIFEST).write_text(json.dumps(manifest))
    return store.publish(snap_id)


def announce(bootstrap: str, settings: Settings, snap: Snapshot) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        record = SnapshotPublished(
            schema_version=SCHEMA_VERSION,
            snapshot_id=snap.id,
            parent="",
            base_model="demo:generator",
            path=str(snap.path),
            conversations=0,
            created_at=time.time(),
        )
        producer.send(settings.topic(SNAPSHOTS), key=snap.id.encode(), value=encode(record))
        producer.flush(timeout=30)
    finally:
        producer.close()


def commit_at_end(bootstrap: str, group: str, topic: str) -> None:
    """Commit ``group`` at the topic's end, as a builder that ran before would have."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_end(tp)
        consumer.commit({tp: OffsetAndMetadata(consumer.position(tp), "", -1)})
    finally:
        consumer.close(autocommit=False)


def build_failures(metrics: BuilderMetrics, reason: str) -> float | None:
    return metrics.registry.get_sample_value(
        "corpusfactory_build_failures_total", {"reason": reason}
    )


def test_builder_records_a_refused_snapshot_and_builds_the_next(
    kafka_bootstrap: str,
    topic_prefix: str,
    tmp_path: Path,
    built_models: DemoModels,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # F16 only: the gate of one build is all this test needs.
    settings = make_settings(
        tmp_path / "state",
        kafka_bootstrap,
        topic_prefix,
        serving={"quants": [], "quant": "F16", "gate_texts": 4},
    )
    ensure_topics(settings, kafka_bootstrap)
    store = SnapshotStore(settings.snapshots_path)
    group = f"{topic_prefix}{settings.serving.builder_group_id}"
    commit_at_end(kafka_bootstrap, group, settings.topic(SNAPSHOTS))
    first_bad = add_snapshot(store, 1, built_models.generator, opt)  # found by the catch-up

    metrics = BuilderMetrics()
    builder = Builder(settings, kafka_bootstrap, metrics)
    assert build_failures(metrics, "convert") == 0.0  # exported from the start
    stop = threading.Event()
    follower = threading.Thread(target=builder.follow, args=(stop,), daemon=True)
    follower.start()
    try:
        wait_for(lambda: builder.failures.failed(first_bad.id), 120, "the first failure")
        # Announced while following: a refused snapshot, then a good one behind it.
        second_bad = add_snapshot(store, 2, built_models.generator, opt)
        announce(kafka_bootstrap, settings, second_bad)
        good = add_snapshot(store, 3, built_models.generator)
        announce(kafka_bootstrap, settings, good)
        builds = BuildStore(settings.builds_path)
        wait_for(lambda: builds.for_snapshot(good.id), 300, "the good snapshot's build")
    finally:
        stop.set()
        follower.join(timeout=60)
    assert not follower.is_alive()

    assert builds.for_snapshot(good.id)["F16"].published
    assert builds.for_snapshot(first_bad.id) == builds.for_snapshot(second_bad.id) == {}
    records = builder.failures.all()
    assert set(records) == {first_bad.id, second_bad.id}
    for snap_id, rec in records.items():
        assert rec["reason"] == "convert" and rec["error_type"] == "ConversionError"
        assert "OPTForCausalLM is not supported" in rec["error"]
        assert rec["snapshot"] == snap_id
        assert (settings.builds_path / f"{snap_id}.failure").is_file()
    assert build_failures(metrics, "convert") == 2.0
    assert build_failures(metrics, "quantize") == build_failures(metrics, "gate") == 0.0
    announced = [decode_build(r.value) for r in read_topic(kafka_bootstrap, settings.topic(BUILDS))]
    assert [(a.snapshot_id, a.quant) for a in announced] == [(good.id, "F16")]

    # A restart does not try the refused snapshots again.
    again = BuilderMetrics()
    assert Builder(settings, kafka_bootstrap, again).build_all() == []
    assert build_failures(again, "convert") == 0.0
    assert builder.failures.all() == records

    # Asked for by name, a refused snapshot is tried again and reported in one line.
    config = write_settings(settings, tmp_path / "settings.yaml")
    argv = ["build", "--snapshot", first_bad.id, "--no-announce", "--config", str(config)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "OPTForCausalLM is not supported" in err
    assert main(["build", "--once", "--no-announce", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_evaluator_records_a_failing_task_and_runs_the_next(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, built_models: DemoModels
) -> None:
    # SENTIPOLC's test file is in another layout (the AMI file); AMI's files are fine.
    bad = tmp_path / "sentipolc_test.csv"
    bad.write_text((EVALITA / "ami2020_test.tsv").read_text(encoding="utf-8"), encoding="utf-8")
    evaluation = {
        "tasks": ["sentipolc2014", "ami2020"],
        "evalita": {
            "sentipolc2014": {"train": str(EVALITA / "sentipolc2014_train.csv"), "test": str(bad)},
            "ami2020": {
                "train": str(EVALITA / "ami2020_train.tsv"),
                "test": str(EVALITA / "ami2020_test.tsv"),
            },
        },
        "evalita_shots": 2,
    }
    settings = make_settings(
        tmp_path / "state", kafka_bootstrap, topic_prefix, evaluation=evaluation
    )
    ensure_topics(settings, kafka_bootstrap)
    snap = add_snapshot(SnapshotStore(settings.snapshots_path), 1, built_models.generator)

    metrics = EvaluatorMetrics()
    with EvaluatorService(settings, kafka_bootstrap, metrics) as service:
        assert service.run(once=True) == 2  # the base model and the snapshot

    def failures(m: EvaluatorMetrics, task: str) -> float | None:
        return m.registry.get_sample_value(
            "corpusfactory_evaluation_failures_total", {"task": task}
        )

    assert failures(metrics, "sentipolc2014") == 2.0
    assert failures(metrics, "ami2020") == 0.0
    store = SnapshotStore(settings.snapshots_path)
    for model_id in (BASE_ID, snap.id):
        done = store.evaluations(model_id, settings.training.base_model)
        assert set(done) == {"ami2020"} and done["ami2020"]["n"] == 10
        recorded = service.evaluator.failures(model_id).all()
        assert set(recorded) == {"sentipolc2014"}
        rec = recorded["sentipolc2014"]
        assert rec["reason"] == "sentipolc2014" and rec["error_type"] == "EvalitaFileError"
        assert rec["error"].startswith(f"{bad}:1: not a sentipolc2014 file")
        assert rec["model_id"] == model_id
    announced = [
        decode_evaluation(r.value) for r in read_topic(kafka_bootstrap, settings.topic(EVALUATIONS))
    ]
    assert sorted((a.model_id, a.task) for a in announced) == sorted(
        [(BASE_ID, "ami2020"), (snap.id, "ami2020")]
    )

    # A restart, even with the snapshot announced again, does not retry the failed task.
    announce(kafka_bootstrap, settings, snap)
    again = EvaluatorMetrics()
    with EvaluatorService(settings, kafka_bootstrap, again) as service:
        assert service.run(once=True) == 0
    assert failures(again, "sentipolc2014") == 0.0

    # Once the file is fixed, asking for the task by name runs it and clears the record.
    shutil.copy(EVALITA / "sentipolc2014_test.csv", bad)
    config = write_settings(settings, tmp_path / "settings.yaml")
    argv = ["eval", "run", "--model", snap.id, "--tasks", "sentipolc2014", "--config", str(config)]
    assert main(argv) == 0
    assert "sentipolc2014" in store.evaluations(snap.id)
    assert service.evaluator.failures(snap.id).all() == {}
    assert set(service.evaluator.failures(BASE_ID).all()) == {"sentipolc2014"}
