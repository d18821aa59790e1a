"""GGUF builds of real snapshots through the broker, and the server's model following.

Snapshots of the demo generator are trained for one step; the builder converts,
quantizes and gates them, announces the builds, and a ``ModelFollower`` keeps a
registry on the newest published Q4_K_M build.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from corpusfactory.cli.main import main
from corpusfactory.contract import BUILDS, decode_build
from corpusfactory.tools.stack import write_settings
from serving.builder import Builder
from serving.builds import BuildStore
from serving.follow import ModelFollower, newest
from serving.server.registry import ModelRegistry
from tests.integration.pipeline_util import read_topic, wait_for
from tests.integration.trainer_util import publish, seed_conversations, trainer_settings
from training.service import Trainer

pytestmark = pytest.mark.integration


def test_builds_are_gated_announced_listed_and_followed(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    settings = trainer_settings(tmp_path, kafka_bootstrap, topic_prefix, max_steps=1)
    publish(kafka_bootstrap, settings, seed_conversations(0, 10, "g"))
    with Trainer(settings, kafka_bootstrap) as trainer:
        first = trainer.run_once()
    assert first is not None

    builds = Builder(settings, kafka_bootstrap).build_all()
    assert [b.quant for b in builds] == ["F16", "Q8_0", "Q4_K_M"]
    assert all(b.published and b.record["gate"]["passed"] for b in builds)
    sizes = {b.quant: b.record["size_bytes"] for b in builds}
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_K_M"] > 0
    announced = [decode_build(r.value) for r in read_topic(kafka_bootstrap, settings.topic(BUILDS))]
    assert [(a.snapshot_id, a.quant, a.published) for a in announced] == [
        (first.id, q, True) for q in ("F16", "Q8_0", "Q4_K_M")
    ]
    assert Builder(settings, kafka_bootstrap).build_all() == []  # nothing built twice

    config = write_settings(settings, tmp_path / "settings.yaml")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["builds", "list", "--json", "--config", str(config)]) == 0
    listed = json.loads(out.getvalue())
    assert {(b["snapshot"], b["quant"]) for b in listed} == {
        (first.id, q) for q in ("F16", "Q8_0", "Q4_K_M")
    }
    for b in listed:
        assert {"snapshot", "quant", "path", "size_bytes", "gate"} <= set(b)
        assert {"kl_mean", "top1_agreement", "ppl_delta_pct", "passed"} <= set(b["gate"])
        assert Path(b["path"]).stat().st_size == b["size_bytes"]

    # The server side: a registry on the newest published Q4_K_M build, following the topic.
    registry = ModelRegistry()
    follower = ModelFollower(settings, registry, "gguf", kafka_bootstrap)
    assert follower.refresh() and registry.current_id == f"{first.id}-Q4_K_M"
    follower.start()
    try:
        # A second snapshot whose Q4_K_M build fails an impossible budget: kept, not served.
        publish(kafka_bootstrap, settings, seed_conversations(10, 6, "g"))
        with Trainer(settings, kafka_bootstrap) as trainer:
            second = trainer.run_once()
        assert second is not None
        strict = settings.model_copy(deep=True)
        strict.serving.gate_budgets["Q4_K_M"].min_top1 = 1.0
        strict.serving.gate_budgets["Q4_K_M"].max_kl = 1e-12
        held = {b.quant: b for b in Builder(strict, kafka_bootstrap).build(second)}
        assert held["Q4_K_M"].published is False
        assert {f["metric"] for f in held["Q4_K_M"].record["gate"]["failures"]} >= {
            "kl_mean",
            "top1_agreement",
        }
        assert held["Q4_K_M"].path.is_file()  # kept for inspection
        assert newest(settings, "gguf") == (f"{first.id}-Q4_K_M", builds[2].path)
        assert registry.current_id == f"{first.id}-Q4_K_M"

        # Rebuilt within budget: announced, and the follower swaps to it.
        store = BuildStore(settings.builds_path)
        (settings.builds_path / second.id / "Q4_K_M.json").unlink()
        store.cleanup_partial()
        (rebuilt,) = Builder(settings, kafka_bootstrap).build(second)
        assert rebuilt.published
        wait_for(lambda: registry.current_id == f"{second.id}-Q4_K_M", 60, "the follower to swap")
    finally:
        follower.stop()
        registry.close().result(timeout=30)
