"""A failing training window never stops the trainer (issue 10): it is recorded with its
reason, counted, and its conversations are trained with the next new ones.

The failure is a real one: the base model is a copy of the demo generator whose
``model.safetensors`` is not a safetensors file, so the DeepSpeed child cannot load it
and exits non-zero. The broker, the trainer's loop and the fit are the real ones.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from corpusfactory.engines.models.demo import resolve_model
from corpusfactory.failures import FailureRecords
from corpusfactory.metrics import TrainerMetrics
from corpusfactory.settings import Settings
from tests.integration.pipeline_util import wait_for
from tests.integration.trainer_util import (
    committed_offsets,
    publish,
    seed_conversations,
    trainer_settings,
)
from training.service import Trainer
from training.snapshots import CONVERSATIONS, SnapshotStore

pytestmark = pytest.mark.integration

WEIGHTS = "model.safetensors"


@contextmanager
def running(settings: Settings, bootstrap: str) -> Iterator[Trainer]:
    """The trainer's service loop (``train`` without ``--once``) in a thread."""
    stop = threading.Event()
    errors: list[BaseException] = []
    with Trainer(settings, bootstrap, TrainerMetrics()) as trainer:

        def loop() -> None:
            try:
                trainer.run(stop)
            except BaseException as exc:  # the test fails on it below
                errors.append(exc)

        thread = threading.Thread(target=loop, name="trainer-loop", daemon=True)
        thread.start()
        try:
            yield trainer
            assert thread.is_alive() and not errors, errors
        finally:
            stop.set()
            thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors


def failures_total(trainer: Trainer) -> float | None:
    return trainer.metrics.registry.get_sample_value("corpusfactory_training_failures_total")


def snapshots_total(trainer: Trainer) -> float | None:
    return trainer.metrics.registry.get_sample_value("corpusfactory_snapshots_total")


def read_through(trainer: Trainer, n: int) -> None:
    """Wait until the loop has read ``n`` conversations."""
    wait_for(lambda: sum(trainer.pending.positions.values()) == n, 60, f"{n} conversations read")


def test_a_failed_window_is_recorded_and_trained_later_with_new_conversations(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = Path(resolve_model("demo:generator"))
    base = tmp_path / "base-model"
    shutil.copytree(good, base)
    (base / WEIGHTS).write_bytes(b"these are not safetensors weights\n" * 64)
    settings = trainer_settings(
        tmp_path,
        kafka_bootstrap,
        topic_prefix,
        base_model=str(base),
        heldout_percent=0,
        max_steps=1,
        trigger={"every_conversations": 4},
    )
    records = FailureRecords(settings.state_path / "training" / "failures")
    store = SnapshotStore(settings.snapshots_path)
    convs = seed_conversations(0, 12, "f")
    ids = [c for c, _ in convs]
    caplog.set_level(logging.ERROR, logger="training.service")

    # 1. Four conversations fire the trigger; the child cannot load the model.
    publish(kafka_bootstrap, settings, convs[:4])
    with running(settings, kafka_bootstrap) as trainer:
        wait_for(lambda: failures_total(trainer) == 1, 240, "a failed window")
        (first,) = records.all().values()
        assert first["reason"] == "fit"
        assert first["error_type"] == "TrainingError"
        assert "training failed with status" in first["error"]
        assert first["conversations"] == 4 and first["after_snapshot"] == ""
        assert sum(first["ends"].values()) == 4
        assert sum(r["end"] - r["start"] for r in first["offsets"].values()) == 4
        assert records.path(first["item"]).name == f"{first['item']}.failure"
        assert len(first["item"]) == 64  # the sha256 of the window's training data
        (line,) = [r for r in caplog.records if "failed at fit" in r.getMessage()]
        assert str(records.path(first["item"])) in line.getMessage()
    assert store.all() == []
    assert set(committed_offsets(kafka_bootstrap, settings).values()) == {None}

    # 2. A restart does not train the failed window again: nothing new since it.
    with Trainer(settings, kafka_bootstrap, TrainerMetrics()) as trainer:
        assert trainer.run_once() is None
        assert failures_total(trainer) == 0
    assert list(records.all()) == [first["item"]]

    # 3. The loop again: new conversations below the trigger do not retry the window
    # (the trigger counts those past it: 2 of 4). Each is read by a later poll than
    # the one before, so the trigger has been checked after the first of them.
    with running(settings, kafka_bootstrap) as trainer:
        publish(kafka_bootstrap, settings, convs[4:5])
        read_through(trainer, 5)
        publish(kafka_bootstrap, settings, convs[5:6])
        read_through(trainer, 6)
        assert failures_total(trainer) == 0
        assert list(records.all()) == [first["item"]]

        # Two more make four new ones: the failed window is tried again with them,
        # fails again (the model is still broken), and is recorded as its own window.
        publish(kafka_bootstrap, settings, convs[6:8])
        wait_for(lambda: failures_total(trainer) == 1, 240, "a second failed window")
        (second,) = [r for item, r in records.all().items() if item != first["item"]]
        assert second["conversations"] == 8 and sum(second["ends"].values()) == 8
        assert set(committed_offsets(kafka_bootstrap, settings).values()) == {None}

        # 4. The model is repaired; four more conversations train all twelve.
        shutil.copyfile(good / WEIGHTS, base / WEIGHTS)
        publish(kafka_bootstrap, settings, convs[8:12])
        wait_for(lambda: snapshots_total(trainer) == 1, 300, "a snapshot")
        assert failures_total(trainer) == 1
    (snap,) = store.all()
    trained = (snap.path / CONVERSATIONS).read_text(encoding="utf-8").split()
    assert sorted(trained) == sorted(ids)  # none of the failed windows' conversations lost
    assert snap.manifest["conversations"] == 12
    assert records.all() == {}  # the snapshot covers both failed windows
    ends = {int(p): r["end"] for p, r in snap.manifest["offsets"].items()}
    assert committed_offsets(kafka_bootstrap, settings) == ends
