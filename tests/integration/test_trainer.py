"""The trainer against the real broker: snapshots, manifests, offsets, restarts.

Each test trains the demo generator for a few DeepSpeed steps on CPU (ZeRO-1, gloo) on
conversations written to a real ``corpus.accepted`` topic.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from corpusfactory.chatformat import ChatFormat
from corpusfactory.contract import SNAPSHOTS, decode_snapshot
from corpusfactory.engines.models.demo import resolve_model
from tests.integration.pipeline_util import read_topic
from tests.integration.trainer_util import (
    committed_offsets,
    publish,
    seed_conversations,
    trainable_ids,
    trainer_settings,
)
from training.evaluation.lm import CausalLM
from training.service import Trainer
from training.snapshots import CONVERSATIONS, HELDOUT, MARKER, SnapshotStore

pytestmark = pytest.mark.integration


def _trained(snapshot_path: Path) -> list[str]:
    return (snapshot_path / CONVERSATIONS).read_text(encoding="utf-8").split()


def test_snapshots_record_what_they_consumed_and_continue_after_a_restart(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = trainer_settings(tmp_path, kafka_bootstrap, topic_prefix)
    first = seed_conversations(0, 24, "a")
    publish(kafka_bootstrap, settings, first)

    with Trainer(settings, kafka_bootstrap) as trainer:
        snap = trainer.run_once()
    assert snap is not None
    m = snap.manifest
    # Offsets: the two partitions together hold exactly the 24 conversations consumed.
    assert sum(r["end"] - r["start"] for r in m["offsets"].values()) == 24
    assert all(r["start"] == 0 for r in m["offsets"].values())
    expected = trainable_ids(settings, [c for c, _ in first])
    assert set(_trained(snap.path)) == expected
    assert m["conversations"] == len(expected)
    assert m["heldout_conversations"] == 24 - len(expected) > 0
    assert m["parent"] == "" and m["seq"] == 1
    assert len(m["data_hash"]) == 64
    assert m["tokens_per_s"] > 0 and m["wall_seconds"] > 0
    assert len(m["loss_curve"]) == m["steps"] > 0
    assert (snap.path / MARKER).is_file()
    assert len((snap.path / HELDOUT).read_text(encoding="utf-8").splitlines()) == 24 - len(expected)
    # Committed offsets mirror the manifest; the snapshot was announced.
    ends = {int(p): r["end"] for p, r in m["offsets"].items()}
    assert committed_offsets(kafka_bootstrap, settings) == ends
    announced = [
        decode_snapshot(r.value) for r in read_topic(kafka_bootstrap, settings.topic(SNAPSHOTS))
    ]
    assert [a.snapshot_id for a in announced] == [snap.id]
    # The snapshot is a Hugging Face model directory that loads, generates, and has learned
    # its training conversations: their NLL is lower than under the base model.
    lm = CausalLM.load(snap.path)
    assert isinstance(lm.generate(["[|Umano|] Ciao\n[|Assistente|]"], 8)[0], str)
    fmt = ChatFormat()
    texts = [fmt.render(msgs) for c, msgs in first if c in expected]
    base = CausalLM.load(resolve_model("demo:generator"))
    (after, n_after), (before, n_before) = lm.nll(texts), base.nll(texts)
    assert n_after == n_before and after < before

    # More conversations, one of them a re-publication of an id already trained on.
    second = seed_conversations(24, 12, "a")
    again = next(c for c in first if c[0] in expected)
    publish(kafka_bootstrap, settings, [*second, again])
    with Trainer(settings, kafka_bootstrap) as trainer:  # a new process would do the same
        snap2 = trainer.run_once()
    assert snap2 is not None
    m2 = snap2.manifest
    assert m2["parent"] == snap.id and m2["seq"] == 2
    assert m2["init_from"] == str(snap.path)
    assert {p: r["start"] for p, r in m2["offsets"].items()} == {
        p: r["end"] for p, r in m["offsets"].items()
    }
    assert sum(r["end"] - r["start"] for r in m2["offsets"].values()) == 13
    assert m2["skipped"].get("already_trained") == 1
    assert set(_trained(snap2.path)) == trainable_ids(settings, [c for c, _ in second])
    assert not set(_trained(snap2.path)) & set(_trained(snap.path))
    # Nothing new: no third snapshot.
    with Trainer(settings, kafka_bootstrap) as trainer:
        assert trainer.run_once() is None
    assert [s.id for s in SnapshotStore(settings.snapshots_path).all()] == [snap.id, snap2.id]


def test_the_count_trigger_and_a_source_filter(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = trainer_settings(
        tmp_path,
        kafka_bootstrap,
        topic_prefix,
        sources=["selfchat"],
        heldout_percent=0,
        max_steps=2,
        trigger={"every_conversations": 6},
    )
    publish(kafka_bootstrap, settings, seed_conversations(0, 5, "b"))
    publish(kafka_bootstrap, settings, seed_conversations(5, 4, "b"), source="fauno")
    with Trainer(settings, kafka_bootstrap) as trainer:
        # 5 trainable so far: the trigger (6) does not fire.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            trainer.poll(0.5)
            if sum(trainer.pending.positions.values()) == 9:
                break
        assert trainer.pending.trainable(settings.training) == 5
        assert trainer.policy.due(5, 0.0) is None
        publish(kafka_bootstrap, settings, seed_conversations(9, 1, "b"))
        assert trainer.run(max_snapshots=1) == 1
    (snap,) = SnapshotStore(settings.snapshots_path).all()
    assert snap.manifest["trigger"] == "count"
    assert snap.manifest["conversations"] == 6
    assert snap.manifest["skipped"] == {"skip_source": 4}
    assert snap.manifest["conversations_by_source"] == {"selfchat": 6}
    assert snap.manifest["steps"] == 2


def test_init_base_trains_every_conversation_from_the_base_model(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = trainer_settings(
        tmp_path, kafka_bootstrap, topic_prefix, init="base", heldout_percent=0, max_steps=1
    )
    publish(kafka_bootstrap, settings, seed_conversations(0, 4, "c"))
    with Trainer(settings, kafka_bootstrap) as trainer:
        first = trainer.run_once()
    publish(kafka_bootstrap, settings, seed_conversations(4, 3, "c"))
    with Trainer(settings, kafka_bootstrap) as trainer:
        second = trainer.run_once()
    assert first is not None and second is not None
    assert second.manifest["parent"] == ""
    assert second.manifest["conversations"] == 7
    assert all(r["start"] == 0 for r in second.manifest["offsets"].values())
    assert json.dumps(second.manifest["init_from"]).count("snap-") == 0
