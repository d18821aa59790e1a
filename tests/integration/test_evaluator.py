"""The evaluator against the real broker: snapshots in, results stored and announced.

A snapshot of the demo generator is trained for one step, then the evaluator runs the
SQuAD-it, AMI 2020, held-out and generation tasks on it and on the base model, with the
team's small fixtures in the official formats.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from corpusfactory.cli.main import main
from corpusfactory.contract import EVALUATIONS, decode_evaluation
from corpusfactory.tools.stack import write_settings
from tests.integration.pipeline_util import read_topic
from tests.integration.trainer_util import publish, seed_conversations, trainer_settings
from training.evaluation.service import EvaluatorService
from training.evaluation.squad_it import rescore_predictions
from training.service import Trainer

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _cli_json(*argv: str) -> object:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue())


def test_snapshots_are_evaluated_stored_announced_and_compared(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    evaluation = {
        "tasks": ["squad_it", "ami2020", "heldout", "generation_nll"],
        "squad_it_path": str(FIXTURES / "squad_it_small.json"),
        "evalita": {
            "ami2020": {
                "train": str(FIXTURES / "evalita" / "ami2020_train.tsv"),
                "test": str(FIXTURES / "evalita" / "ami2020_test.tsv"),
            }
        },
        "generation_prompts": 4,
    }
    settings = trainer_settings(
        tmp_path, kafka_bootstrap, topic_prefix, evaluation, max_steps=1, heldout_percent=25
    )
    publish(kafka_bootstrap, settings, seed_conversations(0, 16, "e"))
    with Trainer(settings, kafka_bootstrap) as trainer:
        snap = trainer.run_once()
    assert snap is not None

    with EvaluatorService(settings, kafka_bootstrap) as service:
        assert service.run(once=True) == 2  # the base model and the snapshot
    with EvaluatorService(settings, kafka_bootstrap) as service:
        assert service.run(once=True) == 0  # nothing is evaluated twice

    announced = [
        decode_evaluation(r.value) for r in read_topic(kafka_bootstrap, settings.topic(EVALUATIONS))
    ]
    by_model: dict[str, set[str]] = {}
    for a in announced:
        by_model.setdefault(a.model_id, set()).add(a.task)
    assert by_model == {
        "base": {"squad_it", "ami2020", "generation_nll"},
        snap.id: {"squad_it", "ami2020", "heldout", "generation_nll"},
    }

    config = write_settings(settings, tmp_path / "settings.yaml")
    listed = _cli_json("snapshots", "list", "--json", "--config", str(config))
    assert isinstance(listed, list) and [d["id"] for d in listed] == [snap.id]
    ev = listed[0]["eval"]
    squad = ev["squad_it"]
    assert squad["n"] == 12
    assert {"f1", "em", "n", "predictions"} <= set(squad)
    lines = Path(squad["predictions"]).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    assert {"id", "prediction", "answers"} <= set(json.loads(lines[0]))
    again = rescore_predictions(squad["predictions"])
    assert (again["f1"], again["em"]) == (squad["f1"], squad["em"])
    assert ev["ami2020"]["n"] == 10 and 0.0 <= ev["ami2020"]["macro_f1"] <= 100.0
    held = ev["heldout"]
    assert held["n"] == snap.manifest["heldout_conversations"] > 0
    assert held["perplexity"] > 1.0 and held["base_perplexity"] > 1.0
    gen = ev["generation_nll"]
    assert gen["n"] + gen["empty_generations"] == 4 and "nll_threshold" in gen

    rows = _cli_json("eval", "compare", "--json", "--config", str(config))
    assert isinstance(rows, list) and [r["model"] for r in rows] == [
        "base (demo:generator)",
        snap.id,
    ]
    assert rows[1]["squad_it_f1"] == squad["f1"]
    assert rows[1]["trained"] == snap.manifest["conversations"]
    assert rows[0]["heldout_ppl"] is None

    # A new snapshot announced later: the evaluator picks it up from the topic.
    publish(kafka_bootstrap, settings, seed_conversations(16, 8, "e"))
    with Trainer(settings, kafka_bootstrap) as trainer:
        snap2 = trainer.run_once()
    assert snap2 is not None
    with EvaluatorService(settings, kafka_bootstrap) as service:
        assert service.run(once=True) == 1
    shown = _cli_json("snapshots", "show", snap2.id, "--config", str(config))
    assert isinstance(shown, dict) and set(shown["eval"]) == {
        "squad_it",
        "ami2020",
        "heldout",
        "generation_nll",
    }
