"""Reliability scenario 7: kill the trainer while it trains, saves and publishes.

The trainer runs as a real ``corpusfactory train`` process. A named pause point
(``corpusfactory.faults``) stops it at an exact step, the test SIGKILLs its process
group (it and its DeepSpeed child), and checks that no partial snapshot is visible and
that the next start carries on: every trainable conversation ends up trained on exactly
once, by complete snapshots only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from corpusfactory.settings import Settings
from corpusfactory.tools.stack import ServiceProcess
from tests.integration.pipeline_util import wait_for
from tests.integration.trainer_util import (
    committed_offsets,
    publish,
    seed_conversations,
    trainable_ids,
    trainer_settings,
)
from training.service import Trainer
from training.snapshots import CONVERSATIONS, MARKER, SnapshotStore

pytestmark = pytest.mark.integration


def _kill_at(
    point: str, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ServiceProcess:
    pause_dir = tmp_path / f"pause-{point}"
    monkeypatch.setenv("CORPUSFACTORY_PAUSE_AT", point)
    monkeypatch.setenv("CORPUSFACTORY_PAUSE_DIR", str(pause_dir))
    proc = ServiceProcess(settings, ["train"], f"trainer-{point}", "trainer ready").start()
    try:
        wait_for(lambda: (pause_dir / point).exists(), 240, f"the trainer to reach {point}")
    finally:
        proc.kill()
    monkeypatch.delenv("CORPUSFACTORY_PAUSE_AT")
    return proc


def test_killed_while_training_saving_or_publishing_leaves_no_partial_snapshot(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = trainer_settings(
        tmp_path, kafka_bootstrap, topic_prefix, max_steps=2, trigger={"every_conversations": 8}
    )
    convs = seed_conversations(0, 16, "k")
    publish(kafka_bootstrap, settings, convs)
    store = SnapshotStore(settings.snapshots_path)

    _kill_at("fit.train", settings, tmp_path, monkeypatch)
    assert store.all() == []
    staged = [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert len(staged) == 1 and not any(staged[0].glob("*.safetensors"))
    assert set(committed_offsets(kafka_bootstrap, settings).values()) == {None}

    _kill_at("fit.save", settings, tmp_path, monkeypatch)
    assert store.all() == []
    staged = [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert len(staged) == 1 and any(staged[0].glob("*.safetensors"))  # weights, not stats

    _kill_at("snapshot.publish", settings, tmp_path, monkeypatch)
    assert store.all() == [] and store.latest() is None
    renamed = [p for p in store.root.iterdir() if p.name.startswith("snap-")]
    assert len(renamed) == 1 and not (renamed[0] / MARKER).exists()
    assert set(committed_offsets(kafka_bootstrap, settings).values()) == {None}

    # A clean start removes the partial directory and trains the same conversations.
    with Trainer(settings, kafka_bootstrap) as trainer:
        assert not renamed[0].exists()
        first = trainer.run_once()
    assert first is not None and first.manifest["seq"] == 1
    assert all(r["start"] == 0 for r in first.manifest["offsets"].values())
    ends = {int(p): r["end"] for p, r in first.manifest["offsets"].items()}
    assert committed_offsets(kafka_bootstrap, settings) == ends

    # Later conversations go to the next snapshot; together each is trained on once.
    more = seed_conversations(16, 10, "k")
    publish(kafka_bootstrap, settings, more)
    with Trainer(settings, kafka_bootstrap) as trainer:
        second = trainer.run_once()
    assert second is not None and second.manifest["parent"] == first.id
    trained = [
        cid
        for snap in store.all()
        for cid in (snap.path / CONVERSATIONS).read_text(encoding="utf-8").split()
    ]
    assert len(trained) == len(set(trained))
    assert set(trained) == trainable_ids(settings, [c for c, _ in convs + more])
