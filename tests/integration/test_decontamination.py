"""Decontamination against the real stack: a turn copying an evaluation item is rejected.

The admitter loads the team's SQuAD-it and AMI 2020 fixtures into the index's reserved
collection; candidates copying a question, a context sentence or an AMI test text are
rejected with reason ``contaminated`` (their nearest evaluation item as neighbour),
while an unrelated turn is decided as usual, and no reserved item ever becomes a turn's
neighbour for the diversity filter.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from corpusfactory import contract
from corpusfactory.engines.index import KIND_EVAL, VectorIndex
from corpusfactory.kafka_clients import ensure_topics
from corpusfactory.tools.stack import WorkerProcess
from tests.integration.conftest import make_settings
from tests.integration.pipeline_util import candidate, producer, wait_decided
from training.evaluation.evalita_files import read_ami2020
from training.evaluation.items import evaluation_items
from training.evaluation.squad_it import load_squad

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_turns_copying_evaluation_items_are_rejected_as_contaminated(
    tmp_path: Path, kafka_bootstrap: str, built_models: object, embedder: object
) -> None:
    settings = make_settings(
        tmp_path / "state",
        kafka_bootstrap,
        f"t{uuid.uuid4().hex[:8]}.",
        admission={"decontaminate": True, "contamination_threshold": 0.9},
        evaluation={
            "tasks": ["squad_it", "ami2020"],
            "squad_it_path": str(FIXTURES / "squad_it_small.json"),
            "evalita": {
                "ami2020": {
                    "train": str(FIXTURES / "evalita" / "ami2020_train.tsv"),
                    "test": str(FIXTURES / "evalita" / "ami2020_test.tsv"),
                }
            },
        },
    )
    ensure_topics(settings, kafka_bootstrap)
    items = evaluation_items(settings)
    squad = load_squad(FIXTURES / "squad_it_small.json")
    ami = read_ami2020(FIXTURES / "evalita" / "ami2020_test.tsv")
    assert sum(r.startswith("eval:squad_it:q:") for r, _ in items) == len(squad)
    assert sum(r.startswith("eval:ami2020:") for r, _ in items) == len(ami)

    question = squad[3].question
    sentence = next(t for r, t in items if r.startswith("eval:squad_it:c:"))
    texts = {
        "question": question,
        "question_reworded": question.rstrip("?") + " ?",
        "context_sentence": sentence,
        "ami": ami[0].text,
        "clean": "Stasera preparo una pizza margherita con la mozzarella di bufala fresca.",
    }
    admitter = WorkerProcess(settings, "admitter").start()
    scorer = WorkerProcess(settings, "scorer").start()
    try:
        admitter.wait_ready()
        scorer.wait_ready()
        prod = producer(kafka_bootstrap)
        conv = f"contam-{uuid.uuid4().hex[:6]}"
        for name, text in texts.items():
            cand = candidate(f"{conv}-{name}", 0, text)
            prod.send(settings.topic(contract.CANDIDATES), key=cand.conversation_id.encode(),
                      value=contract.encode(cand))  # fmt: skip
        prod.flush()
        prod.close()
        ids = {name: f"{conv}-{name}:0:0" for name in texts}

        ds = wait_decided(kafka_bootstrap, settings, set(ids.values()))
        got = {n: ds[t][0] for n, t in ids.items()}
    finally:
        scorer.stop()
        admitter.stop()
    for name in ("question", "question_reworded", "context_sentence", "ami"):
        d = got[name]
        assert (d.accepted, d.reason) == (False, "contaminated"), name
        assert d.neighbour_id.startswith("eval:") and d.similarity > 0.9, name
    assert got["question"].neighbour_id == f"eval:squad_it:q:{squad[3].id}"
    assert got["ami"].neighbour_id == f"eval:ami2020:{ami[0].id}"
    clean = got["clean"]
    assert clean.reason != "contaminated" and not clean.neighbour_id.startswith("eval:")
    # The reserved items sit apart from the corpus's vectors.
    index = VectorIndex.from_settings(settings, 384)
    try:
        assert index.count(KIND_EVAL, reserved=True) == len(items)
        assert index.count(KIND_EVAL) == 0
    finally:
        index.close()
