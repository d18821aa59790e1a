"""Custom JSONL task files: hand-computed scores and the errors users will hit."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.evaluation.tasks import evaluate_task_file


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


class BagOfCharactersVectoriser:
    """A test encoder: counts of each lower-case letter a-z, so cosines are easy by hand."""

    def encode(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            counts = Counter(text.lower())
            rows.append([counts[chr(c)] for c in range(ord("a"), ord("z") + 1)])
        return np.asarray(rows, dtype=np.float64)


def test_classification_hand_computed(tmp_path: Path) -> None:
    # gold:  pos pos pos neg neg
    # pred:  pos pos neg neg pos
    # pos: tp 2, predicted 3, support 3 -> P 2/3, R 2/3, F1 2/3
    # neg: tp 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2
    # accuracy 3/5; macro F1 = (2/3 + 1/2) / 2 = 7/12
    gold = ["pos", "pos", "pos", "neg", "neg"]
    pred = ["pos", "pos", "neg", "neg", "pos"]
    pairs = enumerate(zip(pred, gold, strict=True))
    rows = [{"id": i, "prediction": p, "label": g} for i, (p, g) in pairs]
    result = evaluate_task_file(_write(tmp_path / "c.jsonl", rows), "classification")
    assert result["kind"] == "classification" and result["n"] == 5
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["per_label"]["pos"]["precision"] == pytest.approx(2 / 3)
    assert result["per_label"]["neg"]["recall"] == pytest.approx(1 / 2)
    assert result["macro_precision"] == pytest.approx(7 / 12)
    assert result["macro_recall"] == pytest.approx(7 / 12)
    assert result["macro_f1"] == pytest.approx(7 / 12)


def test_tags_hand_computed(tmp_path: Path) -> None:
    # Item a: P = {cane, gatto}, T = {cane, topo}: inter 1, union 3.
    #   IoU 1/3, over truth 1/2, over model 1/2;
    #   sorted [cane, gatto] vs [cane, topo]: one substitution -> 1/2.
    # Item b: P = {mare}, T = {mare, sole, vento} ("Mare " normalises to "mare"): inter 1.
    #   IoU 1/3, over truth 1/3, over model 1;
    #   [mare] vs [mare, sole, vento]: two insertions -> 2/3.
    rows = [
        {"id": "a", "prediction": ["cane", "gatto"], "truth": ["cane", "topo"]},
        {"id": "b", "prediction": ["Mare "], "truth": ["mare", "sole", "vento"]},
    ]
    result = evaluate_task_file(_write(tmp_path / "t.jsonl", rows), "tags")
    assert result["n"] == 2
    assert result["iou"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert result["intersection_over_truth"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert result["intersection_over_model"] == pytest.approx((1 / 2 + 1) / 2)
    assert result["normalized_levenshtein"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_similarity_with_bag_of_characters(tmp_path: Path) -> None:
    # "ab" vs "ab": identical vectors -> 1.
    # "aa" vs "ab": (2,0)·(1,1) = 2; |(2,0)| = 2, |(1,1)| = √2 -> 2 / (2√2) = 1/√2.
    # "c" vs "ab": no shared letter -> 0.
    rows = [
        {"id": 1, "prediction": "ab", "reference": "ab"},
        {"id": 2, "prediction": "aa", "reference": "ab"},
        {"id": 3, "prediction": "c", "reference": "ab"},
    ]
    path = _write(tmp_path / "s.jsonl", rows)
    result = evaluate_task_file(path, "similarity", encoder=BagOfCharactersVectoriser())
    assert result["n"] == 3
    assert result["mean_cosine"] == pytest.approx((1 + 2**-0.5 + 0) / 3)
    assert result["min_cosine"] == pytest.approx(0.0)
    assert result["max_cosine"] == pytest.approx(1.0)


def test_similarity_needs_an_encoder(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.jsonl", [{"id": 1, "prediction": "a", "reference": "a"}])
    with pytest.raises(ValueError, match="needs an encoder"):
        evaluate_task_file(path, "similarity")


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text('\n{"id": "x", "prediction": "a", "label": "a"}\n\n', encoding="utf-8")
    assert evaluate_task_file(path, "classification")["accuracy"] == 1.0


@pytest.mark.parametrize(
    ("kind", "lines", "message"),
    [
        ("classification", ['{"id": 1, "prediction": "a", "label": "a"}', "{oops"], r":2: invalid"),
        ("classification", ['{"id": 1, "prediction": "a"}'], r":1: missing field 'label'"),
        ("classification", ['{"prediction": "a", "label": "a"}'], r":1: missing field 'id'"),
        ("classification", ['{"id": 1, "prediction": 0, "label": "a"}'], r"'prediction' must"),
        ("classification", ['{"id": true, "prediction": "a", "label": "a"}'], r"'id' must"),
        ("classification", ["[1, 2]"], r":1: expected a JSON object, got list"),
        ("tags", ['{"id": 1, "prediction": "a", "truth": []}'], r"'prediction' must be list"),
        ("tags", ['{"id": 1, "prediction": ["a", 2], "truth": []}'], r"list of strings"),
        ("similarity", ['{"id": 1, "prediction": "a"}'], r"missing field 'reference'"),
        (
            "classification",
            ['{"id": 1, "prediction": "a", "label": "a"}'] * 2,
            r":2: repeated id 1",
        ),
        ("classification", [], r"no items"),
        ("sentiment", ['{"id": 1}'], r"unknown kind"),
    ],
)
def test_errors_name_the_line(tmp_path: Path, kind: str, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    encoder = BagOfCharactersVectoriser() if kind == "similarity" else None
    with pytest.raises(ValueError, match=message):
        evaluate_task_file(path, kind, encoder=encoder)
